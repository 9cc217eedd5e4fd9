"""Neural Cleanse label fan-out: wall time of one scan, serial vs local processes vs Dask (issue 20).

Each step's labels are independent given the cost schedule's values, so a scan can run them as
tasks on the sweep's executors (:class:`harness.pipeline.executors.ExecutorLabelMap`); the
driver keeps the schedule and the result must be bit-identical to the serial scan. This bench
runs the same scan (same model, images, parameters, defense seed) under each executor in one
process, one after the other, and reports for each

- ``start_s``: starting the executor (spawning workers; not part of the scan),
- ``wall_s`` / ``cpu_s``: the scan itself (``cpu_s``: the driver process only),
- ``workers_cpu_s``: CPU time of the worker processes over their whole life (start-up, warm-up
  and shutdown included), read once they have exited — on shared cores the wall ratio also
  reflects that N processes get a larger share of a contended CPU than one,
- ``ratio``: serial wall / this wall (above 1: faster than serial),
- ``identical``: masks, patterns, norms, steps, verdict and every other detail equal to the
  serial scan's, bit for bit.

Worlds (trained once, cached under ``runs/bench_nc_fanout-v2/``):

- ``digits``: the tests' BadNet digits ``small_cnn`` (8×8 grey, 10 labels; about 10 s to train);
- ``cifar_cnn``: the grid's ``cifar_cnn`` on 32×32 GTSRB images (43 labels), trained for one
  epoch on 4,000 images of ``../shared/data/gtsrb32.npz`` without poisoning — a model of the
  grid's *size* for timing; its verdicts mean nothing.

Both are quantized on the runner's calibration draw and the 4,000 images are a seeded draw
(:mod:`harness.pipeline.evaluate`); until v2 the bench took the first 256 training images and a
permutation of its own, so caches of that layout (``runs/bench_nc_fanout/``) are not reused.

The Dask run uses a cluster of separate processes on loopback: one ``dask scheduler`` and
``--dask-workers`` ``dask worker --nthreads 1`` processes, started by the bench (or an existing
cluster with ``--scheduler tcp://…``). The machine's load average is printed before and after,
since the cores may be shared.

Usage: ``python -m bench.defenses.bench_nc_fanout --world digits --precision int8-static
--params '{"steps": 5}' --runs serial,processes:1,processes:2,dask --json out.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench._cpu import cpu_description, cpu_label
from defenses.base import DefenseData, DefenseResult
from harness.artifacts.preprocessing import Preprocessing
from harness.attacks.base import build_attack
from harness.core.errors import BlindspotsError
from harness.data.base import load_dataset
from harness.pipeline.evaluate import (
    calibration_draw,
    cell_defense_data,
    run_defense,
    seeded_subset,
)
from harness.pipeline.executors import DaskExecutor, Executor, make_executor
from harness.runtime.adapter import RuntimeAdapter
from harness.training.loop import TrainConfig, train_model

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "runs" / "bench_nc_fanout-v2"
GTSRB = ROOT.parent / "shared" / "data" / "gtsrb32.npz"
PRECISIONS = ("fp32", "int8-static", "int8-dynamic", "int4")
SEED = 0
PROVENANCE = {"label_tasks"}
"""Details that say where the scan ran, not what it found: not compared."""


# ---------------------------------------------------------------------------------- worlds
def _export(model: Any, preprocessing: Preprocessing, calib: np.ndarray, folder: Path) -> None:
    from exporters.onnx_export import export_onnx
    from exporters.quantization import quantize_all

    folder.mkdir(parents=True, exist_ok=True)
    export_onnx(model, folder / "exported.onnx", calib[:128], preprocessing)
    quantize_all(folder / "exported.onnx", folder, list(PRECISIONS), calib)


def world(name: str, gtsrb: Path = GTSRB) -> tuple[Path, DefenseData]:
    """The world's ONNX folder and its defense data (held-out clean images), built once."""
    folder = CACHE / name
    clean = folder / "clean.npz"
    if not clean.is_file():
        if name == "digits":
            data = load_dataset("digits")
            attack = build_attack(
                "badnet", {"patch_size": 2, "margin": 0, "poison_rate": 0.1, "target_label": 0}
            )
            poisoned = attack.poison(data.x_train, data.y_train, np.random.default_rng(SEED))
            x, y, classes = poisoned.x, poisoned.y, 10
            test_x, test_y = data.x_test, data.y_test
            config = TrainConfig(model="small_cnn", epochs=25, batch_size=64, seed=SEED)
        elif name == "cifar_cnn":
            if not gtsrb.is_file():
                raise BlindspotsError(f"the cifar_cnn world needs {gtsrb} (see --gtsrb)")
            with np.load(gtsrb) as saved:
                pick = seeded_subset(len(saved["x_train"]), 4000, "bench-nc-fanout", SEED)
                x, y = saved["x_train"][pick], saved["y_train"][pick]
                test_x, test_y = saved["x_test"][:1500], saved["y_test"][:1500]
            classes = 43
            config = TrainConfig(model="cifar_cnn", epochs=1, batch_size=64, seed=SEED)
        else:
            raise BlindspotsError(f"unknown world '{name}'; expected digits or cifar_cnn")
        preprocessing = Preprocessing.from_images(x)
        model = train_model(x, y, classes, preprocessing, config, progress=False)
        _export(model, preprocessing, calibration_draw(x, 256, SEED), folder)
        np.savez(clean, x=test_x, y=test_y, num_classes=classes)
    with np.load(clean) as saved:
        data = cell_defense_data(
            int(saved["num_classes"]),
            (saved["x"], saved["y"]),
            target_label=0 if name == "digits" else None,
        )
    return folder, data


# ---------------------------------------------------------------------------------- clusters
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def loopback_cluster(stack: ExitStack, workers: int) -> str:
    """A ``dask scheduler`` and ``workers`` single-threaded ``dask worker`` processes on
    loopback, stopped when ``stack`` closes; returns the scheduler's address."""
    address = f"tcp://127.0.0.1:{_free_port()}"
    dask = str(Path(sys.executable).with_name("dask"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # workers import this tree's code
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    port = address.rsplit(":", 1)[1]
    procs = [
        subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"], **quiet
        )
    ]
    for _ in range(workers):
        procs.append(
            subprocess.Popen(
                [dask, "worker", address, "--nthreads", "1", "--no-dashboard", "--no-nanny"],
                **quiet,
            )
        )
    for proc in procs:
        stack.callback(_stop, proc)
    return address


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def parse_runs(text: str) -> list[str]:
    """The comma-separated runs, checked before anything runs (one-line error otherwise)."""
    runs = [run.strip() for run in text.split(",") if run.strip()]
    for run in runs:
        kind, _, count = run.partition(":")
        if kind not in ("serial", "processes", "dask") or (count and not count.isdigit()):
            raise BlindspotsError(
                f"unknown run '{run}'; expected serial, processes:N or dask (comma-separated)"
            )
    if not runs or runs[0] != "serial":
        raise BlindspotsError("the first run must be 'serial': the others are compared with it")
    return runs


def executor_for(run: str, stack: ExitStack, dask_workers: int, scheduler: str | None) -> Executor:
    """``serial``, ``processes:N`` or ``dask`` (the loopback cluster, or ``scheduler``)."""
    kind, _, count = run.partition(":")
    if kind == "serial":
        return make_executor("serial")
    if kind == "processes":
        return make_executor("processes", int(count or 2), threads=1)
    if kind == "dask":
        address = scheduler or loopback_cluster(stack, dask_workers)
        executor = _retry_connect(address)
        if scheduler is None:
            executor.wait_for_workers(dask_workers)
        return executor
    raise BlindspotsError(f"unknown run '{run}'; expected serial, processes:N or dask")


def _retry_connect(address: str) -> DaskExecutor:
    """The scheduler process takes a few seconds to listen."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return DaskExecutor(scheduler=address)
        except BlindspotsError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _warm(_: object) -> int:
    """Import what a label task imports (torch, the replica), so start-up is not scan time; the
    pause keeps a worker busy so that the next warm-up task goes to another one."""
    import defenses.neural_cleanse  # noqa: F401
    import harness.runtime.oracle  # noqa: F401

    time.sleep(0.5)
    return os.getpid()


def warm_up(executor: Executor) -> int:
    """Two warm-up tasks per worker; returns how many distinct worker processes answered."""
    if executor.name == "serial":
        return 1
    pending = [executor.submit(_warm, None) for _ in range(2 * executor.slots())]
    pids = set()
    while pending:
        for handle in executor.wait(pending):
            pending.remove(handle)
            pids.add(handle.result())
    return len(pids)


# ---------------------------------------------------------------------------------- compare
def differences(result: DefenseResult, reference: DefenseResult) -> list[str]:
    """What differs from the serial scan (nothing, for a correct fan-out)."""
    diffs = [
        f"details[{k}]"
        for k in reference.details
        if k not in PROVENANCE and result.details.get(k) != reference.details[k]
    ]
    diffs += [
        f"arrays[{k}]"
        for k in reference.arrays
        if not np.array_equal(result.arrays.get(k), reference.arrays[k])
    ]
    if (result.verdict, result.flagged_labels) != (reference.verdict, reference.flagged_labels):
        diffs.append("verdict")
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="digits", choices=("digits", "cifar_cnn"))
    parser.add_argument("--precision", default="int8-static", choices=PRECISIONS)
    parser.add_argument("--runs", default="serial,processes:1,processes:2,dask")
    parser.add_argument("--dask-workers", type=int, default=2)
    parser.add_argument("--scheduler", default=None, help="an existing cluster (tcp://…)")
    parser.add_argument("--params", type=json.loads, default={}, help="NC parameter overrides")
    parser.add_argument("--gtsrb", type=Path, default=GTSRB, help="gtsrb32.npz (cifar_cnn)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    runs = parse_runs(args.runs)
    params = {"torch_threads": 1, "workers": 1} | args.params
    folder, data = world(args.world, args.gtsrb)
    adapter = RuntimeAdapter.from_path(folder / f"{args.precision}.onnx")
    cpu = cpu_description()
    print(
        f"cpu: {cpu_label(cpu)} ({cpu['cpus']} logical)  torch {torch.__version__}  "
        f"world {args.world} {args.precision}  params {params}",
        flush=True,
    )
    report: dict[str, Any] = {
        "cpu": cpu,
        "world": args.world,
        "precision": args.precision,
        "params": params,
        "load_before": os.getloadavg(),
        "runs": [],
    }
    reference: DefenseResult | None = None
    serial_wall = None
    for run in runs:
        children = os.times()
        with ExitStack() as stack:
            started = time.perf_counter()
            executor = stack.enter_context(
                executor_for(run, stack, args.dask_workers, args.scheduler)
            )
            warmed = warm_up(executor)
            start_s = time.perf_counter() - started
            label_map = None if run == "serial" else executor.label_map()
            scan_data = replace(data, label_map=label_map)
            wall, cpu_s = time.perf_counter(), time.process_time()
            result = run_defense("neural_cleanse", params, SEED, adapter, scan_data)
            wall, cpu_s = time.perf_counter() - wall, time.process_time() - cpu_s
        after = os.times()  # workers have exited (pool shut down, cluster stopped): counted
        workers_cpu = after.children_user + after.children_system
        workers_cpu -= children.children_user + children.children_system
        if result.status != "ok":
            print(f"{run}: {result.status} {result.reason}", flush=True)
            return 1
        if reference is None:
            reference, serial_wall = result, wall
        diffs = differences(result, reference)
        steps = result.details["steps_run"]
        row = {
            "run": run,
            "workers": executor.workers,
            "warmed_processes": warmed,
            "start_s": start_s,
            "wall_s": wall,
            "cpu_s": cpu_s,
            "workers_cpu_s": workers_cpu,
            "ratio": None if serial_wall is None else serial_wall / wall,
            "identical": not diffs,
            "differences": diffs,
            "steps_total": int(sum(steps)),
            "steps_per_label": steps,
            "verdict": str(result.verdict),
            "flagged": result.flagged_labels,
            "load_after": os.getloadavg(),
        }
        report["runs"].append(row)
        print(
            f"{run:12s} start {start_s:5.1f}s  wall {wall:7.1f}s  cpu {cpu_s:7.1f}s  "
            f"workers' cpu {workers_cpu:7.1f}s  "
            f"x{row['ratio']:.2f} vs serial  steps {row['steps_total']}  "
            f"{row['verdict']} {row['flagged']}  identical={row['identical']} {diffs or ''}  "
            f"load {row['load_after'][0]:.2f}",
            flush=True,
        )
    report["load_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if all(row["identical"] for row in report["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
