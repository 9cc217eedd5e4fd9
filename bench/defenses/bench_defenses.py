"""What does each defense cost on top of the forward passes it cannot avoid?

A defense's unavoidable work is its model evaluations: the images it sends through the
onnxruntime session (``DefenseResult.queries``, the adapter's ``counter.images`` delta) and, for
Neural Cleanse, the forward+backward passes of the torch replica (counted here by wrapping the
``logits_fn`` that :func:`defenses.neural_cleanse.reverse_engineer` receives). Its *floor* is
that work divided by throughput measured in the same process on the same artifact, with the
bare session (``session.run`` on already-preprocessed input) at the batch size the adapter uses
(256, or 1 for graphs the adapter runs per sample), and the bare replica at Neural Cleanse's
batch (labels × ``batch_size`` images). ``wall / floor`` is then what the defense costs beyond its
model evaluations: preprocessing, blending, clustering, SVDs, Python. The time spent inside
``InferenceSession.run`` during each defense is recorded too, as a cross-check of the floor.

The setup is ``configs/grids/gtsrb_badnet.toml`` (an earlier grid's setup): the trained GTSRB BadNet
model (2% poison, 4×4 checkerboard, target 1) and the training set exactly as the runner
poisoned it, the runner's 500 held-out clean images and 500 triggered ones, and a seeded
subsample of the training set for AC/SS (the grid uses 10 000; 5 000 here keeps a run short).
Neural Cleanse runs all 43 labels for a few steps; since no label can early-stop that soon,
every step costs the same, and the config's step ceiling is extrapolated as fixed cost + steps
× measured step cost: an upper bound, since the paper's early stop ends most labels sooner.

Everything is single-threaded (ORT ``threads=1``, torch, BLAS via threadpoolctl): the CPU is
shared, and ratios measured side by side in one process are what carries over, not seconds.

Usage: ``python -m bench.defenses.bench_defenses [--quick] [--precisions fp32,int8-static]
[--profile N] [--json out.json]``
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import platform
import pstats
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from defenses.neural_cleanse import NeuralCleanseParams
from harness.pipeline.config import load_config

GTSRB_RUN = Path("runs/gtsrb")
"""Where ``blindspots run --config configs/grids/gtsrb_badnet.toml --out runs/gtsrb`` puts its models."""
DEFAULT_DATA = Path("../shared/data/gtsrb32.npz")
ATTACK = "badnet"
ATTACK_PARAMS: dict[str, Any] = {
    "patch_size": 4,
    "pattern": "checkerboard",
    "poison_rate": 0.02,
    "target_label": 1,
}
SEED = 0
CLEAN_SIZE = 500  # the grid's defense_clean_size
DEFENSES = (
    "activation_clustering",
    "spectral_signatures",
    "strip",
    "fine_pruning",
    "neural_cleanse",
)
_GRID_NC_PARAMS = NeuralCleanseParams(
    **load_config(
        Path(__file__).resolve().parents[2] / "configs" / "grids" / "gtsrb_badnet.toml"
    ).defense_params["neural_cleanse"]
)
GRID_NC = {key: getattr(_GRID_NC_PARAMS, key) for key in ("steps", "n_samples", "batch_size")}
"""Neural Cleanse budget of ``configs/grids/gtsrb_badnet.toml`` (the defaults where it sets none),
read from there so the two never disagree."""


def default_artifacts(run: Path = GTSRB_RUN) -> Path:
    """The poisoned model's folder of the one training in ``run`` (its key is a content hash)."""
    found = sorted(run.glob("artifacts/*/poisoned"))
    if len(found) != 1:
        what = "no trained model" if not found else f"{len(found)} trained models"
        raise SystemExit(
            f"{what} under {run}/artifacts: run `blindspots run --config "
            f"configs/grids/gtsrb_badnet.toml --out {run}` first, or pass --artifacts"
        )
    return found[0]


TARGET_RATIO = 1.2
SMALL_BATCH = 32  # ORT's fastest batch here (cache-resident activations); for reference
REPLICA_CHUNK = 128  # replica batch that stays cache-friendly; for reference
TARGET_NC_S = 60.0


# ---------------------------------------------------------------------------------- setup
@dataclass(frozen=True)
class Budget:
    """How much of each defense one bench run does (defaults: a full run of a few minutes)."""

    train_size: int = 5000
    strip_n_test: int = 100
    nc_steps: int = 3
    floor_images: int = 2048
    floor_repeats: int = 3

    @classmethod
    def quick(cls) -> Budget:
        return cls(train_size=4000, strip_n_test=40, nc_steps=1, floor_images=1024)


def defense_params(budget: Budget) -> dict[str, dict[str, Any]]:
    """Grid parameters (configs/grids/gtsrb_badnet.toml) with the bench's reduced budgets."""
    return {
        "strip": {"n_test": budget.strip_n_test},
        "neural_cleanse": {
            "steps": budget.nc_steps,
            "n_samples": GRID_NC["n_samples"],
            "batch_size": GRID_NC["batch_size"],
            "torch_threads": 1,
        },
    }


def gtsrb_defense_data(data_path: Path, train_size: int, seed: int = SEED):
    """The grid's defense inputs for the poisoned model, rebuilt exactly as the runner does.

    Poisoning with ``stable_seed("poison", seed)`` reproduces the training set the model saw;
    the held-out clean / triggered split and the AC/SS subsample are the runner's own draws
    (:mod:`harness.pipeline.evaluate`).
    """
    from defenses.base import DefenseData
    from harness.attacks.base import build_attack
    from harness.core.sampling import stable_seed
    from harness.data.base import load_dataset
    from harness.pipeline.evaluate import defense_pools, defense_training_subset

    dataset = load_dataset("npz", str(data_path))
    attack = build_attack(ATTACK, ATTACK_PARAMS)
    poisoned = attack.poison(
        dataset.x_train, dataset.y_train, np.random.default_rng(stable_seed("poison", seed))
    )
    pools = defense_pools(dataset, attack, seed, CLEAN_SIZE, poisoned.poison_mask)
    keep = defense_training_subset(len(poisoned.x), train_size, seed)
    if keep is None:
        keep = np.arange(len(poisoned.x))
    return DefenseData(
        num_classes=dataset.num_classes,
        clean_x=pools.clean_x,
        clean_y=pools.clean_y,
        train_x=poisoned.x[keep],
        train_y=poisoned.y[keep],
        poison_mask=poisoned.poison_mask[keep],
        triggered_x=pools.triggered_x,
        target_label=attack.target_label,
        poison_rate=attack.poison_rate,
    )


def single_thread_everything() -> None:
    """One thread for torch and every BLAS/OpenMP pool in the process (shared 2-core CPU)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(limits=1)


def artifact_path(folder: Path, precision: str) -> Path:
    """``<precision>.onnx`` in ``folder``; fp32 falls back to ``exported.onnx`` (same graph)."""
    from harness.core.errors import ModelError

    path = folder / f"{precision}.onnx"
    if not path.is_file() and precision == "fp32":
        path = folder / "exported.onnx"
    if not path.is_file():
        raise ModelError(f"no {precision} artifact in {folder} (expected {precision}.onnx)")
    return path


# ---------------------------------------------------------------------------------- instrumentation
@contextlib.contextmanager
def ort_run_time() -> Iterator[list[float]]:
    """Accumulate the wall time spent inside ``onnxruntime.InferenceSession.run`` (every session,
    including the probe and masked copies a defense creates) into the yielded one-item list."""
    import onnxruntime as ort

    original = ort.InferenceSession.run
    spent = [0.0]

    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started

    ort.InferenceSession.run = timed  # type: ignore[method-assign]
    try:
        yield spent
    finally:
        ort.InferenceSession.run = original  # type: ignore[method-assign]


@dataclass
class ReplicaWork:
    """Replica forward+backward work done inside Neural Cleanse's optimisation."""

    images: int = 0
    calls: int = 0
    seconds: float = 0.0


@contextlib.contextmanager
def count_replica_work() -> Iterator[ReplicaWork]:
    """Wrap ``reverse_engineer`` so every replica call's batch and the loop's time are counted."""
    import defenses.neural_cleanse as nc

    original = nc.reverse_engineer
    work = ReplicaWork()

    def counted(logits_fn: Callable, *args: Any, **kwargs: Any):
        def logits(pixels):
            work.images += int(pixels.shape[0])
            work.calls += 1
            return logits_fn(pixels)

        started = time.perf_counter()
        try:
            return original(logits, *args, **kwargs)
        finally:
            work.seconds += time.perf_counter() - started

    nc.reverse_engineer = counted
    try:
        yield work
    finally:
        nc.reverse_engineer = original


# ---------------------------------------------------------------------------------- throughput
@dataclass
class Throughput:
    """Bare images/s of one artifact's sessions and replica (the floor's denominators)."""

    precision: str
    batch: int
    logits: float
    penultimate: float
    last_conv: float
    replica_fwd: float = float("nan")
    replica_fwd_bwd: float = float("nan")
    replica_batch: int = 0
    replica_fwd_bwd_chunk: float = float("nan")
    logits_small_batch: float = float("nan")
    torch_native_fwd_bwd: float | None = None

    def merge(self, other: Throughput) -> Throughput:
        """Mean of two ORT measurements (before / after the defenses) to even out load drift."""
        return Throughput(
            precision=self.precision,
            batch=self.batch,
            logits=(self.logits + other.logits) / 2,
            penultimate=(self.penultimate + other.penultimate) / 2,
            last_conv=(self.last_conv + other.last_conv) / 2,
            replica_fwd=self.replica_fwd,
            replica_fwd_bwd=self.replica_fwd_bwd,
            replica_batch=self.replica_batch,
            replica_fwd_bwd_chunk=self.replica_fwd_bwd_chunk,
            logits_small_batch=(self.logits_small_batch + other.logits_small_batch) / 2,
            torch_native_fwd_bwd=self.torch_native_fwd_bwd,
        )


def session_throughput(
    session: Any, input_name: str, outputs: list[str], feed: np.ndarray, batch: int, repeats: int
) -> float:
    """Images/s of ``session.run`` over ``feed`` (preprocessed) in chunks of ``batch``: median
    of ``repeats`` passes after one warm-up call."""
    session.run(outputs, {input_name: feed[:batch]})
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for start in range(0, len(feed), batch):
            session.run(outputs, {input_name: feed[start : start + batch]})
        rates.append(len(feed) / (time.perf_counter() - started))
    return statistics.median(rates)


def ort_throughput(adapter: Any, images: np.ndarray, budget: Budget) -> Throughput:
    """Bare session throughput at the adapter's batch (1 for per-sample graphs)."""
    per_sample = adapter.runs_per_sample(None)
    batch = 1 if per_sample else adapter.batch_size
    n = min(budget.floor_images, 256) if per_sample else budget.floor_images
    feed = adapter.preprocessing.apply(np.resize(images, (n, *images.shape[1:])))
    adapter.activations(images[:1])  # builds the probe session the defenses use
    probe = adapter._probe_session
    name = adapter._input_name
    rate = {
        layer: session_throughput(
            probe, name, [adapter.probes[layer].tensor], feed, batch, budget.floor_repeats
        )
        for layer in ("penultimate", "last_conv")
    }
    logits = session_throughput(
        adapter._session, name, [adapter._logits_name], feed, batch, budget.floor_repeats
    )
    small = session_throughput(
        adapter._session, name, [adapter._logits_name], feed, SMALL_BATCH, budget.floor_repeats
    )
    return Throughput(
        adapter.precision,
        batch,
        logits,
        rate["penultimate"],
        rate["last_conv"],
        logits_small_batch=small if not per_sample else logits,
    )


def replica_throughput(
    forward: Callable, images: np.ndarray, batch: int, backward: bool, repeats: int = 2
) -> float:
    """Images/s of ``forward`` (NHWC pixels → logits) on ``batch`` images, with a cross-entropy
    backward to the input pixels when ``backward`` (what one Neural Cleanse mini-batch does)."""
    import torch

    pixels = torch.from_numpy(np.resize(images, (batch, *images.shape[1:])).astype(np.float32))
    targets = torch.zeros(batch, dtype=torch.long)
    forward(pixels[:2])  # warm-up
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        if backward:
            x = pixels.clone().requires_grad_(True)
            torch.nn.functional.cross_entropy(forward(x), targets).backward()
        else:
            with torch.no_grad():
                forward(pixels)
        seconds.append(time.perf_counter() - started)
    return batch / statistics.median(seconds)


def torch_native_forward(state_path: Path, preprocessing: Any) -> Callable:
    """The trained torch module (``model.pt``) behind the adapter's pixel preprocessing: the
    reference an interpreted FP32 replica should match in speed."""
    import torch

    from harness.training.loop import load_model

    model, _ = load_model(state_path)
    model.eval()
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32)
    std = torch.tensor(preprocessing.std, dtype=torch.float32)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        return model(((pixels / 255.0 - mean) / std).permute(0, 3, 1, 2))

    return forward


# ---------------------------------------------------------------------------------- one defense
@dataclass
class DefenseTiming:
    """One defense on one precision: its cost against its floor."""

    defense: str
    precision: str
    status: str
    wall_s: float
    ort_s: float
    queries: int
    replica_images: int
    floor_s: float
    ratio: float
    quality: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def floor_seconds(
    name: str, result: Any, data: Any, tput: Throughput, replica: ReplicaWork
) -> float:
    """The defense's model evaluations divided by bare throughput (see the module doc)."""
    queries = result.queries
    if name in ("activation_clustering", "spectral_signatures"):
        return queries / tput.penultimate
    if name == "fine_pruning":  # one last_conv pass over the clean set ranks channels
        ranking = len(data.clean_x)
        return ranking / tput.last_conv + (queries - ranking) / tput.logits
    if name == "neural_cleanse":
        parity = int(result.details.get("parity", {}).get("n", 0))
        return (
            queries / tput.logits
            + parity / tput.replica_fwd
            + replica.images / tput.replica_fwd_bwd
        )
    return queries / tput.logits


def quality_of(name: str, result: Any) -> dict[str, Any]:
    """The few outcome numbers that show the run did real work (not the bench's subject)."""
    out: dict[str, Any] = {"detected": result.detected}
    if result.status != "ok":
        return {"reason": result.reason}
    if name in ("activation_clustering", "spectral_signatures"):
        filt = result.details.get("filtering", {})
        out |= {k: filt.get(k) for k in ("poison_precision", "poison_recall")}
    elif name == "strip":
        out |= {k: result.scores.get(k) for k in ("tpr", "frr", "auroc")}
    elif name == "fine_pruning":
        out |= {k: result.scores.get(k) for k in ("pruned_fraction", "pruned_asr", "pruned_acc")}
    elif name == "neural_cleanse":
        out |= {"flagged": result.flagged_labels, "score": result.score}
    return out


def run_defense(
    name: str, params: dict[str, Any] | None, adapter: Any, data: Any, profile: int
) -> tuple[Any, float, ReplicaWork, str | None]:
    """Run one defense (seeded as the runner seeds it); return (result, ORT seconds, replica
    work, cProfile top-N text when ``profile``)."""
    from harness.pipeline.evaluate import run_defense as evaluate_defense

    profiler = cProfile.Profile() if profile else None
    with ort_run_time() as spent, count_replica_work() as replica:
        if profiler is not None:
            profiler.enable()
        result = evaluate_defense(name, params, SEED, adapter, data)
        if profiler is not None:
            profiler.disable()
    text = None
    if profiler is not None:
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(profile)
        text = stream.getvalue()
    return result, spent[0], replica, text


def nc_extrapolation(
    timing: DefenseTiming, result: Any, replica: ReplicaWork, tput: Throughput, steps: int
) -> dict[str, Any]:
    """Neural Cleanse at the grid budget: fixed cost + ``steps`` × measured per-step cost.

    Valid because no label can early-stop within the few measured steps (it first needs the
    cost to move up and down), so every measured step optimised all labels — an upper bound
    for the real run, where stopped labels drop out.
    """
    run = np.asarray(result.details.get("steps_run", [0]))
    measured = int(run.max()) if run.size else 0
    if measured == 0:
        return {}
    per_step = replica.seconds / measured
    fixed = timing.wall_s - replica.seconds
    images_per_step = replica.images / measured
    floor_step = images_per_step / tput.replica_fwd_bwd
    floor_fixed = timing.floor_s - replica.images / tput.replica_fwd_bwd
    estimate = fixed + steps * per_step
    floor = floor_fixed + steps * floor_step
    chunk_step = images_per_step / tput.replica_fwd_bwd_chunk
    return {
        "measured_steps": measured,
        "all_labels_every_step": bool((run == measured).all()),
        "per_step_s": per_step,
        "per_step_floor_s": floor_step,
        "fixed_s": fixed,
        "fixed_floor_s": floor_fixed,
        "grid_steps": steps,
        "grid_estimate_s": estimate,
        "grid_floor_s": floor,
        "grid_ratio": estimate / floor,
        "per_step_floor_chunked_s": chunk_step,
        "grid_floor_chunked_s": floor_fixed + steps * chunk_step,
    }


# ---------------------------------------------------------------------------------- one precision
def bench_precision(
    precision: str,
    artifacts: Path,
    data: Any,
    budget: Budget,
    profile: int,
    log: Callable[[str], None],
) -> tuple[list[DefenseTiming], Throughput, dict[str, str]]:
    """Every defense on one precision, with throughput measured before and after."""
    from harness.runtime.adapter import RuntimeAdapter

    path = artifact_path(artifacts, precision)
    adapter = RuntimeAdapter.from_path(path, threads=1)
    before = ort_throughput(adapter, data.clean_x, budget)
    log(f"{precision}: bare session {before.logits:.0f} img/s at batch {before.batch}")
    params = defense_params(budget)
    rows: list[tuple[str, Any, float, ReplicaWork]] = []
    profiles: dict[str, str] = {}
    for name in DEFENSES:
        result, ort_s, replica, text = run_defense(name, params.get(name), adapter, data, profile)
        rows.append((name, result, ort_s, replica))
        if text:
            profiles[f"{name}/{precision}"] = text
        log(f"{precision} {name}: {result.status} {result.wall_time_s:.1f}s")
    tput = before.merge(ort_throughput(adapter, data.clean_x, budget))
    oracle = adapter.gradient_oracle()  # already built (and cached) by Neural Cleanse
    nc_batch = data.num_classes * GRID_NC["batch_size"]
    tput.replica_batch = nc_batch
    tput.replica_fwd = replica_throughput(oracle.logits, data.clean_x, 256, backward=False)
    tput.replica_fwd_bwd = replica_throughput(oracle.logits, data.clean_x, nc_batch, backward=True)
    tput.replica_fwd_bwd_chunk = replica_throughput(
        oracle.logits, data.clean_x, REPLICA_CHUNK, backward=True, repeats=5
    )
    state = artifacts / "model.pt"
    if precision == "fp32" and state.is_file():
        native = torch_native_forward(state, adapter.preprocessing)
        tput.torch_native_fwd_bwd = replica_throughput(native, data.clean_x, nc_batch, True)

    timings = []
    for name, result, ort_s, replica in rows:
        floor = floor_seconds(name, result, data, tput, replica)
        timing = DefenseTiming(
            defense=name,
            precision=precision,
            status=str(result.status),
            wall_s=result.wall_time_s,
            ort_s=ort_s,
            queries=result.queries,
            replica_images=replica.images,
            floor_s=floor,
            ratio=result.wall_time_s / floor if floor > 0 else float("nan"),
            quality=quality_of(name, result),
        )
        if name == "neural_cleanse" and result.status == "ok":
            timing.extra = nc_extrapolation(timing, result, replica, tput, GRID_NC["steps"])
        timings.append(timing)
    return timings, tput, profiles


# ---------------------------------------------------------------------------------- report
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def markdown(timings: list[DefenseTiming], tputs: list[Throughput], budget: Budget) -> str:
    """The three tables: throughput, defense vs floor, Neural Cleanse extrapolation."""
    lines = [
        "### Bare throughput (images/s, 1 thread)",
        "",
        "| precision | ORT batch | logits | penultimate probe | last_conv probe | replica fwd (256) "
        f"| replica fwd+bwd (NC batch) | replica fwd+bwd ({REPLICA_CHUNK}) "
        f"| logits at batch {SMALL_BATCH} | model.pt fwd+bwd (NC batch, BN unfolded) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in tputs:
        native = "" if t.torch_native_fwd_bwd is None else f"{t.torch_native_fwd_bwd:.0f}"
        lines.append(
            f"| {t.precision} | {t.batch} | {t.logits:.0f} | {t.penultimate:.0f} | "
            f"{t.last_conv:.0f} | {t.replica_fwd:.0f} | {t.replica_fwd_bwd:.0f} "
            f"({t.replica_batch}) | {t.replica_fwd_bwd_chunk:.0f} | {t.logits_small_batch:.0f} "
            f"| {native} |"
        )
    lines += [
        "",
        f"### Defense wall time vs its forward-pass floor (target ≤ {TARGET_RATIO}×)",
        "",
        f"AC/SS on {budget.train_size} training images, STRIP n_test {budget.strip_n_test}, "
        f"NC {budget.nc_steps} step(s) × 43 labels × {GRID_NC['n_samples']} images.",
        "",
        "| defense | precision | wall s | in ORT s | ORT images | replica fwd+bwd images "
        "| floor s | wall/floor | ≤1.2× | outcome |",
        "|---|---|---:|---:|---:|---:|---:|---:|:-:|---|",
    ]
    for r in timings:
        ok = "yes" if r.ratio <= TARGET_RATIO else "no"
        outcome = ", ".join(f"{k}={_fmt(v)}" for k, v in r.quality.items())
        lines.append(
            f"| {r.defense} | {r.precision} | {r.wall_s:.2f} | {r.ort_s:.2f} | {r.queries} | "
            f"{r.replica_images} | {r.floor_s:.2f} | {r.ratio:.2f} | {ok} | {outcome} |"
        )
    nc = [r for r in timings if r.extra]
    if nc:
        lines += [
            "",
            f"### Neural Cleanse at the grid budget's ceiling ({GRID_NC['steps']} steps for "
            f"every one of 43 labels, no early stop), extrapolated: an upper bound "
            f"(target ≤ {TARGET_NC_S:.0f} s)",
            "",
            "| precision | measured steps | s/step | floor s/step | fixed s | estimate s "
            f"| floor s | estimate/floor | ≤60 s | floor s, replica in {REPLICA_CHUNK}-image "
            "chunks |",
            "|---|---:|---:|---:|---:|---:|---:|---:|:-:|---:|",
        ]
        for r in nc:
            e = r.extra
            ok = "yes" if e["grid_estimate_s"] <= TARGET_NC_S else "no"
            lines.append(
                f"| {r.precision} | {e['measured_steps']} | {e['per_step_s']:.2f} | "
                f"{e['per_step_floor_s']:.2f} | {e['fixed_s']:.2f} | {e['grid_estimate_s']:.1f} | "
                f"{e['grid_floor_s']:.1f} | {e['grid_ratio']:.2f} | {ok} | "
                f"{e['grid_floor_chunked_s']:.1f} |"
            )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import onnxruntime
    import sklearn
    import torch

    return {
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "scikit_learn": sklearn.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--artifacts",
        type=Path,
        help="folder with <precision>.onnx and model.pt (the poisoned model; default: the one "
        "under runs/gtsrb/artifacts)",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="gtsrb32.npz")
    parser.add_argument("--precisions", default="fp32,int8-static,int8-dynamic")
    parser.add_argument("--quick", action="store_true", help="smaller budgets (about a minute)")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="cProfile each defense and print its N hottest functions "
        "(profiling inflates the timings)",
    )
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args(argv)
    args.artifacts = args.artifacts or default_artifacts()

    single_thread_everything()
    budget = Budget.quick() if args.quick else Budget()
    started = time.perf_counter()
    data = gtsrb_defense_data(args.data, budget.train_size)

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", flush=True)

    timings: list[DefenseTiming] = []
    tputs: list[Throughput] = []
    profiles: dict[str, str] = {}
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        rows, tput, prof = bench_precision(
            precision, args.artifacts, data, budget, args.profile, log
        )
        timings += rows
        tputs.append(tput)
        profiles |= prof
    print()
    print(markdown(timings, tputs, budget))
    for key, text in profiles.items():
        print(f"\n### cProfile {key}\n```\n{text.strip()}\n```")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "budget": asdict(budget),
                    "environment": environment(),
                    "throughput": [asdict(t) for t in tputs],
                    "defenses": [asdict(t) for t in timings],
                    "total_s": time.perf_counter() - started,
                },
                indent=2,
                default=str,
            )
        )
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
