"""Tests of the defenses floor (see README, "How it fits together")."""
