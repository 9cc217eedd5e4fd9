"""Append-only result store: a crash mid-run loses no finished result and recomputes none.

Every finished cell (one model × precision, with its metrics and defense results) is appended
to ``results.jsonl`` as one line and fsynced before the next cell starts; per-sample scores and
small arrays go to ``arrays/<cell>.npz``, written atomically before the line that points to
them. A rerun with the same output folder reads the store and skips the cells already there.
Reports are rebuilt from the store alone. JSON Lines stays the format: one cell is one line a
person can ``grep``, and an append either added a whole line or (after a crash) a torn tail.

What a crash or a second writer can leave behind, and what the store does about it:

* a torn last line (SIGKILL mid-write, a full disk, a power loss that kept the size but not the
  data): before the next append, :meth:`ResultStore.repair` cuts the file back to its last
  complete line and keeps the fragment in ``results.jsonl.torn-<UTC time>``, so a new record is
  never glued onto the fragment (which would hide both);
* a line that is not a JSON object with the cell's identity fields (hand edits, old damage):
  skipped with a warning naming the line, never a ``KeyError`` later (a report also skips
  records without the metrics it computes with, see :class:`FinishedCell`);
* two lines for the same cell (two writers on one folder before :mod:`harness.core.runlock`): the
  first is kept, the repeat reported.

Warnings go to the ``harness.pipeline.store`` logger (printed on stderr when nothing configures
logging).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from harness.core.atomic import (
    atomic_target,
    atomic_write_bytes,
    fsync_directory,
    write_all,
    write_error,
)
from harness.core.errors import DataError

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.jsonl"
TORN_SUFFIX = ".torn-"
_TAIL_CHUNK = 1 << 16


class CellKey(BaseModel):
    """The fields that identify a cell; a stored line without them cannot be resumed or reported.

    Strict: ``"seed": "0"`` or ``"poisoned": "yes"`` would give a cell id that no run produces.
    """

    model_config = ConfigDict(extra="allow", strict=True)

    dataset: str
    model: str
    attack: str
    seed: int
    poisoned: bool
    precision: str


class DefenseOutcome(BaseModel):
    """The part of a stored defense result that reports compute with."""

    model_config = ConfigDict(extra="allow", strict=True)

    status: str
    detected: bool | None = None
    score: float | None = None
    wall_time_s: float = 0.0


class KernelDrift(BaseModel):
    """The same cell under the other INT8 kernel profile (only where the host's kernels differ)."""

    model_config = ConfigDict(extra="allow", strict=True)

    clean_acc: float
    asr: float
    agreement_fp32: float
    kernels: dict[str, Any] = {}
    defenses: dict[str, dict[str, Any]] = {}


class FinishedCell(CellKey):
    """A cell the runner finished: what a report needs from every record it renders."""

    clean_acc: float
    asr: float
    agreement_fp32: float
    defenses: dict[str, DefenseOutcome] = {}
    kernel_drift: KernelDrift | None = None


def cell_id(record: dict[str, Any]) -> str:
    """Stable identity of one evaluation cell."""
    kind = "poisoned" if record["poisoned"] else "clean"
    parts = (record["dataset"], record["model"], record["attack"], f"s{record['seed']}", kind)
    return "-".join(str(part) for part in (*parts, record["precision"]))


@dataclass
class StoreContents:
    """What :meth:`ResultStore.read` found: usable records, in order, and what it set aside."""

    records: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class ResultStore:
    """``results.jsonl`` plus ``arrays/`` under one output folder.

    Reading never modifies the file (a report may run while a run appends). Only the writer —
    the process holding the folder's :class:`~harness.core.runlock.RunLock` — repairs or appends.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / RESULTS_NAME
        self.arrays_dir = self.folder / "arrays"
        self._warned: set[str] = set()

    def read(self, schema: type[CellKey] = CellKey) -> StoreContents:
        """Every record valid under ``schema`` once, plus one line per line skipped (not logged).

        ``CellKey`` (the default) asks only for a cell's identity, which resuming needs;
        ``FinishedCell`` also asks for the metrics and defense outcomes a report computes with.
        """
        contents = StoreContents()
        if not self.path.is_file():
            return contents
        seen: dict[str, int] = {}
        try:
            lines = self.path.read_bytes().split(b"\n")
        except OSError as exc:
            raise write_error(self.path, exc, "read") from None
        complete, tail = lines[:-1], lines[-1]
        for number, raw in enumerate(complete, start=1):
            record, problem = _parse_line(raw, schema)
            if record is None:
                if problem:
                    contents.problems.append(f"{self.path} line {number}: {problem}; skipped")
                continue
            cell = cell_id(record)
            if cell in seen:
                contents.problems.append(
                    f"{self.path} line {number} repeats cell {cell} of line {seen[cell]} "
                    "(two runs wrote this folder?); kept the first"
                )
                continue
            seen[cell] = number
            contents.records.append(record)
        if tail.strip(b"\0 \t\r"):
            contents.problems.append(
                f"{self.path} ends in an incomplete line of {len(tail)} bytes (a run still "
                "writing it, or one killed mid-write); ignored"
            )
        return contents

    def records(self, schema: type[CellKey] = CellKey) -> list[dict[str, Any]]:
        """Records valid under ``schema`` (first copy of each cell); problems logged once each."""
        contents = self.read(schema)
        for problem in contents.problems:
            if problem not in self._warned:
                self._warned.add(problem)
                logger.warning(problem)
        return contents.records

    def done(self) -> set[str]:
        return {cell_id(r) for r in self.records()}

    def repair(self) -> str | None:
        """Cut a torn tail off ``results.jsonl``, keeping it aside; returns (and logs) what it did.

        The tail is whatever follows the last newline, or the last line itself when it is not a
        JSON object (a power loss can leave a line of NUL bytes). The fragment is saved to
        ``results.jsonl.torn-<UTC time>`` *before* the store is truncated, so a crash in between
        loses nothing. Call it only while holding the folder's run lock.
        """
        if not self.path.is_file():
            return None
        try:
            keep = _end_of_last_good_line(self.path)
            size = self.path.stat().st_size
            if keep == size:
                return None
            with self.path.open("rb") as fh:
                fh.seek(keep)
                fragment = fh.read()
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            aside = self.path.with_name(f"{self.path.name}{TORN_SUFFIX}{stamp}")
            atomic_write_bytes(aside, fragment)
            with self.path.open("r+b") as fh:
                fh.truncate(keep)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise write_error(self.path, exc, "repair") from None
        message = (
            f"{self.path}: cut off a torn last line of {len(fragment)} bytes (a run killed, or a "
            f"disk full, while writing it); kept it in {aside.name}"
        )
        logger.warning(message)
        return message

    def append(self, record: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> None:
        """Persist one finished cell durably (arrays first, then the record that points to them).

        The line is written with one ``O_APPEND`` write and fsynced. A failed write (full disk)
        is cut back off before the one-line error is raised, and a torn tail left by an earlier
        crash is repaired first, so the store always ends in a complete line.
        """
        if arrays:
            target = self.arrays_dir / f"{cell_id(record)}.npz"
            with atomic_target(target) as partial:
                # No pickles: the report reads these files with allow_pickle=False, so an object
                # array is refused here, where it is made, not there.
                np.savez_compressed(partial, allow_pickle=False, **arrays)
            record = {**record, "arrays": str(target.relative_to(self.folder))}
        line = (json.dumps(record, sort_keys=True, default=_jsonable) + "\n").encode()
        self.repair()  # cheap when intact: reads only the last line
        created = not self.path.exists()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as exc:
            raise write_error(self.path, exc) from None
        size = os.fstat(fd).st_size
        try:
            write_all(fd, line)
            os.fsync(fd)
            if created:
                fsync_directory(self.folder)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise write_error(self.path, exc) from None
        finally:
            os.close(fd)


def read_json(path: str | Path) -> Any:
    """A JSON metadata file of a run folder, or a one-line ``DataError`` naming the damage."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise DataError(f"{path} not found") from None
    except OSError as exc:
        raise write_error(path, exc, "read") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise DataError(f"{path} is damaged (not valid JSON: {reason})") from None


def _is_json_object(raw: bytes) -> bool:
    """Whether a stored line survived intact (a record or a blank line); no schema check."""
    if not raw.strip(b"\0 \t\r\n"):
        return True
    try:
        return isinstance(json.loads(raw), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


def _parse_line(raw: bytes, schema: type[CellKey]) -> tuple[dict[str, Any] | None, str | None]:
    """One stored line → (record, None), or (None, why it is unusable); blank lines are silent."""
    if not raw.strip(b"\0 \t\r"):
        return None, None
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, "not valid JSON"
    if not isinstance(record, dict):
        return None, f"a JSON {type(record).__name__}, not a record"
    try:
        schema.model_validate(record)
    except ValidationError as exc:
        return None, _schema_problem(exc)
    return record, None


def _schema_problem(exc: ValidationError) -> str:
    """'lacks seed, asr' or "'seed': Input should be a valid integer (got '0')", on one line."""
    errors = exc.errors()
    missing = [_dotted(err["loc"]) for err in errors if err["type"] == "missing"]
    if missing:
        return f"lacks {', '.join(missing)}"
    err = errors[0]
    got = repr(err["input"])
    got = got if len(got) <= 60 else got[:57] + "..."
    return f"'{_dotted(err['loc'])}': {err['msg']} (got {got})"


def _dotted(location: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in location)


def _end_of_last_good_line(path: Path) -> int:
    """Byte offset just past the last line that is complete and a JSON object.

    Reads backwards in chunks: a store of thousands of cells is not read whole to find its tail.
    """
    with path.open("rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        cut = _last_newline_before(fh, end)
        if cut < end:  # text after the last newline: torn
            return cut
        if cut == 0:
            return 0
        start = _last_newline_before(fh, cut - 1)
        fh.seek(start)
        last_line = fh.read(cut - start)
    return cut if _is_json_object(last_line) else start


def _last_newline_before(fh: Any, end: int) -> int:
    """Offset just past the last ``\\n`` in ``fh[:end]`` (0 when there is none)."""
    position = end
    while position > 0:
        start = max(0, position - _TAIL_CHUNK)
        fh.seek(start)
        chunk = fh.read(position - start)
        found = chunk.rfind(b"\n")
        if found >= 0:
            return start + found + 1
        position = start
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
