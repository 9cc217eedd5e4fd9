"""Tests of the report floor (see README, "How it fits together")."""
