"""Tests of the runtime floor (see README, "How it fits together")."""
