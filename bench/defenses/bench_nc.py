"""Neural Cleanse scan time per precision on the GTSRB grid's model (issue #8: ≤ 60 s for 43 labels).

The setup is the grid's (``configs/grids/gtsrb_badnet.toml``): the BadNet-poisoned ``cifar_cnn`` trained
on ``../shared/data/gtsrb32.npz`` (2% poison, 4×4 checkerboard, target 1), exported and quantized to
every precision, and the runner's 500 held-out clean test images. The model is built once by the
runner's own ``prepare_seed`` (the config's recipe, the runner's seeds for poisoning and
calibration) and cached under ``runs/bench_nc/`` (about half an hour on two busy cores); later
runs reuse it.

Each precision runs Neural Cleanse with the config's parameters and the runner's defense seed, and
reports wall and CPU time, the steps spent per label, how each label ended (the paper's early
stop, the step budget, or ruled out by the adaptive label schedule), and the verdict.
``--compare-full`` also runs the paper's schedule (every label to its stopping criterion) and
checks that the verdict and flagged labels agree, and that every label the adaptive schedule ran to
the end has the same norm in both.

The machine is shared, so CPU seconds are printed next to wall seconds; the CPU's vendor, model
and INT8-relevant flags are printed too (the INT8 kernels differ without AVX-512 VNNI).

``--budget authors`` runs the authors' step content (profile ``paper``: 1000 images in
mini-batches of 32 per step), ``--budget grid`` the grids' former one (profile ``fast``); without
it the config's parameters decide. ``--executor processes|dask --workers N [--scheduler
tcp://…]`` fans each step's labels out over local worker processes or a Dask cluster (issue 20;
the result is the serial scan's, bit for bit); the scan records where its labels ran, the
steps each label took and, when labels run in this process, each label's wall seconds.
``--oracle-device cpu|auto`` says where the gradient oracle runs: only the CPU replica exists
(``auto`` picks it; ``cuda`` is refused). ``--heap system`` runs the scan without Neural
Cleanse's retained heap (:func:`harness.core.threads.retained_heap`); ``--heap retain,system``
runs both for each precision and checks that they agree to the last bit; ``system`` runs first,
and is glibc's own heap only until the process's first retained scan (its dynamic thresholds
cannot be restored), so time the two with one precision per run.

Usage: ``python -m bench.defenses.bench_nc [--precisions fp32,int8-static] [--threads 2]
[--compare-full] [--budget authors|grid] [--executor processes --workers 2]
[--oracle-device cpu|auto] [--heap retain|system|retain,system] [--params '{"steps": 3}'] [--json out.json]``; the figures in BENCHMARKS.md come from
``taskset -c 0,1 python -m bench.defenses.bench_nc --json nc.json`` on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench._cpu import cpu_description
from defenses import neural_cleanse
from defenses.base import DefenseData
from harness.core.atomic import atomic_write_json
from harness.data.base import load_dataset
from harness.pipeline.config import ExperimentConfig, load_config
from harness.pipeline.evaluate import cell_defense_data, defense_split, run_defense
from harness.pipeline.executors import EXECUTORS, make_executor
from harness.pipeline.runner import prepare_seed
from harness.runtime.adapter import RuntimeAdapter

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "grids" / "gtsrb_badnet.toml"
CACHE = ROOT / "runs" / "bench_nc"
SEED = 0
TARGET_S = 60.0


# ---------------------------------------------------------------------------------- the model
def grid_config() -> ExperimentConfig:
    """The grid's config with its data path resolved from the repository root."""
    config = load_config(CONFIG)
    if config.data_root and not Path(config.data_root).is_absolute():
        config = config.model_copy(update={"data_root": str(ROOT / config.data_root)})
    return config


def trained_artifacts(config: ExperimentConfig, folder: Path, seed: int = SEED) -> dict[str, Path]:
    """The grid's poisoned model at every precision, built once into ``folder``.

    Built by the runner itself (:func:`harness.pipeline.runner.prepare_seed`: its poisoning,
    training, export with parity check, calibration draw and quantization), so the artifacts are
    the grid's. ``folder/artifacts.json`` lists them once built, so a later bench (on another
    machine too) needs only the folder, not the data.
    """
    index = folder / "artifacts.json"
    if index.is_file():
        listed = {p: folder / rel for p, rel in json.loads(index.read_text()).items()}
        if all(p in listed and listed[p].is_file() for p in config.precisions):
            return {p: listed[p] for p in config.precisions}
    flat = {precision: folder / f"{precision}.onnx" for precision in config.precisions}
    if all(path.is_file() for path in flat.values()):
        return flat  # built by this bench before it called the runner: the same recipe and seeds
    models = prepare_seed(config, seed, folder, lambda m: print(m, flush=True), [True])
    paths = {p: models.artifacts[True][p] for p in config.precisions}
    atomic_write_json(index, {p: str(path.relative_to(folder)) for p, path in paths.items()})
    return paths


def defense_data(config: ExperimentConfig, cache: Path, seed: int = SEED) -> DefenseData:
    """The runner's held-out clean images for defenses (``stable_seed("defense-split", seed)``),
    cached in ``cache`` so a bench on another machine needs only the cache folder."""
    if not cache.is_file():
        dataset = load_dataset(config.dataset, config.data_root, **config.dataset_options)
        pool, _ = defense_split(len(dataset.x_test), config.defense_clean_size, seed)
        np.savez(
            cache,
            x=dataset.x_test[pool],
            y=dataset.y_test[pool],
            num_classes=dataset.num_classes,
        )
    with np.load(cache) as saved:
        return cell_defense_data(
            int(saved["num_classes"]),
            (saved["x"], saved["y"]),
            target_label=int(config.attack_params["target_label"]),
        )


# ---------------------------------------------------------------------------------- one scan
@dataclass
class Scan:
    """One Neural Cleanse run on one precision."""

    precision: str
    schedule: str
    status: str
    verdict: str | None
    verdict_reason: str | None
    flagged: list[int]
    wall_s: float
    cpu_s: float
    steps_total: int
    label_status: dict[str, int]
    target_index: float | None
    norms: list[float] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    saturated_target: float | None = None
    reason: str | None = None
    steps_per_label: list[int] = field(default_factory=list)
    label_tasks: str | None = None
    seconds_per_label: list[float] | None = None
    load_after: float | None = None
    heap: str = "retain"


def run_scan(
    adapter: RuntimeAdapter, data: DefenseData, params: dict[str, Any], precision: str
) -> Scan:
    """Neural Cleanse with the runner's defense seed, timed (each label too, when its steps run
    in this process)."""
    seconds: dict[int, float] = {}
    wall, cpu = time.perf_counter(), time.process_time()
    with label_clock(seconds):
        result = run_defense("neural_cleanse", params, SEED, adapter, data)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    details = result.details
    statuses = details.get("label_status", [])
    saturated = details.get("target_logit_saturated")
    target = data.target_label
    return Scan(
        precision=precision,
        schedule=str(params.get("label_schedule", "adaptive")),
        status=str(result.status),
        verdict=None if result.verdict is None else str(result.verdict),
        verdict_reason=result.verdict_reason,
        flagged=result.flagged_labels,
        wall_s=wall,
        cpu_s=cpu,
        steps_total=int(sum(details.get("steps_run", []))),
        label_status={s: statuses.count(s) for s in sorted(set(statuses))},
        target_index=details["anomaly_indices"][target] if "anomaly_indices" in details else None,
        norms=details.get("l1_norms", []),
        statuses=statuses,
        saturated_target=None if not saturated else saturated[target],
        reason=result.reason,
        steps_per_label=[int(s) for s in details.get("steps_run", [])],
        label_tasks=details.get("label_tasks"),
        seconds_per_label=[seconds.get(k, 0.0) for k in range(data.num_classes)]
        if seconds
        else None,
        load_after=os.getloadavg()[0],
    )


@contextmanager
def label_clock(seconds: dict[int, float]) -> Iterator[None]:
    """Add each label step's wall seconds to ``seconds[label]`` (steps run in this process only:
    a fanned-out scan's labels run elsewhere and leave it empty)."""
    original = neural_cleanse.label_step
    lock = threading.Lock()

    def timed(scan: Any, label: int, state: Any, cost: float) -> Any:
        start = time.perf_counter()
        try:
            return original(scan, label, state, cost)
        finally:
            with lock:
                seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - start

    neural_cleanse.label_step = timed
    try:
        yield
    finally:
        neural_cleanse.label_step = original


@contextmanager
def _no_retained_heap() -> Iterator[bool]:
    yield False


@contextmanager
def system_heap() -> Iterator[None]:
    """Neural Cleanse without its retained heap (the C library's default), for comparison."""
    original = neural_cleanse.retained_heap
    neural_cleanse.retained_heap = _no_retained_heap
    try:
        yield
    finally:
        neural_cleanse.retained_heap = original


def oracle_device(requested: str) -> str:
    """The device the gradient oracle runs on: only the CPU replica exists (issue 20 item 2)."""
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--oracle-device cuda: no CUDA device here; use cpu or auto")
        raise ValueError("--oracle-device cuda: the GPU gradient oracle is not built; use cpu")
    return "cpu"


def same_outcome(fast: Scan, full: Scan) -> list[str]:
    """Differences between the adaptive and the full schedule that the design rules out."""
    problems = []
    if (fast.verdict, fast.flagged) != (full.verdict, full.flagged):
        problems.append(f"verdict {fast.verdict} {fast.flagged} vs {full.verdict} {full.flagged}")
    for label, (status, a, b) in enumerate(zip(fast.statuses, fast.norms, full.norms, strict=True)):
        if status in ("converged", "budget") and a != b:
            problems.append(f"label {label} ran to the end in both but norms differ: {a} vs {b}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default=None, help="comma-separated (default: config's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: config)")
    parser.add_argument("--compare-full", action="store_true", help="also run the paper's schedule")
    parser.add_argument("--params", type=json.loads, default={}, help="JSON overrides (smoke runs)")
    parser.add_argument(
        "--budget", choices=("authors", "grid"), default=None, help="step content (see above)"
    )
    parser.add_argument("--executor", choices=EXECUTORS, default="serial", help="label fan-out")
    parser.add_argument("--workers", type=int, default=None, help="fan-out workers")
    parser.add_argument("--scheduler", default=None, help="Dask scheduler (tcp://…)")
    parser.add_argument("--oracle-device", choices=("cpu", "auto", "cuda"), default="cpu")
    parser.add_argument("--heap", default="retain", help="retain, system or retain,system")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        device = oracle_device(args.oracle_device)
        args.heap = args.heap.split(",")
        if not args.heap or set(args.heap) - {"retain", "system"}:
            raise ValueError(f"--heap: expected retain, system or both, got {args.heap}")
    except ValueError as exc:
        parser.exit(2, f"bench_nc: error: {exc}\n")

    config = grid_config()
    params = dict(config.defense_params.get("neural_cleanse", {})) | args.params
    if args.threads is not None:
        params["torch_threads"] = args.threads
    if args.budget is not None:
        params["profile"] = "paper" if args.budget == "authors" else "fast"
    precisions = args.precisions.split(",") if args.precisions else config.precisions
    cpu = cpu_description()
    print(
        f"cpu: {cpu}  torch {torch.__version__}  params: {params}  oracle: {device}  "
        f"heap: {args.heap}  load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    folder = CACHE / f"gtsrb_badnet_seed{SEED}"
    paths = trained_artifacts(config, folder)
    data = defense_data(config, folder / "defense_clean.npz")
    stack = ExitStack()
    if args.executor != "serial" or args.scheduler:
        executor = stack.enter_context(
            make_executor(args.executor, args.workers, args.scheduler, threads=1)
        )
        data = replace(data, label_map=executor.label_map())
        print(f"labels fan out over {executor.describe()}", flush=True)

    report: dict[str, Any] = {
        "cpu": cpu,
        "params": params,
        "oracle_device": device,
        "heap": args.heap,
        "load_before": os.getloadavg()[0],
        "scans": [],
        "mismatches": {},
    }
    with stack:
        _scan_all(args, config, paths, data, params, precisions, report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    slow = [s for s in report["scans"] if s["schedule"] == "adaptive" and s["wall_s"] > TARGET_S]
    return 1 if any(report["mismatches"].values()) or slow else 0


def _scan_all(
    args: argparse.Namespace,
    config: ExperimentConfig,
    paths: dict[str, Path],
    data: DefenseData,
    params: dict[str, Any],
    precisions: list[str],
    report: dict[str, Any],
) -> None:
    for precision in precisions:
        adapter = RuntimeAdapter.from_path(
            paths[precision], threads=config.threads, kernel_profile=config.int8_kernels
        )
        scans = []
        for heap in sorted(args.heap, key=lambda h: h != "system"):  # see the module doc
            with system_heap() if heap == "system" else nullcontext():
                scan = replace(run_scan(adapter, data, params, precision), heap=heap)
            report["scans"].append(asdict(scan))
            _print(scan)
            scans.append(scan)
        if len(scans) > 1:
            differ = [
                f"{name} differs between heaps"
                for name in ("norms", "statuses", "steps_per_label", "flagged", "target_index")
                if getattr(scans[0], name) != getattr(scans[1], name)
            ]
            report["mismatches"][f"{precision} heap"] = differ
            print(f"  retained vs system heap: {differ or 'identical'}", flush=True)
        if args.compare_full:
            full = run_scan(adapter, data, params | {"label_schedule": "full"}, precision)
            report["scans"].append(asdict(full))
            _print(full)
            report["mismatches"][precision] = same_outcome(scan, full)
            print(f"  adaptive vs full: {report['mismatches'][precision] or 'same'}", flush=True)


def _print(scan: Scan) -> None:
    print(
        f"{scan.precision:13s} {scan.schedule:8s} {scan.heap:6s} wall {scan.wall_s:6.1f}s cpu {scan.cpu_s:6.1f}s "
        f"steps {scan.steps_total:5d} {scan.label_status} -> {scan.verdict} {scan.flagged} "
        f"target index {scan.target_index} saturated {scan.saturated_target} "
        f"load {scan.load_after:.1f} {scan.verdict_reason or scan.reason or ''}",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
