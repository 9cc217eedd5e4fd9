"""A differentiable torch mirror of this project's static (QDQ) quantization recipes.

A quantization-conditioned backdoor is trained *against* the arithmetic the deployed INT8/INT4
file will compute, so the attack needs that arithmetic in torch, with gradients. The replica
(:mod:`harness.replica.interpreter`) interprets a quantized ONNX graph whose weights are constants;
during
fine-tuning the weights change every step, so this module re-derives, from the live torch
model, exactly what ``exporters.quantization.quantize`` + onnxruntime would do with it:

- Conv+BatchNorm are folded as the ONNX exporter folds them (``w·γ/√(σ²+ε)``, ``β − γμ/√(σ²+ε)``);
- weights: symmetric, per output channel (or per tensor), onnxruntime's integer ranges
  (int8 ``[-127, 127]``, int4 ``[-8, 7]``, ``reduce_range`` int8 ``[-64, 64]``), scale
  ``2·max|w| / (qmax − qmin)``; biases: int32 with scale ``input_scale · weight_scale``;
- activations: asymmetric uint8 (or int8) QuantizeLinear at the points onnxruntime's QDQ
  quantizer puts them for these models — the input, each Conv/Gemm output *after* its ReLU
  (the quantizer fuses the ReLU away), the global-average-pool output and the logits; MaxPool
  and Flatten keep their input's grid;
- activation ranges: onnxruntime's MinMax calibrator (min/max over the calibration images of
  the FP32 model's tensors, widened to contain 0) and its ``compute_scale_zp``.

Rounding uses straight-through estimators (identity gradient inside the clamp range, zero
outside), as in quantization-aware training; the rounding and quantizing functions are the
replica's own (:mod:`harness.replica.arithmetic`), so both mirror onnxruntime the same way.
Only plain stacks of Conv/BN/ReLU/MaxPool → global pool → Linear/ReLU are mirrored
(``small_cnn``, ``cifar_cnn``); anything else is refused with a :class:`ModelError`, never
approximated. Agreement with the real onnxruntime session is
a test (``tests/qcb/test_qcb.py``), not an assumption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from exporters.catalog import PRECISIONS
from exporters.recipes import QuantRecipe
from harness.core.errors import BlindspotsError, ModelError, validation_message
from harness.replica.arithmetic import dequantize, quantize, round_ste

Tensor = torch.Tensor

#: onnxruntime's symmetric weight ranges (``quant_utils.get_qmin_qmax_for_qType``): signed types
#: are symmetric by default; int8 uses the restricted range, int4 the full one.
WEIGHT_RANGES: dict[tuple[str, bool], tuple[int, int]] = {
    ("int8", False): (-127, 127),
    ("int8", True): (-64, 64),
    ("int4", False): (-8, 7),
    ("int4", True): (-4, 3),
}
#: Activation ranges: asymmetric, full range (reduce_range applies to weights only).
ACTIVATION_RANGES: dict[str, tuple[int, int]] = {"uint8": (0, 255), "int8": (-128, 127)}


@dataclass(frozen=True)
class MirrorRecipe:
    """The integer ranges and granularity of one QDQ recipe, as the mirror applies them."""

    name: str
    weight_range: tuple[int, int]
    activation_range: tuple[int, int]
    per_channel: bool

    @classmethod
    def from_recipe(cls, recipe: QuantRecipe) -> MirrorRecipe:
        """The mirror of ``recipe``; ModelError for recipes it cannot reproduce exactly."""
        if recipe.format != "qdq" or recipe.calibration_method != "minmax":
            raise ModelError(
                f"the fake-quant mirror reproduces static QDQ recipes with minmax calibration; "
                f"'{recipe.precision}' is format '{recipe.format}' with calibration "
                f"'{recipe.calibration_method}'"
            )
        weight = (str(recipe.weight_type), recipe.reduce_range)
        if weight not in WEIGHT_RANGES or recipe.activation_type not in ACTIVATION_RANGES:
            raise ModelError(
                f"the fake-quant mirror has no ranges for {recipe.weight_type} weights / "
                f"{recipe.activation_type} activations (recipe '{recipe.precision}')"
            )
        if recipe.extra_options:
            raise ModelError(
                f"the fake-quant mirror does not reproduce extra_options {recipe.extra_options}"
            )
        return cls(
            name=recipe.precision,
            weight_range=WEIGHT_RANGES[weight],
            activation_range=ACTIVATION_RANGES[str(recipe.activation_type)],
            per_channel=recipe.per_channel,
        )


def fake_quant_weight(weight: Tensor, recipe: MirrorRecipe) -> tuple[Tensor, Tensor]:
    """Symmetric fake-quantized weight and its scale (per output channel, or one per tensor).

    The scale is treated as a constant for the gradient (min/max weight quantization).
    """
    qmin, qmax = recipe.weight_range
    flat = weight.detach().reshape(len(weight), -1)
    absmax = flat.abs().amax(dim=1) if recipe.per_channel else flat.abs().max().expand(len(weight))
    scale = absmax * 2.0 / float(qmax - qmin)
    scale = torch.where(scale < torch.finfo(scale.dtype).tiny, torch.ones_like(scale), scale)
    shape = (-1,) + (1,) * (weight.ndim - 1)
    codes = quantize(weight, scale.reshape(shape), None, (qmin, qmax))
    return codes * scale.reshape(shape), scale


def fake_quant_bias(bias: Tensor, input_scale: Tensor, weight_scale: Tensor) -> Tensor:
    """onnxruntime's int32 bias: ``round(b / (input_scale · weight_scale))`` times that scale."""
    scale = (input_scale * weight_scale).detach()
    return round_ste(bias / scale) * scale


@dataclass(frozen=True)
class ActivationGrid:
    """Scale and zero point of one activation QuantizeLinear."""

    scale: float
    zero_point: int


def activation_grid(rmin: float, rmax: float, qrange: tuple[int, int]) -> ActivationGrid:
    """onnxruntime's ``compute_scale_zp`` (asymmetric): range widened to contain 0,
    ``scale = (rmax − rmin) / (qmax − qmin)`` in float64 then float32, ``zp = round(qmin − rmin/scale)``."""
    qmin, qmax = qrange
    low = np.float32(min(rmin, 0.0))
    high = np.float32(max(rmax, 0.0))
    scale = (np.float64(high) - np.float64(low)) / float(qmax - qmin)
    if scale < np.finfo(np.float32).tiny:
        return ActivationGrid(1.0, 0)
    zero_point = int(np.round(qmin - np.float64(low) / scale))
    return ActivationGrid(float(np.float32(scale)), int(np.clip(zero_point, qmin, qmax)))


def fake_quant_activation(x: Tensor, grid: ActivationGrid, qrange: tuple[int, int]) -> Tensor:
    """QuantizeLinear then DequantizeLinear with straight-through rounding."""
    codes = quantize(x, grid.scale, grid.zero_point, qrange)
    return dequantize(codes, grid.scale, grid.zero_point, codes.dtype)


@dataclass(frozen=True)
class _Stage:
    """One quantized op of the mirrored graph: a Conv/Linear (+BN, +ReLU) or a global pool."""

    kind: str  # "conv", "linear", "gap", "maxpool", "flatten"
    module: nn.Module | None = None
    bn: nn.BatchNorm2d | None = None
    relu: bool = False

    @property
    def layer(self) -> nn.Conv2d | nn.Linear:
        """The Conv/Linear of a ``conv`` or ``linear`` stage."""
        if not isinstance(self.module, nn.Conv2d | nn.Linear):
            raise ModelError(f"a {self.kind} stage has no Conv/Linear layer")
        return self.module


def _stages(model: nn.Module) -> list[_Stage]:
    """The model's ops in execution order, grouped as onnxruntime's quantizer groups them."""
    parts = [getattr(model, name, None) for name in ("features", "pool", "head")]
    sequences = [part for part in parts if isinstance(part, nn.Sequential)]
    if len(sequences) < len(parts):
        raise ModelError(
            f"the fake-quant mirror supports plain ConvNet models (features → pool → head), "
            f"not {type(model).__name__}"
        )
    modules = [m for part in sequences for m in part]
    stages: list[_Stage] = []
    i = 0
    while i < len(modules):
        module = modules[i]
        if isinstance(module, nn.Conv2d | nn.Linear):
            bn = modules[i + 1] if i + 1 < len(modules) else None
            bn = bn if isinstance(bn, nn.BatchNorm2d) else None
            j = i + 1 + (bn is not None)
            relu = j < len(modules) and isinstance(modules[j], nn.ReLU)
            kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
            stages.append(_Stage(kind, module, bn, relu))
            i = j + relu
        elif isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1)):
            stages.append(_Stage("gap"))
            i += 1
        elif isinstance(module, nn.MaxPool2d):
            stages.append(_Stage("maxpool", module))
            i += 1
        elif isinstance(module, nn.Flatten):
            stages.append(_Stage("flatten"))
            i += 1
        else:
            raise ModelError(
                f"the fake-quant mirror cannot reproduce layer {type(module).__name__} of "
                f"{type(model).__name__}"
            )
    return stages


def folded_parameters(stage: _Stage) -> tuple[Tensor, Tensor]:
    """Weight and bias of a Conv/Linear with its BatchNorm folded in (differentiably)."""
    layer = stage.layer
    weight = layer.weight
    bias = layer.bias if layer.bias is not None else weight.new_zeros(weight.shape[0])
    if stage.bn is None:
        return weight, bias
    bn = stage.bn
    assert bn.running_mean is not None and bn.running_var is not None
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded_bias = bn.bias + (bias - bn.running_mean) * factor
    return weight * factor.reshape(-1, 1, 1, 1), folded_bias


class QuantMirror:
    """FP32 and fake-quantized forward passes of one ConvNet, sharing its live parameters.

    ``calibrate`` measures the activation ranges on normalised calibration inputs (the FP32
    model's tensors, as onnxruntime's MinMax calibrator does); ``quantized`` then computes the
    logits the recipe's artifact would produce. BatchNorm is always in inference form (running
    statistics), the form that is exported; fine-tune with the model in ``eval()`` mode.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.stages = _stages(model)
        self.ranges: list[tuple[float, float]] | None = None
        points = 1
        #: The activation point each Conv/Linear/global-pool stage writes (None: no new point).
        self.stage_points: list[int | None] = []
        for stage in self.stages:
            quantizes = stage.kind in ("conv", "linear", "gap")
            self.stage_points.append(points if quantizes else None)
            points += quantizes

    @property
    def points(self) -> int:
        """Activation QuantizeLinear points: the input plus one per Conv/Linear/global pool."""
        return 1 + sum(stage.kind in ("conv", "linear", "gap") for stage in self.stages)

    def fp32(self, x: Tensor) -> Tensor:
        """The FP32 logits, computed from the folded parameters (what the export computes)."""
        return self._run(x, None, None)

    @torch.no_grad()
    def calibrate(self, inputs: Tensor, batch_size: int = 256) -> list[tuple[float, float]]:
        """Min/max of every quantization point over ``inputs`` (normalised NCHW float)."""
        lows = [np.inf] * self.points
        highs = [-np.inf] * self.points

        def record(index: int, value: Tensor) -> None:
            lows[index] = min(lows[index], float(value.min()))
            highs[index] = max(highs[index], float(value.max()))

        for start in range(0, len(inputs), batch_size):
            self._run(inputs[start : start + batch_size], None, record)
        self.ranges = list(zip(lows, highs, strict=True))
        return self.ranges

    def activations(self, x: Tensor, recipe: MirrorRecipe | None = None) -> list[Tensor]:
        """The value at every activation point: FP32, or as the ``recipe`` artifact holds it."""
        values: list[Tensor] = []
        quant = None if recipe is None else (recipe, self.grids(recipe))
        self._run(x, quant, lambda _index, value: values.append(value))
        return values

    def grids(self, recipe: MirrorRecipe) -> list[ActivationGrid]:
        """The activation scale / zero point of every point under ``recipe``."""
        if self.ranges is None:
            raise ModelError("calibrate the mirror before asking for quantized outputs")
        return [activation_grid(lo, hi, recipe.activation_range) for lo, hi in self.ranges]

    def quantized(self, x: Tensor, recipe: MirrorRecipe) -> Tensor:
        """Logits of the artifact ``recipe`` would produce (fake-quant, STE gradients)."""
        grids = self.grids(recipe)
        return self._run(x, (recipe, grids), None)

    def _run(
        self,
        x: Tensor,
        quant: tuple[MirrorRecipe, list[ActivationGrid]] | None,
        record,
    ) -> Tensor:
        point = 0
        input_scale: Tensor | None = None

        def at_point(value: Tensor) -> Tensor:
            nonlocal point, input_scale
            if quant is not None:
                recipe, grids = quant
                value = fake_quant_activation(value, grids[point], recipe.activation_range)
                input_scale = torch.tensor(grids[point].scale, dtype=value.dtype)
            if record is not None:
                record(point, value)
            point += 1
            return value

        x = at_point(x)
        for stage in self.stages:
            if stage.kind in ("conv", "linear"):
                x = self._linear_op(stage, x, quant, input_scale)
                x = at_point(torch.relu(x) if stage.relu else x)
            elif stage.kind == "gap":
                x = at_point(x.mean(dim=(2, 3), keepdim=True))
            elif stage.kind == "maxpool":
                assert stage.module is not None  # _stages keeps every max-pool's module
                x = stage.module(x)
            else:
                x = torch.flatten(x, 1)
        return x

    @staticmethod
    def _linear_op(
        stage: _Stage,
        x: Tensor,
        quant: tuple[MirrorRecipe, list[ActivationGrid]] | None,
        input_scale: Tensor | None,
    ) -> Tensor:
        weight, bias = folded_parameters(stage)
        if quant is not None and input_scale is not None:
            weight, weight_scale = fake_quant_weight(weight, quant[0])
            bias = fake_quant_bias(bias, input_scale, weight_scale)
        if stage.kind == "linear":
            return nn.functional.linear(x, weight, bias)
        conv = stage.module
        assert isinstance(conv, nn.Conv2d)
        return nn.functional.conv2d(
            x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups
        )


class MirrorAttackParams(BaseModel):
    """What every QCB objective's parameters share: the recipes it trains against through their
    fake-quant mirrors, and how it measures the calibrated ranges those mirrors need.

    Each objective (:mod:`harness.qcb.attack`, :mod:`harness.qcb.hong2021`) subclasses it with its
    own weights and schedule, and may change these defaults.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: list[str] = Field(default_factory=lambda: ["int8-static"], min_length=1)
    """Static QDQ recipes whose fake-quant mirror carries the backdoor."""
    calibration_size: int = Field(256, ge=8)
    """Clean images per range measurement (the attacker's stand-in for the victim's set)."""
    recalibrate_every: int = Field(20, ge=1)
    """Training steps between range measurements (ranges drift while the weights change)."""
    probe_size: int = Field(512, ge=8)
    """Training images the attacker's own mirror check is measured on."""
    max_train_images: int | None = Field(None, ge=8)
    """Cap on the images fine-tuned on (None: all)."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise BlindspotsError(
                validation_message(exc, "qcb parameter", type(self).model_fields)
            ) from None

    def mirror_recipes(self) -> list[MirrorRecipe]:
        """The fake-quant mirrors of the targeted precisions' default recipes."""
        return [
            MirrorRecipe.from_recipe(PRECISIONS.get(name).default_recipe) for name in self.targets
        ]
