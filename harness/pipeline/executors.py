"""Where a sweep's tasks run: in this process, in local worker processes, or on a Dask cluster.

One small interface (:class:`Executor`): ``submit`` a picklable module-level function with one
argument, then ``wait`` for at least one of the pending handles to finish and read its
``result``. The sweep driver (:mod:`harness.pipeline.sweep`) is written once against it; each
executor is
a thin wrapper over a library that already does scheduling — :mod:`concurrent.futures` for
local processes, ``dask.distributed`` for clusters — never a protocol of our own.

Tasks return records; only the driver writes them to the store, so a cluster needs no shared
store and two workers can never interleave a line. Workers do share the output folder's
``artifacts/`` (trained models, ONNX files): on a cluster it must be on a filesystem every
worker reaches at the same path, or each worker recomputes what it does not find.

Threads: each worker gets ``threads_per_worker`` (default 1) torch / onnxruntime / BLAS
threads, so N workers on N cores do not oversubscribe them. The task itself applies the limit
(it knows which libraries it loads); the executor only says how many.

Dask is an optional extra (``pip install 'quant-blindspots[dask]'``); without it the other two
executors work and asking for Dask is a one-line error.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import os
import pickle
import tempfile
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any, Literal

from harness.core.errors import BlindspotsError

ExecutorName = Literal["serial", "processes", "dask"]
EXECUTORS: tuple[ExecutorName, ...] = ("serial", "processes", "dask")
DASK_MISSING = (
    "the Dask executor needs the optional dependency: pip install 'quant-blindspots[dask]'"
)


class Executor(ABC):
    """Runs ``fn(arg)`` tasks; handles are futures with ``result()`` (re-raises task errors)."""

    name: str
    workers: int
    threads_per_worker: int | None
    """Threads each task may use; None: the task's own setting (serial runs keep the config's)."""

    @abstractmethod
    def submit(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        """Queue one task; returns its handle."""

    @abstractmethod
    def wait(self, pending: Collection[Any]) -> list[Any]:
        """Block until at least one handle of ``pending`` is finished; return the finished ones."""

    @abstractmethod
    def close(self) -> None:
        """Release workers (idempotent)."""

    def slots(self) -> int:
        """Tasks worth keeping in flight now: one per worker (at least one)."""
        return max(1, self.workers)

    def share(self, obj: Any) -> Any:
        """A handle that tasks pass to :func:`resolve_shared` to get ``obj`` where they run,
        shipped once rather than with every task (see :class:`ExecutorLabelMap`)."""
        return _Inline(obj)

    def unshare(self, handle: Any) -> None:
        """Release what :meth:`share` shipped (idempotent; nothing to do for an inline one)."""
        return None

    def label_map(self) -> ExecutorLabelMap:
        """This executor as a :class:`defenses.fanout.LabelMap` (a defense's per-label tasks)."""
        return ExecutorLabelMap(self)

    def __enter__(self) -> Executor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def describe(self) -> str:
        return f"{self.name} ({self.workers} worker{'s' if self.workers != 1 else ''})"


class SerialExecutor(Executor):
    """Runs tasks in this process, one at a time, in submission order, when waited on.

    Deferring the call to :meth:`wait` keeps the driver's rhythm the same as with real workers:
    each finished task's records are written before the next task starts, so an interrupt loses
    at most the task in flight.
    """

    name = "serial"
    workers = 1

    def __init__(self, threads_per_worker: int | None = None) -> None:
        self.threads_per_worker = threads_per_worker
        self._queued: dict[Future, tuple[Callable[[Any], Any], Any]] = {}

    def submit(self, fn: Callable[[Any], Any], arg: Any) -> Future:
        future: Future = Future()
        self._queued[future] = (fn, arg)
        return future

    def wait(self, pending: Collection[Any]) -> list[Any]:
        finished = [f for f in pending if f.done()]
        if finished:
            return finished
        future = next(f for f in self._queued if f in pending)
        fn, arg = self._queued.pop(future)
        try:
            future.set_result(fn(arg))
        except Exception as exc:  # handed to the driver through result(), as a pool would
            future.set_exception(exc)
        return [future]

    def close(self) -> None:
        self._queued.clear()


class ProcessExecutor(Executor):
    """Local worker processes (``spawn``: a forked torch with live threads can deadlock)."""

    name = "processes"

    def __init__(self, workers: int, threads_per_worker: int = 1) -> None:
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self._pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn")
        )

    def submit(self, fn: Callable[[Any], Any], arg: Any) -> Future:
        return self._pool.submit(fn, arg)

    def share(self, obj: Any) -> Any:
        """A pickle in a private temporary file: each worker process reads it once and keeps it
        (a pool has no way to send something to every worker, nor to one chosen worker)."""
        fd, path = tempfile.mkstemp(prefix="blindspots-shared-", suffix=".pkl")
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)
        return _SharedFile(path)

    def unshare(self, handle: Any) -> None:
        if isinstance(handle, _SharedFile):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(handle.path)

    def wait(self, pending: Collection[Any]) -> list[Any]:
        return list(wait_futures(pending, return_when=FIRST_COMPLETED).done)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor(Executor):
    """Tasks on a ``dask.distributed`` cluster: an existing scheduler, or a local one.

    ``scheduler`` is an address such as ``tcp://10.0.0.5:8786``; without it a
    ``LocalCluster`` of ``workers`` single-threaded worker processes is started (and stopped on
    :meth:`close`). ``client`` adopts a client the caller manages (tests, notebooks).
    """

    name = "dask"

    def __init__(
        self,
        scheduler: str | None = None,
        workers: int = 2,
        threads_per_worker: int = 1,
        client: Any = None,
    ) -> None:
        dask = _dask()
        self.threads_per_worker = threads_per_worker
        self._cluster = None
        self._owns_client = client is None
        if client is not None:
            self._client = client
        elif scheduler is not None:
            self._client = _connect(scheduler)
        else:
            self._cluster = dask.LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
            self._client = dask.Client(self._cluster)
        self.workers = max(1, len(self._client.scheduler_info().get("workers", {})) or workers)

    def submit(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        # pure=False: two identical submissions (a retry) must both run.
        return self._client.submit(fn, arg, pure=False)

    def share(self, obj: Any) -> Any:
        """Scattered to every worker now (workers that join later fetch it from a peer); a task
        whose argument holds the future gets the worker's deserialised copy."""
        return self._client.scatter(obj, broadcast=True, hash=False)

    def unshare(self, handle: Any) -> None:
        with contextlib.suppress(Exception):  # a closed client has released it already
            handle.release()

    def wait_for_workers(self, count: int, timeout: float = 120.0) -> None:
        """Block until ``count`` workers have joined (a cluster started beside the driver)."""
        try:
            self._client.wait_for_workers(count, timeout=timeout)
        except TimeoutError:
            raise BlindspotsError(
                f"only {len(self._client.nthreads())} of {count} Dask workers joined "
                f"within {timeout:g} s"
            ) from None
        self.workers = max(self.workers, count)

    def slots(self) -> int:
        """Worker threads the scheduler has *now*: a cluster's workers may join after the start."""
        try:
            live = sum(self._client.nthreads().values())
        except (OSError, TimeoutError):  # scheduler briefly unreachable: keep the last count
            live = 0
        return max(1, live or self.workers)

    def wait(self, pending: Collection[Any]) -> list[Any]:
        return list(_dask().wait(list(pending), return_when="FIRST_COMPLETED").done)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None


# ---------------------------------------------------------------------------- label fan-out
@dataclass(frozen=True)
class _Inline:
    """A shared object that stays in this process (serial executor)."""

    obj: Any


@dataclass(frozen=True)
class _SharedFile:
    """A shared object pickled in a file every local worker process can read."""

    path: str


_SHARED_CACHE: OrderedDict[str, Any] = OrderedDict()
_SHARED_CACHE_SIZE = 2
"""Shared objects a worker process keeps (a scan's oracle and images; the previous scan's may
still be needed by a straggling task)."""


def resolve_shared(handle: Any) -> Any:
    """The object behind a :meth:`Executor.share` handle, where the task runs."""
    if isinstance(handle, _Inline):
        return handle.obj
    if isinstance(handle, _SharedFile):
        if handle.path not in _SHARED_CACHE:
            with open(handle.path, "rb") as fh:
                _SHARED_CACHE[handle.path] = pickle.load(fh)
            while len(_SHARED_CACHE) > _SHARED_CACHE_SIZE:
                _SHARED_CACHE.popitem(last=False)
        return _SHARED_CACHE[handle.path]
    return handle  # Dask has already put the worker's copy in the future's place


def _run_labels(task: tuple[Callable[[Any, Any], Any], Any, list[Any]]) -> list[Any]:
    """Worker side of one chunk of a label map: ``fn(shared, item)`` for each item, in order."""
    fn, handle, items = task
    shared = resolve_shared(handle)
    return [fn(shared, item) for item in items]


class _ExecutorTasks:
    """One open scan on an executor; see :class:`ExecutorLabelMap`."""

    def __init__(self, executor: Executor, shared: Any) -> None:
        self.executor = executor
        self.handle: Any = executor.share(shared)

    def map(self, fn: Callable[[Any, Any], Any], items: Sequence[Any]) -> list[Any]:
        if self.handle is None:
            raise BlindspotsError("this label map was closed; open a new one")
        chunks = _chunks(list(items), self.executor.slots())
        pending = {self.executor.submit(_run_labels, (fn, self.handle, c)): i for i, c in chunks}
        results: dict[int, list[Any]] = {}
        while pending:
            for handle in self.executor.wait(list(pending)):
                results[pending.pop(handle)] = handle.result()
        return [r for i in sorted(results) for r in results[i]]

    def close(self) -> None:
        if self.handle is not None:
            self.executor.unshare(self.handle)
            self.handle = None


def _chunks(items: list[Any], parts: int) -> list[tuple[int, list[Any]]]:
    """``items`` in at most ``parts`` contiguous chunks whose sizes differ by at most one."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append((i, items[start:end]))
        start = end
    return [(i, c) for i, c in out if c]


class ExecutorLabelMap:
    """An :class:`Executor` as the :class:`defenses.fanout.LabelMap` a defense is given.

    Each :meth:`~_ExecutorTasks.map` call (one Neural Cleanse step) becomes one task per free
    worker slot, each a contiguous chunk of the items: labels cost the same per step, so equal
    chunks balance, and per-task overhead (a round trip to a process or a Dask worker) is paid
    once per worker and step instead of once per label. The shared object goes out once per
    scan (:meth:`Executor.share`); results come back in item order whatever finishes first.
    """

    def __init__(self, executor: Executor) -> None:
        self.executor = executor

    def open(self, shared: Any) -> _ExecutorTasks:
        return _ExecutorTasks(self.executor, shared)

    def describe(self) -> str:
        return self.executor.describe()


class _SecededTasks:
    """An open scan from inside a Dask task; closing it rejoins the worker's thread pool."""

    def __init__(self, shared: Any) -> None:
        self._context = _dask().worker_client(separate_thread=True)
        client = self._context.__enter__()
        try:
            self._tasks: _ExecutorTasks | None = _ExecutorTasks(DaskExecutor(client=client), shared)
        except BaseException:
            self._context.__exit__(None, None, None)
            raise

    def map(self, fn: Callable[[Any, Any], Any], items: Sequence[Any]) -> list[Any]:
        if self._tasks is None:
            raise BlindspotsError("this label map was closed; open a new one")
        return self._tasks.map(fn, items)

    def close(self) -> None:
        if self._tasks is not None:
            self._tasks.close()
            self._tasks = None
            self._context.__exit__(None, None, None)


class DaskWorkerLabelMap:
    """From inside a Dask task: a label map over the cluster that runs the task.

    Each scan secedes the calling task from its worker's thread pool (``worker_client``) for as
    long as it is open, so the label tasks it submits can use that worker's thread too and a
    cluster busy with cells cannot deadlock on them; the rest of the cell keeps its slot.
    """

    def open(self, shared: Any) -> _SecededTasks:
        return _SecededTasks(shared)

    def describe(self) -> str:
        workers = len(_dask().get_client().scheduler_info().get("workers", {}))
        return f"dask ({workers} worker{'s' if workers != 1 else ''})"


@functools.cache
def _dask() -> ModuleType:
    """The ``distributed`` package (the optional [dask] extra), imported on first use: it costs
    about 0.4 s, which every ``blindspots`` command paid before; or the one-line error saying
    how to install it."""
    try:
        import distributed
    except ImportError:
        raise BlindspotsError(DASK_MISSING) from None
    return distributed


def _connect(scheduler: str) -> Any:
    """A client of the scheduler at ``scheduler``, or a one-line error saying why not."""
    try:
        return _dask().Client(scheduler, timeout="20s")
    except (OSError, TimeoutError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BlindspotsError(f"cannot reach the Dask scheduler at {scheduler}: {reason}") from None


def default_executor_name() -> ExecutorName:
    """Local processes on a multi-core machine, serial on a single core."""
    return "processes" if (os.cpu_count() or 1) > 1 else "serial"


def make_executor(
    name: ExecutorName | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    threads: int | None = None,
) -> Executor:
    """The executor a user asked for; ``scheduler`` implies Dask.

    ``workers`` defaults to the number of cores; ``threads`` (per worker) to 1 for parallel
    executors and to the config's own setting for serial runs.
    """
    if scheduler is not None:
        if name not in (None, "dask"):
            raise BlindspotsError(f"--scheduler runs on Dask; it cannot be combined with {name}")
        name = "dask"
    name = name or default_executor_name()
    if name not in EXECUTORS:
        raise BlindspotsError(f"unknown executor '{name}'; expected one of {', '.join(EXECUTORS)}")
    if workers is not None and workers < 1:
        raise BlindspotsError(f"workers must be at least 1, got {workers}")
    count = workers or os.cpu_count() or 1
    if name == "serial":
        return SerialExecutor(threads)
    if name == "processes":
        return ProcessExecutor(count, threads or 1)
    return DaskExecutor(scheduler=scheduler, workers=count, threads_per_worker=threads or 1)
