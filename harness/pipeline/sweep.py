"""Sweeps: one config expanded to cells, run on any executor, resumed and retried cell by cell.

A cell is one (dataset, model, attack, seed, poisoned/clean, precision). Its id is a content
hash (:meth:`~harness.pipeline.config.ExperimentConfig.cell_key`): the settings that determine its
numbers, the package version and the input data's bytes. A cell is *done* when the store holds
a record with that id, *failed* when its last attempt left an error, *pending* otherwise.

Work is split in two task kinds so that every finished cell reaches the store on its own:

* a **prepare** task trains one model variant (poisoned or clean control) of one seed, exports
  and quantizes it into ``artifacts/<training key>/`` — or finds all that already cached;
* a **cell** task evaluates one precision of a prepared variant and returns its record.

Cell tasks of a variant are queued once its prepare task has finished. The driver keeps at most
one task per worker in flight and fills a free worker with a ready cell before it starts training
another model, seeds in order: a sweep stopped early (a time limit, a preempted cluster) holds
whole seeds, not every model trained and few evaluated.

Workers only return records: the driver is the one writer of ``results.jsonl`` (and holds the
folder's :class:`~harness.core.runlock.RunLock`), so a worker killed mid-cell loses only that cell,
and a killed driver loses none that it had written.

Failed attempts are kept as ``failed/<cell id>.json`` (one line of error plus the traceback),
written atomically and deleted when a retry succeeds. They are not lines of ``results.jsonl``:
the store keeps the first line of a cell, so a failed line there would shadow the retry, and
every reader of the store would have to skip records without metrics.
"""

from __future__ import annotations

import itertools
import sys
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from defenses.fanout import LabelMap
from harness.core.atomic import atomic_write_json, remove_partials
from harness.core.errors import BlindspotsError, one_line
from harness.core.progress import ProgressMode
from harness.core.runlock import RunLock
from harness.core.threads import scoped_threads
from harness.pipeline.config import ExperimentConfig, input_fingerprint
from harness.pipeline.executors import (
    DaskExecutor,
    DaskWorkerLabelMap,
    Executor,
    SerialExecutor,
)
from harness.pipeline.runner import (
    EvaluationSets,
    SeedModels,
    evaluate_cell,
    evaluation_sets,
    prepare_seed,
    write_run_metadata,
)
from harness.pipeline.store import ResultStore, cell_id, read_json

Log = Callable[[str], None]
State = Literal["done", "pending", "failed"]
FAILED_DIR = "failed"
MIN_PREFIX = 4
"""Shortest cell-id prefix ``--only`` accepts (shorter ones match too much by accident)."""


@dataclass(frozen=True)
class Cell:
    """One cell of a sweep and everything a worker needs to compute it."""

    key: str
    config: ExperimentConfig
    """The single-valued config of the cell's (dataset, model, attack)."""
    seed: int
    poisoned: bool
    precision: str
    data_fingerprint: str

    @property
    def name(self) -> str:
        """The readable name the store files it under (``digits-small_cnn-badnet-s0-...``)."""
        return cell_id(self.identity())

    def identity(self) -> dict[str, Any]:
        return {
            "dataset": self.config.dataset,
            "model": self.config.model,
            "attack": self.config.attack,
            "seed": self.seed,
            "poisoned": self.poisoned,
            "precision": self.precision,
        }


@dataclass(frozen=True)
class PlannedCell:
    """A cell with its state in an output folder (``error`` only for failed cells)."""

    cell: Cell
    state: State
    error: str | None = None


def expand_cells(config: ExperimentConfig) -> list[Cell]:
    """Every cell of ``config``: datasets × models × attacks × seeds × {poisoned, clean} ×
    precisions, in that nesting order (the order ``sweep plan`` lists them)."""
    config.check_plugins()
    cells = []
    for single in config.expand():
        fingerprint = input_fingerprint(single.dataset_name, single.data_location)
        variants = [True, False] if single.clean_control else [True]
        for seed in single.seeds:
            for poisoned in variants:
                for precision in single.precisions:
                    key = single.cell_key(seed, poisoned, precision, fingerprint)
                    cells.append(Cell(key, single, seed, poisoned, precision, fingerprint))
    return cells


def plan(config: ExperimentConfig, out: str | Path | None = None) -> list[PlannedCell]:
    """Cells of ``config`` with their state in ``out`` (all pending without a folder).

    A stored cell of the same name but another content id means the folder was filled under
    other settings (or other data); mixing them would make the report compare different
    experiments, so that is an error naming the cell.
    """
    cells = expand_cells(config)
    if out is None:
        return [PlannedCell(cell, "pending") for cell in cells]
    out = Path(out)
    stored = {cell_id(r): r for r in ResultStore(out).records()} if out.is_dir() else {}
    planned = []
    for cell in cells:
        record = stored.get(cell.name)
        if record is not None:
            if "cell" not in record:
                raise BlindspotsError(
                    f"{out} holds {cell.name} from a run that recorded no cell id (an older "
                    "blindspots); use a new --out"
                )
            if record["cell"] != cell.key:
                raise BlindspotsError(
                    f"{out} already holds {cell.name} computed with other settings or data "
                    f"(cell id {record['cell']}, this config gives {cell.key}); use a new --out"
                )
            planned.append(PlannedCell(cell, "done"))
            continue
        failure = _failure_path(out, cell.key)
        if failure.is_file():
            error = read_json(failure).get("error", "unknown error")
            planned.append(PlannedCell(cell, "failed", str(error)))
        else:
            planned.append(PlannedCell(cell, "pending"))
    return planned


def select(
    planned: Sequence[PlannedCell], only: Sequence[str] = (), retry_failed: bool = False
) -> tuple[list[PlannedCell], list[Cell]]:
    """The cells a run is about (its scope) and those of them it should compute.

    Without ``only`` the scope is the whole sweep and the run computes pending cells, plus
    failed ones with ``retry_failed`` (not by default: one broken cell must not cost its full
    time on every rerun). ``only`` names cells by id, unique id prefix (≥ 4 characters) or
    readable name; those that are not done are computed, failed or not.
    """
    scope = _named(planned, only) if only else list(planned)
    rerun_failed = retry_failed or bool(only)
    to_run = [
        p.cell for p in scope if p.state == "pending" or (p.state == "failed" and rerun_failed)
    ]
    return scope, to_run


def _named(planned: Sequence[PlannedCell], tokens: Sequence[str]) -> list[PlannedCell]:
    """The planned cells ``tokens`` name, each token matching exactly one cell."""
    chosen: dict[str, PlannedCell] = {}
    for token in tokens:
        matches = [
            p
            for p in planned
            if p.cell.name == token or (len(token) >= MIN_PREFIX and p.cell.key.startswith(token))
        ]
        if not matches:
            raise BlindspotsError(f"no cell of this sweep matches '{token}' (see 'sweep plan')")
        if len(matches) > 1:
            raise BlindspotsError(
                f"'{token}' matches {len(matches)} cells; give more characters of the id"
            )
        chosen[matches[0].cell.key] = matches[0]
    return list(chosen.values())


# --- tasks (module-level and picklable: they run in worker processes) -----------------------


@dataclass(frozen=True)
class PrepareTask:
    """Train / export / quantize one model variant of one seed into ``out``'s artifact cache."""

    config: ExperimentConfig
    seed: int
    poisoned: bool
    out: str
    data_fingerprint: str
    threads: int | None
    progress: ProgressMode = False
    """Training progress: a bar only where one task runs at a time in the driver's terminal;
    parallel workers print timestamped lines naming their model, which interleave cleanly."""


@dataclass(frozen=True)
class PrepareOutcome:
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    traceback: str | None = None


@dataclass(frozen=True)
class CellTask:
    """Evaluate one cell of a prepared variant."""

    cell: Cell
    out: str
    threads: int | None
    prepare_timings: dict[str, float]
    """Training / quantization times of the prepare task, recorded with the cell."""
    fan_out_labels: bool = False
    """Run the cell's per-label defense tasks on the cluster the cell runs on (Dask)."""


@dataclass(frozen=True)
class CellOutcome:
    record: dict[str, Any] | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    error: str | None = None
    traceback: str | None = None


_PREPARED: OrderedDict[tuple[str, int, bool, str], tuple[SeedModels, EvaluationSets]] = (
    OrderedDict()
)
"""Per worker process: the last prepared variants, so a worker's next cell of the same model
does not reload data and models (two entries: a poisoned model and its clean control)."""
_PREPARED_SIZE = 2


def run_prepare(task: PrepareTask) -> PrepareOutcome:
    """Worker side of a prepare task; an exception becomes the outcome's one-line error."""
    with thread_limit(task.threads):
        config = _with_threads(task.config, task.threads)
        try:
            models = prepare_seed(
                config,
                task.seed,
                Path(task.out),
                _silent,
                [task.poisoned],
                data_fingerprint=task.data_fingerprint,
                progress=task.progress,
            )
        except Exception as exc:
            return PrepareOutcome(error=error_line(exc), traceback=traceback.format_exc())
    return PrepareOutcome(timings=models.timings[task.poisoned])


def run_cell(task: CellTask) -> CellOutcome:
    """Worker side of a cell task: the cell's record and arrays, or its one-line error."""
    cell = task.cell
    with thread_limit(task.threads):
        config = _with_threads(cell.config, task.threads)
        try:
            models, sets = _prepared(config, cell, Path(task.out))
            timings = {**models.timings[cell.poisoned], **task.prepare_timings}
            models = replace(models, timings={**models.timings, cell.poisoned: timings})
            # passed only when set, so evaluate_cell's stand-ins in tests keep their signature
            fan_out = _cell_label_map(task.fan_out_labels)
            extra = {} if fan_out is None else {"label_map": fan_out}
            record, arrays = evaluate_cell(
                config, models, sets, cell.poisoned, cell.precision, _silent, **extra
            )
        except Exception as exc:
            return CellOutcome(error=error_line(exc), traceback=traceback.format_exc())
    return CellOutcome(record=record, arrays=arrays)


def _cell_label_map(fan_out: bool) -> LabelMap | None:
    """The cluster's label map inside a Dask task that asked for one, else None (in process).

    Local worker processes already run one cell each on every core, so only a Dask cell
    spreads its labels: over every worker of the cluster, its own included.
    """
    return DaskWorkerLabelMap() if fan_out else None


def _prepared(config: ExperimentConfig, cell: Cell, out: Path) -> tuple[SeedModels, EvaluationSets]:
    """The cell's variant from this process's small cache, else from the artifact cache."""
    key = (config.model_dump_json(), cell.seed, cell.poisoned, str(out))
    if key in _PREPARED:
        _PREPARED.move_to_end(key)
        return _PREPARED[key]
    models = prepare_seed(
        config,
        cell.seed,
        out,
        _silent,
        [cell.poisoned],
        data_fingerprint=cell.data_fingerprint,
        progress=False,
    )
    _PREPARED[key] = (models, evaluation_sets(config, models))
    while len(_PREPARED) > _PREPARED_SIZE:
        _PREPARED.popitem(last=False)
    return _PREPARED[key]


def clear_prepared_cache() -> None:
    """Drop this process's prepared models (the serial executor runs tasks in the driver)."""
    _PREPARED.clear()


@contextmanager
def thread_limit(threads: int | None) -> Iterator[None]:
    """At most ``threads`` torch, OpenMP and BLAS threads inside (no limit for None)."""
    if threads is None:
        yield
        return
    with scoped_threads(torch, threads), threadpool_limits(limits=threads):
        yield


def _with_threads(config: ExperimentConfig, threads: int | None) -> ExperimentConfig:
    """The config with the executor's thread count (threads never change a cell's id)."""
    return config if threads is None else config.model_copy(update={"threads": threads})


def _silent(_: str) -> None:
    """Workers stay quiet: the driver reports each finished cell."""


def error_line(exc: BaseException) -> str:
    """An exception as the one line a user sees; a library error is prefixed with its type."""
    if isinstance(exc, BlindspotsError) or not str(exc).strip():
        return one_line(exc, first_line=True)
    return f"{type(exc).__name__}: {one_line(exc, first_line=True, limit=500)}"


# --- the driver -----------------------------------------------------------------------------


@dataclass
class SweepSummary:
    """What one ``sweep run`` did; ``exit_code`` is 0 when every cell in its scope is done."""

    selected: int
    """Cells the run set out to compute."""
    failed_before: int = 0
    """Cells in scope whose earlier failure was kept, not retried (no --retry-failed)."""
    done: int = 0
    failed: int = 0
    not_run: int = 0
    wall_s: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 0 if self.done == self.selected and not self.failed_before else 1


@dataclass
class _Queued:
    """A task waiting for a free worker."""

    rank: tuple[int, int, int]
    fn: Callable[[Any], Any]
    task: Any
    tag: tuple[str, Any]
    cells: list[Cell]


@dataclass
class _Driver:
    """Submits tasks, writes finished cells and failures; the only writer of the folder."""

    executor: Executor
    out: Path
    store: ResultStore
    summary: SweepSummary
    log: Log
    pending: dict[Any, tuple[str, Any]] = field(default_factory=dict)
    backlog: list[_Queued] = field(default_factory=list)
    """Tasks not yet handed to the executor, taken in :attr:`_Queued.rank` order."""
    arrivals: Iterator[int] = field(default_factory=itertools.count)

    def start(self, cells: Sequence[Cell]) -> None:
        """One prepare task per (config, seed, variant) that has selected cells."""
        groups: dict[tuple[str, int, bool], list[Cell]] = {}
        for cell in cells:
            key = (cell.config.model_dump_json(), cell.seed, cell.poisoned)
            groups.setdefault(key, []).append(cell)
        for members in sorted(groups.values(), key=lambda m: (m[0].seed, not m[0].poisoned)):
            first = members[0]
            task = PrepareTask(
                first.config,
                first.seed,
                first.poisoned,
                str(self.out),
                first.data_fingerprint,
                self.executor.threads_per_worker,
                progress=True if isinstance(self.executor, SerialExecutor) else "lines",
            )
            self._enqueue(run_prepare, task, ("prepare", members), members, kind_rank=1)
        self._fill()

    def drain(self) -> None:
        """Handle finished tasks until none is running or queued."""
        while self.pending:
            for handle in self.executor.wait(list(self.pending)):
                kind, payload = self.pending.pop(handle)
                try:
                    outcome = handle.result()
                except Exception as exc:  # the worker died (killed, out of memory, ...)
                    cells = payload if kind == "prepare" else [payload.cell]
                    self._lost(cells, exc)
                    continue
                if kind == "prepare":
                    self._prepared(payload, outcome)
                else:
                    self._finished(payload.cell, outcome)
            self._fill()

    def _prepared(self, cells: list[Cell], outcome: PrepareOutcome) -> None:
        if outcome.error is not None:
            for cell in cells:
                self._failed(cell, f"training/quantization failed: {outcome.error}", outcome)
            return
        for cell in cells:
            task = CellTask(
                cell,
                str(self.out),
                self.executor.threads_per_worker,
                outcome.timings,
                fan_out_labels=isinstance(self.executor, DaskExecutor),
            )
            self._enqueue(run_cell, task, ("cell", task), [cell], kind_rank=0)

    def _enqueue(
        self,
        fn: Callable[[Any], Any],
        task: Any,
        tag: tuple[str, Any],
        cells: Sequence[Cell],
        kind_rank: int,
    ) -> None:
        """Queue a task: cells before training, lower seeds first, in arrival order otherwise."""
        rank = (kind_rank, cells[0].seed, next(self.arrivals))
        self.backlog.append(_Queued(rank, fn, task, tag, list(cells)))

    def _fill(self) -> None:
        """Hand queued tasks to the executor until every worker has one (workers may join)."""
        self.backlog.sort(key=lambda queued: queued.rank)
        slots = self.executor.slots()
        while self.backlog and len(self.pending) < slots:
            queued = self.backlog.pop(0)
            self._submit(queued.fn, queued.task, queued.tag, queued.cells)

    def _submit(
        self, fn: Callable[[Any], Any], task: Any, tag: tuple[str, Any], cells: Sequence[Cell]
    ) -> None:
        """Queue a task; a pool that a dead worker broke refuses it, and its cells stay pending."""
        try:
            self.pending[self.executor.submit(fn, task)] = tag
        except Exception as exc:
            self._lost(cells, exc)

    def _finished(self, cell: Cell, outcome: CellOutcome) -> None:
        if outcome.error is not None or outcome.record is None:
            self._failed(cell, outcome.error or "no record returned", outcome)
            return
        self.store.append(outcome.record, outcome.arrays)
        _failure_path(self.out, cell.key).unlink(missing_ok=True)
        self.summary.done += 1
        record = outcome.record
        self.log(
            f"[{self._progress()}] done {cell.key} {cell.name}: clean_acc={record['clean_acc']:.4f}"
            f" asr={record['asr']:.4f} agreement_fp32={record['agreement_fp32']:.4f}"
        )

    def _failed(self, cell: Cell, error: str, outcome: PrepareOutcome | CellOutcome) -> None:
        atomic_write_json(
            _failure_path(self.out, cell.key),
            {
                "cell": cell.key,
                **cell.identity(),
                "error": error,
                "traceback": outcome.traceback,
                "failed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )
        self.summary.failed += 1
        self.summary.errors[cell.key] = error
        self.log(f"[{self._progress()}] FAILED {cell.key} {cell.name}: {error}")

    def _lost(self, cells: Sequence[Cell], exc: BaseException) -> None:
        """A worker that died took its task along: the cells stay pending (nothing to blame)."""
        self.summary.not_run += len(cells)
        self.log(f"worker lost ({error_line(exc)}); {len(cells)} cell(s) left pending")

    def _progress(self) -> str:
        finished = self.summary.done + self.summary.failed + self.summary.not_run
        return f"{finished}/{self.summary.selected}"


def run_sweep(
    config: ExperimentConfig,
    out: str | Path,
    executor: Executor,
    *,
    only: Sequence[str] = (),
    retry_failed: bool = False,
    log: Log = print,
) -> SweepSummary:
    """Compute the selected cells of ``config`` into ``out`` on ``executor``.

    Holds the folder's run lock throughout, so a second run on it refuses in one line.
    """
    out = Path(out)
    started = time.perf_counter()
    with RunLock(out):
        remove_partials(out)  # temporary files of writers killed earlier; none runs now
        scope, cells = select(plan(config, out), only, retry_failed)
        write_run_metadata(config, out)
        kept = sum(p.state == "failed" and p.cell not in cells for p in scope)
        summary = SweepSummary(selected=len(cells), failed_before=kept)
        if kept:
            log(f"sweep: {kept} failed cell(s) kept as they are (--retry-failed retries them)")
        log(f"sweep: {len(cells)} cell(s) to compute on {executor.describe()} into {out}")
        driver = _Driver(executor, out, ResultStore(out), summary, log)
        try:
            driver.start(cells)
            driver.drain()
        finally:
            clear_prepared_cache()
    summary.wall_s = time.perf_counter() - started
    return summary


def _failure_path(out: Path, key: str) -> Path:
    return out / FAILED_DIR / f"{key}.json"


def count_states(planned: Sequence[PlannedCell]) -> dict[str, int]:
    """``{"done": n, "pending": m, "failed": k}`` for a plan."""
    counts = {"done": 0, "pending": 0, "failed": 0}
    for item in planned:
        counts[item.state] += 1
    return counts


def stderr_log(message: str) -> None:
    """Timestamped driver log line on stderr (stdout stays for tables)."""
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"{stamp} {message}", file=sys.stderr, flush=True)
