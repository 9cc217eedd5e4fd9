"""Tests of the qcb floor (see README, "How it fits together")."""
