"""Append-only result store: a crash mid-run loses no finished result.

Every finished cell (one model × precision, with its metrics and defense results) is appended
to ``results.jsonl`` as one line and flushed to disk before the next cell starts; per-sample
scores and small arrays go to ``arrays/<cell>.npz``. A rerun with the same output folder reads
the store and skips the cells already there. Reports are rebuilt from the store alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def cell_id(record: dict[str, Any]) -> str:
    """Stable identity of one evaluation cell."""
    kind = "poisoned" if record["poisoned"] else "clean"
    return f"{record['dataset']}-{record['model']}-{record['attack']}-s{record['seed']}-{kind}-{record['precision']}"


class ResultStore:
    """``results.jsonl`` plus ``arrays/`` under one output folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "results.jsonl"
        self.arrays_dir = self.folder / "arrays"

    def records(self) -> list[dict[str, Any]]:
        """All complete records; a torn last line (crash while writing) is ignored."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def done(self) -> set[str]:
        return {cell_id(r) for r in self.records()}

    def append(self, record: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> None:
        """Persist one finished cell durably (arrays first, then the record that points to them)."""
        if arrays:
            self.arrays_dir.mkdir(exist_ok=True)
            target = self.arrays_dir / f"{cell_id(record)}.npz"
            np.savez_compressed(target, **arrays)
            record = {**record, "arrays": str(target.relative_to(self.folder))}
        line = json.dumps(record, sort_keys=True, default=_jsonable)
        with self.path.open("a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
