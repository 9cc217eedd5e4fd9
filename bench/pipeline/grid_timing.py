"""Where a sweep's wall time went: training, export + quantization, evaluation, each defense.

A finished run folder already holds every number this needs — each cell's record carries the
timings of the model it was cut from (``train_s``, ``export_s`` for the ONNX export,
``quantize_<precision>_s`` per precision, ``evaluate_s`` for accuracy and ASR) and each
defense's ``wall_time_s`` — so the split is read from the store, not re-measured. A model's training and export are shared
by its precisions' cells and counted once per model.

Seconds are worker seconds (one thread each in a parallel sweep), so the totals add up to more
than the sweep's wall time when workers ran side by side.

Usage: ``python -m bench.pipeline.grid_timing RUN_FOLDER [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from harness.core.errors import BlindspotsError
from harness.pipeline.store import ResultStore


def timing_split(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals per phase and mean seconds per (defense, precision) over the store's records."""
    if not records:
        raise BlindspotsError("the run folder has no finished cells to time")
    models: dict[tuple[str, ...], dict[str, float]] = {}
    evaluate = 0.0
    per_defense: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        timings = record.get("timings", {})
        model_key = tuple(
            json.dumps(record.get(k), sort_keys=True)
            for k in ("dataset", "model", "attack", "attack_params", "seed", "poisoned")
        )
        models.setdefault(model_key, timings)
        evaluate += float(timings.get("evaluate_s", 0.0))
        for name, result in record.get("defenses", {}).items():
            seconds = result.get("wall_time_s")
            if seconds is not None:
                per_defense[name][record["precision"]].append(float(seconds))
    totals = {
        "train_s": sum(float(t.get("train_s", 0.0)) for t in models.values()),
        "export_quantize_s": sum(
            float(seconds)
            for t in models.values()
            for name, seconds in t.items()
            if name == "export_s" or name.startswith("quantize_")
        ),
        "evaluate_s": evaluate,
        **{f"{name}_s": sum(sum(v) for v in by_p.values()) for name, by_p in per_defense.items()},
    }
    means = {
        name: {precision: statistics.fmean(v) for precision, v in by_p.items()}
        for name, by_p in per_defense.items()
    }
    return {"models": len(models), "cells": len(records), "totals_s": totals, "mean_s": means}


def render(split: dict[str, Any]) -> str:
    """Two Markdown tables: worker seconds per phase, and mean seconds per defense × precision."""
    totals = split["totals_s"]
    grand = sum(totals.values())
    lines = [
        f"{split['models']} models, {split['cells']} cells; worker seconds per phase:",
        "",
        "| phase | worker seconds | share |",
        "|---|---:|---:|",
    ]
    for phase, seconds in totals.items():
        share = f"{seconds / grand:.1%}" if grand > 0 else "–"
        lines.append(f"| {phase.removesuffix('_s')} | {seconds:.0f} | {share} |")
    lines.append(f"| **total** | {grand:.0f} | 100% |")
    precisions = sorted({p for by_p in split["mean_s"].values() for p in by_p})
    lines += ["", "Mean seconds per cell:", "", "| defense | " + " | ".join(precisions) + " |"]
    lines.append("|---|" + "---:|" * len(precisions))
    for name, by_p in sorted(split["mean_s"].items()):
        cells = [f"{by_p[p]:.1f}" if p in by_p else "–" for p in precisions]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--json", type=Path, help="also write the split as JSON")
    args = parser.parse_args(argv)
    try:
        if not (args.folder / "results.jsonl").is_file():
            raise BlindspotsError(f"{args.folder} holds no results.jsonl (not a run folder?)")
        split = timing_split(ResultStore(args.folder).records())
    except BlindspotsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(split))
    if args.json:
        args.json.write_text(json.dumps(split, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
