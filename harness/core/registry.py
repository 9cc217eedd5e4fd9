"""A small typed registry: one per plug-in kind (datasets, attacks, models, precisions, defenses).

Every kind registers the same way, so a newcomer learns it once:

* the plug-in's module decorates its class or factory with ``@REGISTRY.register("name")``;
* the kind's package keeps a *lazy table* — ``register_lazy("name", "package.module")`` — that
  records where each built-in lives without importing it, so ``import harness`` and
  ``blindspots list`` stay cheap (no torch import to list datasets);
* a third party adds a plug-in from its own installed package with an entry point in the kind's
  group (``blindspots.defenses``, ``blindspots.datasets``, ``blindspots.attacks``,
  ``blindspots.models``, ``blindspots.precisions``): ``name = "their_package.module"`` (the
  module registers itself on import) or ``name = "their_package.module:Object"``. Entry points
  are read on first use and imported only when their name is asked for. They never replace a
  built-in of the same name.

Lookups of unknown names fail with a one-line error that suggests the closest registered name
("unknown defense 'stirp'; did you mean 'strip'?"). :meth:`Registry.ordered` keeps registration
order (built-ins in their table's order, then entry points), which default lists and report
columns follow.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from harness.core.errors import BlindspotsError

T = TypeVar("T")
ENTRY_POINT_PREFIX = "blindspots."
logger = logging.getLogger(__name__)


class UnknownNameError(BlindspotsError):
    """Raised when a registry lookup names nothing registered."""


class Registry(Generic[T]):
    """Maps names to plug-ins of one kind (classes or factory callables).

    ``group`` is the entry-point group third-party packages register under; by default
    ``blindspots.<kind>s``.
    """

    def __init__(self, kind: str, group: str | None = None) -> None:
        self.kind = kind
        self.group = group or f"{ENTRY_POINT_PREFIX}{kind}s"
        self._items: dict[str, T] = {}
        self._lazy: dict[str, str] = {}
        self._order: dict[str, None] = {}
        self._discovered = False

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
        self._order.setdefault(name, None)

    def register_lazy(self, name: str, target: str) -> None:
        """Record where ``name`` lives (``"pkg.module"`` or ``"pkg.module:attr"``); the import
        waits for first use."""
        if name not in self._items:
            self._lazy[name] = target
            self._order.setdefault(name, None)

    def _discover(self) -> None:
        """Read this kind's entry points once (metadata only; nothing is imported)."""
        if self._discovered:
            return
        self._discovered = True
        for point in entry_points(group=self.group):
            if point.name in self._order:
                logger.warning(
                    "ignoring the %s '%s' from entry point %s: a %s of that name is built in",
                    self.kind,
                    point.name,
                    point.value,
                    self.kind,
                )
                continue
            self.register_lazy(point.name, point.value)

    def _load(self, name: str) -> None:
        """Import a lazily registered plug-in; an ``attr`` target is registered here."""
        target = self._lazy[name]
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise BlindspotsError(
                f"{self.kind} '{name}' cannot be loaded from {module_name}: {exc}"
            ) from None
        self._lazy.pop(name, None)
        if attr and name not in self._items:
            obj: Any = module
            for part in attr.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    raise BlindspotsError(f"{self.kind} '{name}': {target} names nothing")
            self.add(name, obj)
        if name not in self._items:
            raise BlindspotsError(
                f"{self.kind} '{name}': importing {module_name} registered nothing under that name"
            )

    def names(self) -> list[str]:
        """Every registered name, sorted, lazy ones and entry points included."""
        return sorted(self.ordered())

    def ordered(self) -> list[str]:
        """Every registered name in registration order (built-in table first)."""
        self._discover()
        return list(self._order)

    def origin(self, name: str) -> str | None:
        """The module ``name`` lives in, without importing it (``None`` if unknown)."""
        self._discover()
        if name in self._lazy:
            return self._lazy[name].partition(":")[0]
        if name in self._items:
            return getattr(self._items[name], "__module__", None)
        return None

    def get(self, name: str) -> T:
        """Return the plug-in called ``name`` or raise a one-line error with a suggestion."""
        self._discover()
        if name not in self._items and name in self._lazy:
            self._load(name)
        if name in self._items:
            return self._items[name]
        known = self.names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(known)}"
        raise UnknownNameError(f"unknown {self.kind} '{name}'{hint}")

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._items or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        """All (name, plug-in) pairs in registration order, importing lazy ones."""
        return [(name, self.get(name)) for name in self.ordered()]
