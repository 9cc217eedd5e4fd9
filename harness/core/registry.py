"""A small typed registry: one per plug-in kind (datasets, attacks, models, precisions, defenses).

Plug-ins register themselves with a decorator, so adding a defense or a precision never means
editing a central ``if`` chain. Lookups of unknown names fail with a one-line error that suggests
the closest registered name ("unknown defense 'stirp'; did you mean 'strip'?").

Registration can be lazy: ``register_lazy(name, "pkg.module")`` records where a plug-in lives
without importing it, so ``import harness`` stays cheap (no torch import to list datasets).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from harness.core.errors import BlindspotsError

T = TypeVar("T")


class UnknownNameError(BlindspotsError):
    """Raised when a registry lookup names nothing registered."""


class Registry(Generic[T]):
    """Maps names to plug-ins of one kind (classes or factory callables)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._lazy: dict[str, str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name``."""

        def decorate(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorate

    def add(self, name: str, obj: T) -> None:
        """Register ``obj`` under ``name``; a second, different object under one name is a bug."""
        existing = self._items.get(name)
        if existing is not None and existing is not obj:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._items[name] = obj
        self._lazy.pop(name, None)

    def register_lazy(self, name: str, module: str) -> None:
        """Record that importing ``module`` registers ``name``; the import waits for first use."""
        if name not in self._items:
            self._lazy[name] = module

    def names(self) -> list[str]:
        """Every registered name, sorted, lazy ones included."""
        return sorted(set(self._items) | set(self._lazy))

    def get(self, name: str) -> T:
        """Return the plug-in called ``name`` or raise a one-line error with a suggestion."""
        if name not in self._items and name in self._lazy:
            importlib.import_module(self._lazy.pop(name))
        if name in self._items:
            return self._items[name]
        known = self.names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(known)}"
        raise UnknownNameError(f"unknown {self.kind} '{name}'{hint}")

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        """All (name, plug-in) pairs, importing lazy ones."""
        return [(name, self.get(name)) for name in self.names()]
