"""Where a defense's independent per-label tasks run, as the defense sees it.

Neural Cleanse searches one trigger per label; given the cost schedule's per-label values, each
label's step depends on nothing but its own state, so the labels of a step can run on other
cores or machines. The executors that own those cores (local process pools, Dask clusters) live
in :mod:`harness.pipeline`, which defenses may not import (``.importlinter``: a defense talks to
a deployed model, never to pipelines). So the pipeline *injects* an object of the shape below
through :attr:`defenses.base.DefenseData.label_map`, and a defense without one runs its labels
in its own process (:class:`SerialLabelMap`).

The shape is two calls because what a label task needs splits in two: the *shared* part (the
gradient oracle, the optimisation images, the parameters: megabytes, the same for every label
and step) is handed over once per scan with :meth:`LabelMap.open`, so an implementation can ship
it to each worker once; the per-task part (one label's optimiser state: kilobytes) travels with
every :meth:`LabelTasks.map`. ``fn``, the shared object and the items must be picklable for any
implementation that leaves the process; ``fn`` must be a module-level function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

LabelFn = Callable[[Any, Any], Any]
"""``fn(shared, item) -> result``: one task; pure in the sense that equal inputs give equal
results wherever it runs (the bit-identity of fanned-out scans rests on it)."""


class LabelTasks(Protocol):
    """An open scan: maps tasks over items with the shared object of :meth:`LabelMap.open`."""

    def map(self, fn: LabelFn, items: Sequence[Any]) -> list[Any]:
        """``[fn(shared, item) for item in items]``, in order; re-raises the first task error."""
        ...

    def close(self) -> None:
        """Release what :meth:`LabelMap.open` shipped (idempotent)."""
        ...


class LabelMap(Protocol):
    """Runs a defense's per-label tasks (in this process, local workers, a cluster)."""

    def open(self, shared: Any) -> LabelTasks:
        """Hand over ``shared`` once for a run of :meth:`LabelTasks.map` calls."""
        ...

    def describe(self) -> str:
        """Where the tasks run, for reports (``"serial"``, ``"dask (4 workers)"``)."""
        ...


class _InlineTasks:
    def __init__(self, shared: Any) -> None:
        self.shared = shared

    def map(self, fn: LabelFn, items: Sequence[Any]) -> list[Any]:
        return [fn(self.shared, item) for item in items]

    def close(self) -> None:
        self.shared = None


class SerialLabelMap:
    """Every task in this process, in order: the default, and the reference the others match."""

    def open(self, shared: Any) -> LabelTasks:
        return _InlineTasks(shared)

    def describe(self) -> str:
        return "serial"
