"""Tests of the attacks floor: every registered attack family (see README, "How it fits together")."""
