"""Defuse by re-quantization: does a backdoor that lives in one quantized file survive another?

An integrator who suspects the shipped INT8 file can quantize the FP32 model again with another
recipe. Each variant here is one such choice, built with this project's own quantizer
(``exporters.quantization.quantize``) and judged on onnxruntime sessions: per-tensor instead of
per-channel weights, entropy or percentile calibration, other calibration images, 7-bit weights
(``reduce_range``), dynamic INT8 (activation ranges measured per input at run time), W4A8, and a
rounding-aware repair in the spirit of EFRAP (Li et al., ICLR 2024, "Nearest is Not Dearest",
https://arxiv.org/abs/2403.10461).

The repair (:func:`rounding_repair`): quantization backdoors built on weight rounding rely on
round-to-nearest, so EFRAP flips the rounding of the weights whose rounding error is largest
(error-guided flipped rounding) and then learns each weight's rounding direction so the
quantized activations match the FP32 ones on clean data (activation preservation). Here the
flips initialise an AdaRound-style soft rounding (Nagel et al., ICML 2020) of every
Conv/Linear weight, optimised through the fake-quant mirror (:mod:`harness.qcb.fakequant`) to match
the FP32 logits on the defender's clean images, then hardened. The chosen integer codes are
written back as FP32 weights lying exactly on the INT8 grid (each channel's largest weight kept,
so onnxruntime derives the same scale and rounds to exactly these codes), and the result is
quantized with the recipe as deployed. It needs the torch model, as EFRAP needs the FP32 weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.utils import parametrize

from exporters.catalog import PRECISIONS
from exporters.onnx_export import export_onnx
from exporters.quantization import quantize
from harness.artifacts.preprocessing import Preprocessing
from harness.core.kernel_profiles import PROFILES
from harness.pipeline.evaluate import EvaluationImages, measure, seeded_subset
from harness.qcb.attack import fold_batchnorm
from harness.qcb.fakequant import MirrorRecipe, QuantMirror
from harness.runtime.adapter import RuntimeAdapter

Tensor = torch.Tensor


@dataclass(frozen=True)
class Variant:
    """One re-quantization an integrator might choose."""

    name: str
    precision: str
    overrides: dict[str, Any] = field(default_factory=dict)
    other_calibration: bool = False
    repair: bool = False


VARIANTS: tuple[Variant, ...] = (
    Variant("as deployed (int8-static)", "int8-static"),
    Variant("per-tensor weights", "int8-static", {"per_channel": False}),
    Variant("entropy calibration", "int8-static", {"calibration_method": "entropy"}),
    Variant("percentile calibration", "int8-static", {"calibration_method": "percentile"}),
    Variant("other calibration images", "int8-static", other_calibration=True),
    Variant("reduce_range (7-bit weights)", "int8-static", {"reduce_range": True}),
    Variant("int8-dynamic", "int8-dynamic"),
    Variant("int4 (W4A8)", "int4"),
    Variant("rounding repair (EFRAP-style)", "int8-static", repair=True),
)


class RepairParams(BaseModel):
    """Soft-rounding optimisation of :func:`rounding_repair`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flip_error: float = Field(0.3, ge=0.0, le=0.5)
    """Flip the rounding of weights at least this far (in steps) from their nearest code."""
    steps: int = Field(150, ge=0)
    lr: float = Field(0.01, gt=0)
    batch_size: int = Field(64, ge=2)
    regularization: float = Field(0.01, ge=0)
    """Weight of AdaRound's term pushing every soft rounding to 0 or 1."""


class SoftRounding(nn.Module):
    """``w = s · (floor(w₀/s) + h(v))`` with AdaRound's rectified sigmoid ``h``; the largest
    weight of each channel is pinned so the channel's scale cannot move."""

    ZETA, GAMMA = 1.1, -0.1
    scale: Tensor
    floor: Tensor
    pinned: Tensor
    pinned_value: Tensor

    def __init__(self, weight: Tensor, scale: Tensor, up: Tensor, qrange: tuple[int, int]) -> None:
        super().__init__()
        shape = (-1,) + (1,) * (weight.ndim - 1)
        self.register_buffer("scale", scale.reshape(shape))
        self.register_buffer("floor", torch.floor(weight / self.scale))
        peak = weight.abs() == weight.abs().reshape(len(weight), -1).amax(1).reshape(shape)
        self.register_buffer("pinned", peak)
        self.register_buffer("pinned_value", weight.clone())
        self.qrange = qrange
        target = up.float().clamp(0.05, 0.95)  # rectified-sigmoid inverse of the initial choice
        self.v = nn.Parameter(torch.log((target - self.GAMMA) / (self.ZETA - target) + 1e-12))

    def soft(self) -> Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (self.ZETA - self.GAMMA) + self.GAMMA, 0, 1)

    def forward(self, _weight: Tensor) -> Tensor:
        codes = torch.clamp(self.floor + self.soft(), *self.qrange)
        return torch.where(self.pinned, self.pinned_value, codes * self.scale)

    def harden(self) -> Tensor:
        codes = torch.clamp(self.floor + (self.soft() >= 0.5).float(), *self.qrange)
        return torch.where(self.pinned, self.pinned_value, codes * self.scale)


def rounding_repair(
    model: nn.Module,
    clean: np.ndarray,
    preprocessing: Preprocessing,
    params: RepairParams,
    seed: int,
    precision: str = "int8-static",
) -> nn.Module:
    """A copy of ``model`` whose Conv/Linear weights sit on ``precision``'s grid with repaired
    rounding (module doc); quantizing it with that recipe reproduces these codes exactly.

    Each step's mini-batch is ``batch_size`` distinct images of ``clean``, a seeded draw of its
    own (:func:`harness.pipeline.evaluate.seeded_subset`, stream ``qcb-repair-batch``, seed, step).
    """
    recipe = MirrorRecipe.from_recipe(PRECISIONS.get(precision).default_recipe)
    model = fold_batchnorm(copy.deepcopy(model).eval())
    model.requires_grad_(False)
    mirror = QuantMirror(model)
    inputs = torch.from_numpy(preprocessing.apply(clean))
    mirror.calibrate(inputs)
    with torch.no_grad():
        reference = model(inputs)
    layers = [s.layer for s in mirror.stages if s.kind in ("conv", "linear")]
    roundings = [_attach(layer, recipe, params.flip_error) for layer in layers]
    optimizer = torch.optim.Adam([r.v for r in roundings], lr=params.lr)
    for step in range(params.steps):
        batch = seeded_subset(len(inputs), params.batch_size, "qcb-repair-batch", seed, step)
        idx = torch.from_numpy(batch)
        loss = nn.functional.mse_loss(mirror.quantized(inputs[idx], recipe), reference[idx])
        for rounding in roundings:
            soft = rounding.soft()
            loss = loss + params.regularization * (1 - (2 * soft - 1).abs() ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        for layer, rounding in zip(layers, roundings, strict=True):
            hard = rounding.harden()
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
            layer.weight.copy_(hard)
    return model.eval()


def _attach(layer: nn.Conv2d | nn.Linear, recipe: MirrorRecipe, flip_error: float) -> SoftRounding:
    """Soft rounding on ``layer.weight``, initialised to nearest rounding except where the
    rounding error is at least ``flip_error`` steps (those are flipped)."""
    weight = layer.weight.detach()
    qmin, qmax = recipe.weight_range
    flat = weight.reshape(len(weight), -1).abs()
    absmax = flat.amax(1) if recipe.per_channel else flat.max().expand(len(weight))
    scale = torch.where(absmax > 0, absmax * 2.0 / float(qmax - qmin), torch.ones_like(absmax))
    steps = weight / scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    fraction = steps - torch.floor(steps)
    nearest_up = fraction >= 0.5
    flip = (steps - torch.round(steps)).abs() >= flip_error
    rounding = SoftRounding(weight, scale, nearest_up ^ flip, (qmin, qmax))
    parametrize.register_parametrization(layer, "weight", rounding)
    return rounding


# ------------------------------------------------------------------------------------ the table
def evaluate_file(
    path: Path, tests: EvaluationImages, threads: int | None
) -> dict[str, dict[str, float]]:
    """Clean accuracy and ASR of one artifact under every INT8 kernel profile.

    The integrator's own test images (``tests``); measured as every cell is
    (:func:`harness.pipeline.evaluate.measure`), with no FP32 file to agree with.
    """
    return {
        profile: measure(
            RuntimeAdapter.from_path(path, threads=threads, kernel_profile=profile), tests, None
        )
        for profile in PROFILES
    }


def requantize_table(
    fp32_path: Path,
    model: nn.Module,
    preprocessing: Preprocessing,
    calibration: np.ndarray,
    other_calibration: np.ndarray,
    repair_images: np.ndarray,
    tests: EvaluationImages,
    folder: Path,
    seed: int,
    threads: int | None = None,
    variants: tuple[Variant, ...] = VARIANTS,
    repair: RepairParams | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> list[dict[str, Any]]:
    """One row per variant: accuracy and ASR of the re-quantized artifact (both profiles)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, variant in enumerate(variants):
        source = fp32_path
        if variant.repair:
            repaired = rounding_repair(
                model,
                repair_images,
                preprocessing,
                repair or RepairParams(),
                seed,
                variant.precision,
            )
            source = folder / "repaired_fp32.onnx"
            export_onnx(repaired, source, tests.x[:256], preprocessing)
        images = other_calibration if variant.other_calibration else calibration
        target = folder / f"variant{index}.onnx"
        quantize(variant.precision, source, target, images, variant.overrides or None)
        row = {"variant": variant.name, "precision": variant.precision, **variant.overrides}
        row["results"] = evaluate_file(target, tests, threads)
        log(f"requantize {variant.name}: {row['results']['exact']}")
        rows.append(row)
    return rows
