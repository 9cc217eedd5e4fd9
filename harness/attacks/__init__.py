"""Backdoor attacks, registered by name; see :mod:`harness.attacks.base`."""

from harness.attacks.base import ATTACKS, Attack, AttackParams, PoisonedSet, build_attack

__all__ = ["ATTACKS", "Attack", "AttackParams", "PoisonedSet", "build_attack"]
