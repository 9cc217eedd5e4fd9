"""The deployment precisions: one plug-in class per onnxruntime quantizer call.

A precision is a :class:`Quantizer` with a default recipe and a ``run`` that writes the
quantized file from a prepared source; :func:`exporters.quantization.quantize` does everything
around it the same way for all of them (validation, working copy, calibration, metadata, smoke
run, sidecar, atomic publication). Each class registers itself in
:data:`exporters.catalog.PRECISIONS`, whose lazy table points here; a third party adds one with
an entry point in ``blindspots.precisions`` (:mod:`harness.core.registry`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import ClassVar

from onnxruntime.quantization import quantize_dynamic, quantize_static
from pydantic import BaseModel

from exporters.calibration import (
    PixelBatchReader,
    write_calibration_cache,
)
from exporters.catalog import PRECISIONS
from exporters.inspection import ort_run_problem
from exporters.recipes import (
    QuantRecipe,
    dynamic_kwargs,
    static_kwargs,
)
from harness.core.errors import ModelError


class QuantizedArtifact(BaseModel):
    """A quantized (or copied) model file, its sidecar and the recipe that produced it."""

    precision: str
    path: str
    sidecar_path: str
    sha256: str
    recipe: QuantRecipe
    notes: list[str]


class Quantizer:
    """One precision: a default recipe and the onnxruntime call that realises it.

    ``run`` writes ``dst`` from ``src`` (already pre-processed if the recipe says so) and
    returns the recipe actually applied, which differs from the requested one only when a
    documented fallback kicked in (explained in ``notes``).
    """

    default_recipe: ClassVar[QuantRecipe]

    def run(
        self,
        src: Path,
        dst: Path,
        recipe: QuantRecipe,
        calibration: PixelBatchReader | None,
        work_dir: Path,
        notes: list[str],
    ) -> QuantRecipe:
        raise NotImplementedError


@PRECISIONS.register("fp32")
class FP32Copy(Quantizer):
    """The unquantized baseline: a byte copy, so its sha256 equals the exported model's."""

    default_recipe = QuantRecipe(precision="fp32", format="none")

    def run(
        self,
        src: Path,
        dst: Path,
        recipe: QuantRecipe,
        calibration: PixelBatchReader | None,
        work_dir: Path,
        notes: list[str],
    ) -> QuantRecipe:
        shutil.copyfile(src, dst)
        return recipe


@PRECISIONS.register("int8-dynamic")
class Int8Dynamic(Quantizer):
    """Per-tensor int8 weights, activations quantized at run time (ConvInteger/MatMulInteger)."""

    default_recipe = QuantRecipe(
        precision="int8-dynamic", format="dynamic", weight_type="int8", preprocess=True
    )

    def run(
        self,
        src: Path,
        dst: Path,
        recipe: QuantRecipe,
        calibration: PixelBatchReader | None,
        work_dir: Path,
        notes: list[str],
    ) -> QuantRecipe:
        quantize_dynamic(src, dst, **dynamic_kwargs(recipe))
        if recipe.weight_type != "int8":
            return recipe
        problem = ort_run_problem(dst)
        if problem is None:
            return recipe
        # Older onnxruntime CPU builds implement ConvInteger only for uint8 weights.
        fallback = recipe.model_copy(update={"weight_type": "uint8"})
        quantize_dynamic(src, dst, **dynamic_kwargs(fallback))
        notes.append(f"onnxruntime refused int8 dynamic weights ({problem}); used uint8 weights")
        return fallback


class _StaticQDQ(Quantizer):
    """QDQ quantization with activation ranges calibrated on pixel images."""

    def run(
        self,
        src: Path,
        dst: Path,
        recipe: QuantRecipe,
        calibration: PixelBatchReader | None,
        work_dir: Path,
        notes: list[str],
    ) -> QuantRecipe:
        if calibration is None:
            raise ModelError(f"precision '{recipe.precision}' needs calibration images")
        cache = write_calibration_cache(src, calibration, recipe, work_dir)
        quantize_static(src, dst, None, calibration_cache_path=cache, **static_kwargs(recipe))
        return recipe


@PRECISIONS.register("int8-static")
class Int8Static(_StaticQDQ):
    """Per-channel int8 weights, uint8 activations, min/max calibration by default."""

    default_recipe = QuantRecipe(
        precision="int8-static",
        format="qdq",
        weight_type="int8",
        activation_type="uint8",
        per_channel=True,
        calibration_method="minmax",
        preprocess=True,
    )


@PRECISIONS.register("int4")
class Int4Static(_StaticQDQ):
    """W4A8: per-channel INT4 weights, uint8 activations in ONNX's native INT4 (opset 21; older
    sources are converted first)."""

    default_recipe = QuantRecipe(
        precision="int4",
        format="qdq",
        weight_type="int4",
        activation_type="uint8",
        per_channel=True,
        calibration_method="minmax",
        preprocess=True,
    )
