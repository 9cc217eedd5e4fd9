"""How much does the runtime adapter cost on top of a bare onnxruntime call, per precision?

Every metric and defense queries models through :class:`harness.runtime.adapter.RuntimeAdapter`, so
its
Python overhead multiplies into every experiment. This bench times, in one process and on the
very same ``InferenceSession`` (same options and threads):

- ``raw``: ``session.run`` on already-normalised float NCHW input — the floor;
- ``adapter``: ``adapter.logits`` on uint8 NHWC pixels (preprocessing included);
- ``adapter-no-pre``: ``adapter.logits`` with preprocessing swapped for an identity, fed the
  same normalised input as ``raw`` — what the adapter's batching/bookkeeping alone costs;
- ``preprocess``: ``Preprocessing.apply`` alone, called as the adapter calls it;
- ``proposed``: a candidate faster forward path (:func:`proposed_logits`), checked to give
  bit-identical logits, so a suggested change to the adapter comes with a measured gain;

for three ways images reach the session (:data:`MODES`): one image per ``logits`` call, 16
images in per-sample mode (one run per image, how int8-dynamic graphs run) and 256 images in
one run. The machine is shared and loaded, so variants run back to back in a rotating order,
call by call, and the report gives medians of per-round *paired* ratios, not absolute times.
A second measure times the adapter against a session that returns at once (pure Python cost,
minimum of repeated runs — insensitive to load). For int8-dynamic it also measures the batch
dependence of the outputs and what per-sample mode costs. The model is a seeded, *untrained*
``cifar_cnn`` unless ``--artifacts`` points at real ones: timing does not depend on weight
values, but the batch-dependence magnitudes of a trained model will differ.

Usage: ``python -m bench.runtime.bench_adapter [--repeats N] [--threads T] [--json out.json]``; on a
trained run: ``--artifacts runs/<run>/artifacts/<key>/poisoned --dataset npz --data-root <npz>``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import statistics
import tempfile
import time
import timeit
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench._models import (
    ALL_PRECISIONS,
    build_artifacts,
    synthetic_images,
    with_saturated_outliers,
)
from harness.artifacts.preprocessing import Preprocessing
from harness.core.errors import DataError, ModelError
from harness.core.metrics import batch_dependence
from harness.runtime.adapter import RuntimeAdapter
from harness.runtime.kernels import cpu_isa_flags

VARIANTS = ("raw", "adapter", "adapter-no-pre", "preprocess", "proposed")
TARGET_OVERHEAD = 1.03
PRIME_BELOW = 64  # calls on fewer images are short enough for a cold cache to show


# ---------------------------------------------------------------------------- candidate path
def proposed_preprocess(preprocessing: Preprocessing, pixels: np.ndarray) -> np.ndarray:
    """``Preprocessing.apply`` with the same float32 arithmetic, 3-4× faster on a batch.

    ``apply`` normalises in NHWC, where the per-channel mean/std broadcast over a last axis of
    length 3: numpy's inner loop then runs 3 elements at a time, and each of the two channel
    ops costs ~6× a contiguous pass. Here the uint8→float32 cast and the 1/255 scale write
    straight into the NCHW output (one pass, no transpose copy), and the channel ops run on
    contiguous H×W rows. Same operations in the same order on the same dtype, so the result is
    bit-identical to ``apply`` (checked before timing).
    """
    if preprocessing.layout == "NCHW":
        n, h, w, c = pixels.shape
        x = np.empty((n, c, h, w), dtype=np.float32)
        np.multiply(pixels.transpose(0, 3, 1, 2), np.float32(1.0 / 255.0), out=x, dtype=np.float32)
        shape = (1, c, 1, 1)
    else:
        x = pixels.astype(np.float32)
        x *= np.float32(1.0 / 255.0)
        shape = (1, 1, 1, pixels.shape[-1])
    mean, std = _channel_constants(preprocessing, shape)
    x -= mean
    x /= std
    return x


@functools.lru_cache(maxsize=16)
def _channel_constants(
    preprocessing: Preprocessing, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """float32 mean/std shaped to broadcast, built once per preprocessing (≈2 µs per call)."""
    mean = np.asarray(preprocessing.mean, dtype=np.float32).reshape(shape)
    std = np.asarray(preprocessing.std, dtype=np.float32).reshape(shape)
    return mean, std


def proposed_logits(adapter: RuntimeAdapter, pixels: np.ndarray, per_sample: bool) -> np.ndarray:
    """A candidate ``RuntimeAdapter.logits``: what the suggested adapter changes would do.

    Preprocess ``batch_size`` images at a time even in per-sample mode (the per-image runs then
    take contiguous views: no per-image numpy calls, memory still bounded by one batch), with
    :func:`proposed_preprocess`; write each run's logits into one preallocated float32 array
    (no list + ``concatenate`` + ``astype`` copies). Query counting is kept.
    """
    session, names, input_name = adapter._session, [adapter._logits_name], adapter._input_name
    step = 1 if per_sample else adapter.batch_size
    out: np.ndarray | None = None
    for block in range(0, len(pixels), adapter.batch_size):
        feed = proposed_preprocess(
            adapter.preprocessing, pixels[block : block + adapter.batch_size]
        )
        for start in range(0, len(feed), step):
            value = session.run(names, {input_name: feed[start : start + step]})[0]
            adapter.counter.calls += 1
            if out is None:
                out = np.empty((len(pixels), *value.shape[1:]), dtype=np.float32)
            out[block + start : block + start + len(value)] = value
    adapter.counter.images += len(pixels)
    return out if out is not None else np.empty((0,), dtype=np.float32)


class _Prenormalised:
    """Stands in for the adapter's preprocessing when the input is already normalised NCHW."""

    layout = "NCHW"

    @staticmethod
    def apply(pixels: np.ndarray) -> np.ndarray:
        return pixels


# ---------------------------------------------------------------------------- timing
Workload = Callable[[int], object]  # forwards call-sized chunk ``j`` of a prepared input


@dataclass(frozen=True)
class Mode:
    """How images reach onnxruntime: ``images`` per ``logits`` call, batched or one by one."""

    label: str
    images: int
    per_sample: bool


MODES = (
    Mode("1", 1, per_sample=False),  # one image per logits call: fixed per-call cost
    Mode("16 per-sample", 16, per_sample=True),  # how per-sample mode (int8-dynamic) runs
    Mode("256", 256, per_sample=False),  # the adapter's default batch
)


def workloads_for(adapter: RuntimeAdapter, pixels: np.ndarray, mode: Mode) -> dict[str, Workload]:
    """One callable per variant; call ``j`` forwards images ``[j*n, (j+1)*n)`` as ``mode`` says.

    ``raw`` issues the same ``session.run`` calls the adapter issues (one per image in
    per-sample mode) on input normalised beforehand, so the difference is the adapter's own
    work. The adapter keeps ``batch_size`` ≥ ``mode.images``, so a batched call is one run.
    """
    session = adapter._session  # the adapter's own session: identical options, arena, threads
    names, input_name = [adapter._logits_name], adapter._input_name
    normalised = adapter.preprocessing.apply(pixels)
    step = 1 if mode.per_sample else mode.images
    bare = copy.copy(adapter)  # shares the session and counter; only the preprocessing differs
    bare.preprocessing = _Prenormalised()  # type: ignore[assignment]

    def starts(j: int) -> range:
        return range(j * mode.images, (j + 1) * mode.images, step)

    def raw(j: int) -> object:
        return [session.run(names, {input_name: normalised[i : i + step]}) for i in starts(j)]

    def preprocess(j: int) -> object:
        return [adapter.preprocessing.apply(pixels[i : i + step]) for i in starts(j)]

    def span(j: int) -> slice:
        return slice(j * mode.images, (j + 1) * mode.images)

    return {
        "raw": raw,
        "adapter": lambda j: adapter.logits(pixels[span(j)], per_sample=mode.per_sample),
        "adapter-no-pre": lambda j: bare.logits(normalised[span(j)], per_sample=mode.per_sample),
        "preprocess": preprocess,
        "proposed": lambda j: proposed_logits(adapter, pixels[span(j)], mode.per_sample),
    }


def one_round(
    workloads: dict[str, Workload], chunk: int, rotation: int, prime: bool = False
) -> dict[str, float]:
    """Each variant once on the same chunk, back to back, starting at position ``rotation``.

    Back to back, the variants of a round share the machine's momentary state (another job's
    time slice, CPU frequency); rotating the start puts every variant in every position equally
    often, so none is favoured by always following a cache-warming or cache-cold neighbour.
    ``prime`` runs the first variant once untimed, so that after switching models the first
    timed call does not pay for reloading the weights into cache (visible for sub-ms calls).
    """
    names = list(workloads)
    shift = rotation % len(names)
    order = names[shift:] + names[:shift]
    if prime:
        workloads[order[0]](chunk)
    seconds = {}
    for name in order:
        started = time.perf_counter()
        workloads[name](chunk)
        seconds[name] = time.perf_counter() - started
    return seconds


def interleaved_times(
    workloads: dict[str, Workload], chunks: int, repeats: int
) -> dict[str, list[float]]:
    """Per-call times of every variant: ``repeats`` passes over ``chunks`` after a warm-up."""
    for fn in workloads.values():  # arena growth, first-call kernel selection
        fn(0)
    times: dict[str, list[float]] = {name: [] for name in workloads}
    for rep in range(repeats):
        for chunk in range(chunks):
            for name, seconds in one_round(workloads, chunk, rep + chunk).items():
                times[name].append(seconds)
    return times


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of per-round ratios: load changes between rounds cancel out."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def paired_difference(minuend: list[float], subtrahend: list[float]) -> float:
    """Median of per-round differences, in seconds."""
    return statistics.median(a - b for a, b in zip(minuend, subtrahend, strict=True))


@dataclass
class Cell:
    """One (precision, mode) measurement; times are per ``logits``-sized call."""

    precision: str
    mode: str
    images_per_call: int
    samples: int
    median_s: dict[str, float]
    images_per_s: dict[str, float]
    adapter_over_raw: float
    no_pre_over_raw: float
    preprocess_over_raw: float
    proposed_over_raw: float
    adapter_extra_us_per_image: float
    proposed_extra_us_per_image: float
    raw_vs_fp32: float | None = None
    adapter_vs_fp32: float | None = None


def measure_cells(
    adapters: dict[str, RuntimeAdapter], pixels: np.ndarray, images_per_mode: int, repeats: int
) -> list[Cell]:
    """Interleaved per-call timings for every precision in every :data:`MODES` entry.

    Each round runs all variants of one precision on one chunk; the precisions of a chunk run
    one after the other, so the cross-precision ratios (throughput relative to fp32) are
    paired in time as well. Each repetition a mode forwards ``images_per_mode`` images (at
    least one call).
    """
    if any(adapter.batch_size < max(m.images for m in MODES) for adapter in adapters.values()):
        raise ValueError("adapters must batch at least as many images as the largest mode")
    chunks = {m: max(1, min(images_per_mode, len(pixels)) // m.images) for m in MODES}
    loads = {
        (p, m): workloads_for(adapter, pixels[: chunks[m] * m.images], m)
        for p, adapter in adapters.items()
        for m in MODES
    }
    times: dict[tuple[str, Mode], dict[str, list[float]]] = {
        key: {v: [] for v in VARIANTS} for key in loads
    }
    for variants in loads.values():  # warm-up: arena growth, first-call kernel selection
        for fn in variants.values():
            fn(0)
    for rep in range(repeats):
        for mode in MODES:
            for chunk in range(chunks[mode]):
                for index, precision in enumerate(adapters):
                    rotation, prime = rep + chunk + index, mode.images < PRIME_BELOW
                    got = one_round(loads[precision, mode], chunk, rotation, prime)
                    for name, seconds in got.items():
                        times[precision, mode][name].append(seconds)
    cells = []
    for (precision, mode), t in times.items():
        medians = {name: statistics.median(values) for name, values in t.items()}
        n = mode.images
        cell = Cell(
            precision=precision,
            mode=mode.label,
            images_per_call=n,
            samples=len(t["raw"]),
            median_s=medians,
            images_per_s={name: n / s for name, s in medians.items() if name != "preprocess"},
            adapter_over_raw=paired_ratio(t["adapter"], t["raw"]),
            no_pre_over_raw=paired_ratio(t["adapter-no-pre"], t["raw"]),
            preprocess_over_raw=paired_ratio(t["preprocess"], t["raw"]),
            proposed_over_raw=paired_ratio(t["proposed"], t["raw"]),
            adapter_extra_us_per_image=1e6 * paired_difference(t["adapter"], t["raw"]) / n,
            proposed_extra_us_per_image=1e6 * paired_difference(t["proposed"], t["raw"]) / n,
        )
        if "fp32" in adapters:
            base = times["fp32", mode]
            # fp32 time / this time = this precision's throughput relative to fp32
            cell.raw_vs_fp32 = paired_ratio(base["raw"], t["raw"])
            cell.adapter_vs_fp32 = paired_ratio(base["adapter"], t["adapter"])
        cells.append(cell)
    return cells


def check_proposed_matches(adapters: dict[str, RuntimeAdapter], pixels: np.ndarray) -> bool:
    """The candidate path must return exactly the adapter's logits, or its timing is moot."""
    for adapter in adapters.values():
        for dtype in (np.uint8, np.float32, np.float64):  # the adapter takes float pixels too
            images = pixels.astype(dtype)
            expected = adapter.preprocessing.apply(images)
            if not np.array_equal(proposed_preprocess(adapter.preprocessing, images), expected):
                return False
        for per_sample in (True, False):
            expected = adapter.logits(pixels, per_sample=per_sample)
            if not np.array_equal(proposed_logits(adapter, pixels, per_sample), expected):
                return False
    return True


class _NullSession:
    """Answers ``run`` with zeros at once: what is left of a call is the adapter's own work."""

    def __init__(self, classes: int) -> None:
        self.classes = classes

    def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        (batch,) = feed.values()
        return [np.zeros((len(batch), self.classes), dtype=np.float32) for _ in names]


def python_overhead(adapter: RuntimeAdapter, pixels: np.ndarray, repeats: int) -> dict[str, Any]:
    """µs per image the adapter (and the proposed path) spend outside onnxruntime, per mode.

    Timed against a session that returns at once, taking the minimum over ``repeats`` timeit
    runs: pure CPU-bound Python, so the minimum is the cost without another job's
    interference — a load-independent number to add to a measured ``session.run`` time.
    """
    null = copy.copy(adapter)
    null._session = _NullSession(adapter.num_classes)  # type: ignore[assignment]
    result: dict[str, Any] = {}
    for mode in MODES:
        images = pixels[: mode.images]
        step = 1 if mode.per_sample else mode.images
        normalised = adapter.preprocessing.apply(images)
        runs = {
            "null_run": lambda n=normalised, k=step: [
                null._session.run([], {"x": n[i : i + k]}) for i in range(0, len(n), k)
            ],
            "adapter": lambda x=images, m=mode: null.logits(x, per_sample=m.per_sample),
            "proposed": lambda x=images, m=mode: proposed_logits(null, x, m.per_sample),
            "preprocess": lambda x=images, k=step: [
                adapter.preprocessing.apply(x[i : i + k]) for i in range(0, len(x), k)
            ],
            "proposed_preprocess": lambda x=images: proposed_preprocess(adapter.preprocessing, x),
        }
        number = max(4, 512 // mode.images)
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for fn in runs.values():  # warm-up: the allocator's first big blocks, lazy caches
            timeit.timeit(fn, number=number)
        for _ in range(repeats):  # interleaved, so a burst of load cannot hit one variant only
            for name, fn in runs.items():
                samples[name].append(timeit.timeit(fn, number=number) / number / mode.images)
        best = {name: min(values) for name, values in samples.items()}
        result[mode.label] = {
            "adapter_us_per_image": 1e6 * (best["adapter"] - best["null_run"]),
            "proposed_us_per_image": 1e6 * (best["proposed"] - best["null_run"]),
            "preprocess_us_per_image": 1e6 * best["preprocess"],
            "proposed_preprocess_us_per_image": 1e6 * best["proposed_preprocess"],
        }
    return result


def dynamic_quant_costs(
    adapter: RuntimeAdapter, pixels: np.ndarray, repeats: int
) -> dict[str, Any]:
    """Batch dependence of a dynamic-quant graph and the throughput price of per-sample mode.

    The logit scale is reported next to the differences: an untrained network's logits are
    small, so a raw |Δlogit| means little without it.
    """
    dependence = batch_dependence(adapter, pixels, batch_size=256)
    adapter.batch_size = 256
    times = interleaved_times(
        {
            "per_sample": lambda _: adapter.logits(pixels, per_sample=True),
            "batched": lambda _: adapter.logits(pixels, per_sample=False),
        },
        chunks=1,
        repeats=repeats,
    )
    logits = adapter.logits(pixels, per_sample=True)
    return {
        "images": len(pixels),
        "batch_dependence": asdict(dependence),
        "logit_abs_mean": float(np.abs(logits).mean()),
        "logit_top2_gap_median": float(np.median(np.diff(np.sort(logits, axis=1)[:, -2:]))),
        "per_sample_images_per_s": len(pixels) / statistics.median(times["per_sample"]),
        "batched_images_per_s": len(pixels) / statistics.median(times["batched"]),
        "batched_over_per_sample_speed": paired_ratio(times["per_sample"], times["batched"]),
    }


# ---------------------------------------------------------------------------- report
def environment(threads: int) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_isa": cpu_isa_flags(),
        "intra_op_threads": threads if threads else "ort default (0)",
    }


def markdown(result: dict[str, Any]) -> str:
    """The tables the lead pastes into BENCHMARKS.md."""
    load, env = result["loadavg"], result["environment"]
    lines = [
        f"model: {result['model']}; images: {result['images']}; "
        f"threads: {env['intra_op_threads']}; "
        f"repeats: {result['repeats']} ({result['images_per_mode']} images per small mode each); "
        f"load average (1 min) before/after: {load['before'][0]:.2f} / {load['after'][0]:.2f} "
        f"on {env['cpu_count']} CPUs; wall {result['wall_s']:.0f} s; "
        f"proposed path bit-identical: {result['proposed_bit_identical']}",
        "",
        "| precision | images per call | raw img/s | adapter img/s | adapter/raw "
        "| adapter +µs/img | no-pre/raw | preprocess/raw | proposed/raw | proposed +µs/img "
        "| raw × fp32 | adapter × fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in result["cells"]:
        ips = cell["images_per_s"]
        vs = (
            f"{cell['raw_vs_fp32']:.2f} | {cell['adapter_vs_fp32']:.2f}"
            if cell["raw_vs_fp32"] is not None
            else "– | –"
        )
        lines.append(
            f"| {cell['precision']} | {cell['mode']} | {ips['raw']:,.0f} | {ips['adapter']:,.0f} "
            f"| {cell['adapter_over_raw']:.3f} | {cell['adapter_extra_us_per_image']:.1f} "
            f"| {cell['no_pre_over_raw']:.3f} | {cell['preprocess_over_raw']:.3f} "
            f"| {cell['proposed_over_raw']:.3f} | {cell['proposed_extra_us_per_image']:.1f} | {vs} |"
        )
    cells = result["cells"]
    within = {
        key: sum(c[key] <= TARGET_OVERHEAD for c in cells)
        for key in ("adapter_over_raw", "proposed_over_raw")
    }
    lines += [
        "",
        f"adapter/raw ≤ {TARGET_OVERHEAD} in {within['adapter_over_raw']}/{len(cells)} rows; "
        f"proposed/raw ≤ {TARGET_OVERHEAD} in {within['proposed_over_raw']}/{len(cells)} rows.",
    ]
    overhead = result["python_overhead_us"]
    lines += [
        "",
        "Adapter work outside onnxruntime (null session, min of 15 interleaved timeit runs, µs per image) "
        "and the ratio it implies on each precision's measured median `session.run` time:",
        "",
        "| images per call | adapter µs/img | of which preprocess | proposed µs/img "
        "| of which preprocess | "
        + " | ".join(f"{p} adapter/raw → proposed/raw" for p in result["precisions"])
        + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(result["precisions"]),
    ]
    raw_us = {
        (c["precision"], c["mode"]): 1e6 * c["median_s"]["raw"] / c["images_per_call"]
        for c in result["cells"]
    }
    for mode, o in overhead.items():
        implied = " | ".join(
            f"{1 + o['adapter_us_per_image'] / raw_us[p, mode]:.3f} → "
            f"{1 + o['proposed_us_per_image'] / raw_us[p, mode]:.3f}"
            for p in result["precisions"]
        )
        lines.append(
            f"| {mode} | {o['adapter_us_per_image']:.1f} | {o['preprocess_us_per_image']:.1f} "
            f"| {o['proposed_us_per_image']:.1f} | {o['proposed_preprocess_us_per_image']:.1f} "
            f"| {implied} |"
        )
    runs = result.get("int8_dynamic") or []
    if runs:
        lines += [
            "",
            f"int8-dynamic: batched (256) vs per-sample logits on {result['images']} images",
            "",
            "| images | saturated outliers | max abs Δlogit | mean abs Δlogit | mean abs logit "
            "| median top-2 gap | top-1 flip rate | per-sample img/s | batched img/s "
            "| batched speed-up |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for dyn in runs:
            dep = dyn["batch_dependence"]
            lines.append(
                f"| {dyn['images']} | {dyn['outlier_fraction']:.0%} "
                f"| {dep['max_abs_logit_diff']:.2e} | {dep['mean_abs_logit_diff']:.2e} "
                f"| {dyn['logit_abs_mean']:.2e} | {dyn['logit_top2_gap_median']:.2e} "
                f"| {dep['top1_flip_rate']:.4f} | {dyn['per_sample_images_per_s']:,.0f} "
                f"| {dyn['batched_images_per_s']:,.0f} "
                f"| {dyn['batched_over_per_sample_speed']:.2f}× |"
            )
    return "\n".join(lines)


def run(
    repeats: int,
    threads: int,
    images_per_mode: int,
    dependence_images: int,
    outlier_fraction: float,
    seed: int,
    artifacts_dir: Path | None,
    dataset: str | None = None,
    data_root: str | None = None,
) -> dict[str, Any]:
    """Build (or reuse) the artifacts, then measure everything in this one process."""
    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-adapter-") as tmp:
        if artifacts_dir is None:
            built = build_artifacts(Path(tmp), seed=seed)
            paths, build_s = built.paths, built.build_s
            label = f"{built.model} (untrained, seed {seed}), 32×32×3 input, 43 classes"
        else:
            candidates = {p: artifacts_dir / f"{p}.onnx" for p in ALL_PRECISIONS}
            paths = {p: path for p, path in candidates.items() if path.is_file()}
            if not paths:
                raise ModelError(f"no <precision>.onnx files in {artifacts_dir}")
            build_s, label = {}, str(artifacts_dir)
        adapters = {
            p: RuntimeAdapter.from_path(path, precision=p, threads=threads)
            for p, path in paths.items()
        }
        shape = next(iter(adapters.values())).input_shape
        rng = np.random.default_rng(seed + 1)
        pool = None if dataset is None else _test_images(dataset, data_root, shape)
        pixels = synthetic_images(rng, 256, shape) if pool is None else pool[:256]
        bit_identical = check_proposed_matches(adapters, pixels[:8])
        overhead = python_overhead(next(iter(adapters.values())), pixels, 15)
        cells = measure_cells(adapters, pixels, images_per_mode, repeats)
        dynamic = []
        if "int8-dynamic" in adapters:
            for fraction in sorted({0.0, outlier_fraction}):
                if pool is None:
                    realistic = synthetic_images(rng, dependence_images, shape, fraction)
                else:
                    picked = np.sort(rng.choice(len(pool), dependence_images, replace=False))
                    realistic = with_saturated_outliers(rng, pool[picked], fraction)
                costs = dynamic_quant_costs(adapters["int8-dynamic"], realistic, 3)
                dynamic.append({"outlier_fraction": fraction, **costs})
    return {
        "model": label,
        "repeats": repeats,
        "images_per_mode": images_per_mode,
        "precisions": list(paths),
        "images": "synthetic" if dataset is None else f"{dataset} test split ({data_root})",
        "seed": seed,
        "environment": environment(threads),
        "loadavg": {"before": list(load_before), "after": list(os.getloadavg())},
        "wall_s": time.perf_counter() - started,
        "build_s": build_s,
        "proposed_bit_identical": bit_identical,
        "cells": [asdict(cell) for cell in cells],
        "python_overhead_us": overhead,
        "int8_dynamic": dynamic,
    }


def _test_images(dataset: str, data_root: str | None, shape: tuple[int, ...]) -> np.ndarray:
    """The test split of a registered dataset, checked against the model's input shape."""
    from harness.data.base import load_dataset

    images = load_dataset(dataset, data_root).x_test
    if images.shape[1:] != tuple(shape) or len(images) < 256:
        raise DataError(
            f"dataset {dataset!r} test split has shape {images.shape}; the bench needs at "
            f"least 256 images of shape {tuple(shape)}"
        )
    return images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions per variant")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="onnxruntime intra-op threads for every session (0: ORT's default, all cores); "
        "1 by default because multi-threaded sessions on a shared, loaded machine contend for "
        "cores and make timings unrepeatable",
    )
    parser.add_argument(
        "--images-per-mode",
        type=int,
        default=64,
        help="images each small mode forwards per precision and repetition (256 always does 256)",
    )
    parser.add_argument(
        "--dependence-images", type=int, default=512, help="images for the int8-dynamic section"
    )
    parser.add_argument(
        "--outlier-fraction",
        type=float,
        default=0.02,
        help="share of them replaced by saturated stripes (also measured without any)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the model and the images")
    parser.add_argument(
        "--artifacts", type=Path, default=None, help="folder with <precision>.onnx to time instead"
    )
    parser.add_argument(
        "--dataset", default=None, help="time on this dataset's test images (default: synthetic)"
    )
    parser.add_argument("--data-root", default=None, help="where --dataset reads from")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args(argv)
    for name in ("repeats", "images_per_mode", "dependence_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0.0 <= args.outlier_fraction <= 1.0:
        parser.error("--outlier-fraction must be between 0 and 1")
    result = run(
        args.repeats,
        args.threads,
        args.images_per_mode,
        args.dependence_images,
        args.outlier_fraction,
        args.seed,
        args.artifacts,
        args.dataset,
        args.data_root,
    )
    print(markdown(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
