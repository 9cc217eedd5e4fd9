"""Tests of the artifacts floor (see README, "How it fits together")."""
