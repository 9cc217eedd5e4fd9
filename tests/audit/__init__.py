"""Tests of the audit floor (see README, "How it fits together")."""
