"""Tests of the architecture floor (see README, "How it fits together")."""
