"""Seeded bench artifacts: one model exported and quantized to every precision, in one folder.

Benchmarks time the runtime, not what the model learned: latency depends on the graph's shapes
and operators, not on the weight values. So the network is left at its seeded random
initialisation (no training minutes on a shared machine), and the artifacts are produced by the
very code the runner uses (``export_onnx`` then ``quantize``), so the graphs timed are the graphs
the harness ships. Images are synthetic and seeded; calibration uses the same generator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.artifacts.preprocessing import Preprocessing

ALL_PRECISIONS = ("fp32", "int8-dynamic", "int8-static", "int4")


@dataclass(frozen=True)
class BenchArtifacts:
    """Where the bench model's files are and how they were made."""

    model: str
    image_shape: tuple[int, int, int]
    num_classes: int
    seed: int
    trained: bool
    preprocessing: Preprocessing
    paths: dict[str, Path]
    build_s: dict[str, float] = field(default_factory=dict)


def synthetic_images(
    rng: np.random.Generator,
    n: int,
    image_shape: tuple[int, int, int],
    outlier_fraction: float = 0.0,
) -> np.ndarray:
    """Camera-like uint8 NHWC images, a few of them saturated outliers.

    Uniform noise is a poor stand-in for photographs: its activation ranges are unlike those of
    real inputs, which matters for dynamic quantization (scales come from the data). These are
    smooth colour fields (a coarse 4×4 random grid upsampled) plus mild sensor noise, with a
    per-image brightness and contrast. ``outlier_fraction`` of them are replaced by saturated
    0/255 stripe patterns — the kind of input (glare, a printed trigger) that stretches a
    dynamic-quantization range for every batch-mate.
    """
    h, w, c = image_shape
    coarse = rng.uniform(0.0, 1.0, size=(n, 4, 4, c))
    field_ = np.repeat(np.repeat(coarse, -(-h // 4), axis=1), -(-w // 4), axis=2)[:, :h, :w]
    contrast = rng.uniform(0.2, 0.8, size=(n, 1, 1, 1))
    brightness = rng.uniform(0.1, 0.9, size=(n, 1, 1, 1))
    noise = rng.normal(0.0, 0.03, size=(n, h, w, c))
    images = brightness + contrast * (field_ - 0.5) + noise
    pixels = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
    return with_saturated_outliers(rng, pixels, outlier_fraction)


def with_saturated_outliers(
    rng: np.random.Generator, pixels: np.ndarray, fraction: float
) -> np.ndarray:
    """A copy of uint8 NHWC ``pixels`` with ``fraction`` of the images (chosen by ``rng``)
    replaced by 0/255 vertical stripes, two pixels wide."""
    out = pixels.copy()
    n_outliers = round(fraction * len(out))
    if n_outliers:
        _, h, w, c = out.shape
        chosen = rng.choice(len(out), size=n_outliers, replace=False)
        stripes = ((np.arange(w) // 2) % 2 * 255).astype(np.uint8)
        out[chosen] = np.broadcast_to(stripes[None, :, None], (h, w, c))
    return out


def build_artifacts(
    folder: str | Path,
    model: str = "cifar_cnn",
    num_classes: int = 43,
    image_shape: tuple[int, int, int] = (32, 32, 3),
    precisions: tuple[str, ...] = ALL_PRECISIONS,
    seed: int = 0,
    calibration_size: int = 256,
) -> BenchArtifacts:
    """Build ``model`` (seeded random init), export it and quantize it to ``precisions``.

    Calibration images are :func:`synthetic_images` from ``seed``; the preprocessing is their
    per-channel mean/std, computed the way the runner computes it from a training set.
    """
    import torch

    from exporters.onnx_export import export_onnx
    from exporters.quantization import quantize_all
    from harness.training.models import build_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    calibration = synthetic_images(rng, calibration_size, image_shape)
    preprocessing = Preprocessing.from_images(calibration)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    with torch.random.fork_rng():  # seed the init without touching the caller's torch RNG
        torch.manual_seed(seed)
        network = build_model(model, num_classes, image_shape[2]).eval()
    exported = folder / "exported.onnx"
    export_onnx(network, exported, calibration[:64], preprocessing)
    timings["export_s"] = time.perf_counter() - started

    paths, quantize_timings = quantize_all(exported, folder, precisions, calibration)
    timings.update(quantize_timings)
    return BenchArtifacts(
        model=model,
        image_shape=image_shape,
        num_classes=num_classes,
        seed=seed,
        trained=False,
        preprocessing=preprocessing,
        paths=paths,
        build_s=timings,
    )
