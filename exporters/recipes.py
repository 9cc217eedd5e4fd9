"""Typed quantization recipes and their one mapping onto onnxruntime's untyped arguments.

onnxruntime's quantizers take loose keyword arguments, enums and a free-form ``extra_options``
dict; a typo there is silently ignored and a result is then hard to reproduce. A recipe is a
validated, frozen record of *every* choice that shapes a quantized artifact. It is written into
the artifact's sidecar as-is, and this module is the only place that turns it into onnxruntime
enums and keyword arguments, so the sidecar and the call can never disagree.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from harness.core.errors import ModelError, validation_message

DataTypeName = Literal["int8", "uint8", "int4", "uint4", "int16", "uint16"]
CalibrationName = Literal["minmax", "entropy", "percentile"]

_QUANT_TYPES: dict[str, QuantType] = {
    "int8": QuantType.QInt8,
    "uint8": QuantType.QUInt8,
    "int4": QuantType.QInt4,
    "uint4": QuantType.QUInt4,
    "int16": QuantType.QInt16,
    "uint16": QuantType.QUInt16,
}
_CALIBRATION_METHODS: dict[str, CalibrationMethod] = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
_FOUR_BIT = {"int4", "uint4"}


class QuantRecipe(BaseModel):
    """Everything that determines a quantized artifact, besides the fp32 model and the images.

    ``format``: ``none`` copies the model, ``dynamic`` quantizes weights offline and activations
    at run time (no calibration), ``qdq`` inserts Quantize/DequantizeLinear pairs with
    activation ranges calibrated on images. The histogram fields only matter for the entropy
    and percentile calibrators; they are explicit because onnxruntime's ``quantize_static``
    does not forward bin counts, and its default (128 bins, 128 quantized bins) makes entropy
    calibration return exactly the min/max range.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    precision: str
    format: Literal["none", "dynamic", "qdq"]
    weight_type: DataTypeName | None = None
    activation_type: DataTypeName | None = None
    per_channel: bool = False
    reduce_range: bool = False
    calibration_method: CalibrationName | None = None
    calibration_size: int | None = Field(default=None, gt=0)
    calibration_seed: int = 0
    calibration_batch_size: int = Field(default=32, gt=0)
    histogram_bins: int = Field(default=2048, ge=128)
    entropy_quantized_bins: int = Field(default=128, ge=2)
    percentile: float = Field(default=99.999, gt=50.0, le=100.0)
    preprocess: bool = False
    extra_options: dict[str, bool | int | float | str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> QuantRecipe:
        """Reject combinations onnxruntime would ignore or misread rather than run them."""
        if self.format == "none":
            if self.weight_type or self.activation_type or self.calibration_method:
                raise ValueError("format 'none' takes no weight/activation type or calibration")
        elif self.weight_type is None:
            raise ValueError(f"format '{self.format}' needs a weight_type")
        if self.format == "dynamic":
            if self.activation_type is not None or self.calibration_method is not None:
                raise ValueError(
                    "format 'dynamic' quantizes activations at run time: "
                    "no activation_type or calibration_method"
                )
            if self.weight_type in _FOUR_BIT:
                raise ValueError("4-bit weights need format 'qdq'")
        if self.format == "qdq" and (
            self.activation_type is None or self.calibration_method is None
        ):
            raise ValueError("format 'qdq' needs an activation_type and a calibration_method")
        if self.activation_type in _FOUR_BIT:
            raise ValueError("4-bit activations are not supported; use uint8 or int8")
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.format == "qdq"


def resolve_recipe(default: QuantRecipe, overrides: dict[str, Any] | None) -> QuantRecipe:
    """Apply user ``overrides`` to a quantizer's default recipe; bad fields raise ModelError."""
    if not overrides:
        return default
    if "precision" in overrides and overrides["precision"] != default.precision:
        raise ModelError(
            f"recipe override cannot change precision '{default.precision}' "
            f"to '{overrides['precision']}'; pick the other precision instead"
        )
    try:
        return QuantRecipe.model_validate({**default.model_dump(), **overrides})
    except ValidationError as exc:
        message = validation_message(
            exc, f"{default.precision} recipe field", QuantRecipe.model_fields
        )
        raise ModelError(message) from None


def ort_quant_type(name: str) -> QuantType:
    """The onnxruntime QuantType for a recipe data-type name."""
    return _QUANT_TYPES[name]


def ort_calibration_method(recipe: QuantRecipe) -> CalibrationMethod:
    """The onnxruntime CalibrationMethod of a calibrated recipe."""
    if recipe.calibration_method is None:
        raise ModelError(f"precision '{recipe.precision}' is not calibrated")
    return _CALIBRATION_METHODS[recipe.calibration_method]


def calibrator_options(recipe: QuantRecipe) -> dict[str, Any]:
    """Options for onnxruntime's ``create_calibrator`` (its own key names, not extra_options)."""
    if recipe.calibration_method == "entropy":
        return {
            "num_bins": recipe.histogram_bins,
            "num_quantized_bins": recipe.entropy_quantized_bins,
        }
    if recipe.calibration_method == "percentile":
        return {"num_bins": recipe.histogram_bins, "percentile": recipe.percentile}
    return {}


def dynamic_kwargs(recipe: QuantRecipe) -> dict[str, Any]:
    """Keyword arguments for ``onnxruntime.quantization.quantize_dynamic`` (paths excluded)."""
    if recipe.format != "dynamic" or recipe.weight_type is None:
        raise ModelError(f"recipe for '{recipe.precision}' is not a dynamic recipe")
    return {
        "per_channel": recipe.per_channel,
        "reduce_range": recipe.reduce_range,
        "weight_type": ort_quant_type(recipe.weight_type),
        "extra_options": dict(recipe.extra_options),
    }


def static_kwargs(recipe: QuantRecipe) -> dict[str, Any]:
    """Keyword arguments for ``onnxruntime.quantization.quantize_static`` (paths/reader excluded)."""
    if recipe.format != "qdq" or recipe.weight_type is None or recipe.activation_type is None:
        raise ModelError(f"recipe for '{recipe.precision}' is not a QDQ recipe")
    return {
        "quant_format": QuantFormat.QDQ,
        "per_channel": recipe.per_channel,
        "reduce_range": recipe.reduce_range,
        "weight_type": ort_quant_type(recipe.weight_type),
        "activation_type": ort_quant_type(recipe.activation_type),
        "calibrate_method": ort_calibration_method(recipe),
        "extra_options": dict(recipe.extra_options),
    }


def jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Render onnxruntime kwargs for a sidecar: enums by name, keys sorted."""
    return {
        key: (value.name if isinstance(value, Enum) else value)
        for key, value in sorted(kwargs.items())
    }
