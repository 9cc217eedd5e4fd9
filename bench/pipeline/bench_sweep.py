"""How much faster does a sweep finish on 2 workers than on 1 — locally and on Dask?

One digits sweep (2 seeds × poisoned/clean × 3 precisions = 12 cells, ``small_cnn`` trained 15
epochs, four defenses at modest budgets; about a minute serially on one core) is run from
scratch, each time into a fresh folder, so training, quantization and every defense are part
of each measurement:

- ``serial``: in this process, 1 thread;
- ``processes-1`` / ``processes-2``: local worker processes (1 thread each);
- ``dask-2``: a 2-worker ``dask.distributed.LocalCluster`` (1 thread each).

Reported: wall seconds per mode (worker start-up included: that is what a user waits for),
the speed-ups processes-2 / processes-1 and dask-2 / serial, and whether every mode produced
the same metrics and verdicts per cell. With ``--rounds N`` the modes are run N times in
alternating order (a shared machine's load then hits all modes alike) and the median is kept.
The CPU model, core count and load average are printed with the numbers.

Usage: ``python -m bench.pipeline.bench_sweep [--rounds 1] [--json out.json] [--modes serial,...]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._cpu import cpu_label
from harness.pipeline.config import ExperimentConfig, build_config
from harness.pipeline.executors import DaskExecutor, Executor, ProcessExecutor, SerialExecutor
from harness.pipeline.store import ResultStore
from harness.pipeline.sweep import run_sweep

SWEEP: dict[str, Any] = {
    "dataset": "digits",
    "model": "small_cnn",
    "attack": "badnet",
    "attack_params": {"patch_size": 2, "margin": 0, "poison_rate": 0.1, "target_label": 0},
    "training": {"epochs": 15, "batch_size": 64},
    "seeds": [0, 1],
    "precisions": ["fp32", "int8-dynamic", "int8-static"],
    "defenses": ["neural_cleanse", "activation_clustering", "spectral_signatures", "strip"],
    "defense_params": {
        "neural_cleanse": {"steps": 60, "n_samples": 64, "batch_size": 32, "torch_threads": 1},
        "strip": {"n_overlays": 30, "n_test": 100},
    },
    "threads": 1,
}

MODES: dict[str, Callable[[], Executor]] = {
    "serial": lambda: SerialExecutor(),
    "processes-1": lambda: ProcessExecutor(workers=1),
    "processes-2": lambda: ProcessExecutor(workers=2),
    "dask-2": lambda: DaskExecutor(workers=2),
}


def outcomes(folder: Path) -> dict[str, Any]:
    """Per cell id: metrics and verdicts (what must not depend on the executor)."""
    return {
        r["cell"]: [
            r["clean_acc"],
            r["asr"],
            r["agreement_fp32"],
            {name: [res["status"], res["detected"]] for name, res in r["defenses"].items()},
        ]
        for r in ResultStore(folder).records()
    }


def time_mode(name: str, config: ExperimentConfig, scratch: Path) -> tuple[float, dict]:
    """Wall seconds of one full sweep in ``name`` mode, executor start-up included."""
    out = scratch / f"{name}-{time.monotonic_ns()}"
    started = time.perf_counter()
    with MODES[name]() as executor:
        summary = run_sweep(config, out, executor, log=lambda _: None)
    wall = time.perf_counter() - started
    if summary.exit_code != 0:
        raise SystemExit(f"{name}: {summary.failed} cell(s) failed: {summary.errors}")
    return wall, outcomes(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    config = build_config(SWEEP)
    walls: dict[str, list[float]] = {m: [] for m in modes}
    results: dict[str, dict] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as scratch:
        for round_index in range(args.rounds):
            order = modes if round_index % 2 == 0 else modes[::-1]
            for mode in order:
                wall, results[mode] = time_mode(mode, config, Path(scratch))
                walls[mode].append(wall)
                print(f"round {round_index + 1} {mode}: {wall:.1f}s", flush=True)
    median = {m: statistics.median(w) for m, w in walls.items()}
    reference = results[modes[0]]
    report = {
        "cpu": cpu_label(),
        "cores": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cells": len(reference),
        "rounds": args.rounds,
        "wall_s": walls,
        "median_wall_s": median,
        "same_results_as_" + modes[0]: {m: results[m] == reference for m in modes},
    }
    if {"processes-1", "processes-2"} <= median.keys():
        report["speedup_processes_2_vs_1"] = median["processes-1"] / median["processes-2"]
    if {"serial", "dask-2"} <= median.keys():
        report["speedup_dask_2_vs_serial"] = median["serial"] / median["dask-2"]
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
