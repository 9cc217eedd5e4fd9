"""Backdoor defenses, one module each, behind :class:`defenses.base.Defense`."""

from defenses.base import DEFENSES, Defense, DefenseData, DefenseResult, build_defense

__all__ = ["DEFENSES", "Defense", "DefenseData", "DefenseResult", "build_defense"]
