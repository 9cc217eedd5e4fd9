"""Tests of the exporters floor (see README, "How it fits together")."""
