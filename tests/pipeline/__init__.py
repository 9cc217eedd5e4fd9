"""Tests of the pipeline floor (see README, "How it fits together")."""
