"""The quantize transaction: FP32 ONNX model → deployable precision, with a reproducibility sidecar.

Precisions are plug-ins in ``PRECISIONS`` (:mod:`exporters.precisions`): a quantizer is a class
with a default recipe and a ``run`` method wrapping one onnxruntime quantizer. ``quantize`` does
the rest the same way for
all of them: validation, a self-contained working copy of the source (external weights pulled
in, opset converted when the precision needs newer operators), optional ``quant_pre_process``,
calibration from pixel images, the preprocessing written into the model metadata, a smoke run in
onnxruntime, and the sidecar ``<artifact>.json`` recording every argument, library version, file
hash and the CPU's INT8 instruction sets (the same QDQ file runs different kernels on VNNI / AMX
machines).

Vendor files come in every state, so the source file is only ever read, every failure is one
``ModelError`` line naming the precision and the cause, and the artifact and its sidecar appear
at the destination together — moved into place only after onnxruntime ran the quantized model —
or not at all.

Quantization here is deterministic: identical fp32 model, images and recipe give a
byte-identical artifact and an identical sidecar apart from paths (checked in the tests).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import external_data_helper, version_converter
from onnxruntime.quantization.shape_inference import quant_pre_process
from pydantic import ValidationError

from exporters.calibration import (
    PixelBatchReader,
    check_pixel_images,
    images_fingerprint,
    select_calibration_images,
)
from exporters.catalog import PRECISIONS
from exporters.inspection import describe_quantization, model_opset, ort_run_problem
from exporters.precisions import QuantizedArtifact, Quantizer
from exporters.recipes import (
    QuantRecipe,
    calibrator_options,
    dynamic_kwargs,
    jsonable,
    resolve_recipe,
    static_kwargs,
)
from harness.artifacts.graph_inputs import data_inputs, declared_batch
from harness.artifacts.preprocessing import METADATA_KEY, Preprocessing
from harness.artifacts.sidecar import read_sidecar, sha256_file, sidecar_path
from harness.core.atomic import atomic_targets
from harness.core.errors import BlindspotsError, ModelError, one_line, validation_message
from harness.runtime.kernels import cpu_isa_flags

logger = logging.getLogger(__name__)

SIDECAR_VERSION = 1
#: ONNX's native 4-bit and 16-bit Q/DQ types exist from opset 21 on.
INT4_MIN_OPSET = 21
#: DequantizeLinear's ``axis`` (per-channel weights) exists from opset 13 on.
PER_CHANNEL_MIN_OPSET = 13
#: DynamicQuantizeLinear, and onnxruntime's QDQ fusions, need opset 11.
QUANTIZED_MIN_OPSET = 11
_OPSET21_TYPES = {"int4", "uint4", "int16", "uint16"}
#: A protobuf message cannot exceed 2 GiB; larger models only exist with external data.
MAX_MODEL_BYTES = 2**31 - 1
PREPROCESSING_FLAGS = "--mean/--std (and --scale/--layout where they differ from the defaults)"
# Symbolic shape inference is skipped: it is meant for transformer graphs, and plain ONNX
# shape inference already resolves every shape of these CNNs.
PRE_PROCESS_ARGUMENTS = {"skip_symbolic_shape": True}


@dataclass(frozen=True)
class _Source:
    """The source model as read once: the self-contained graph and what it says about itself."""

    path: Path
    proto: onnx.ModelProto
    metadata: dict[str, str]
    external_files: tuple[str, ...]


def quantize(
    precision: str,
    fp32_path: str | Path,
    out_path: str | Path,
    calibration_images: np.ndarray | None = None,
    recipe_overrides: dict[str, Any] | None = None,
    preprocessing: Preprocessing | None = None,
) -> QuantizedArtifact:
    """Quantize the fp32 model at ``fp32_path`` to ``precision``, writing ``out_path``.

    ``calibration_images`` are uint8 NHWC pixels (clean training images), required by the
    calibrated precisions; they are normalised with ``preprocessing``, or with the preprocessing
    stored in the model's metadata when none is given. An explicit ``preprocessing`` is also
    written into the artifact's metadata, so a vendor model quantized here carries what it was
    calibrated with. ``recipe_overrides`` replace fields of the precision's default recipe.
    The source file is never modified; on failure nothing new is left at ``out_path``.
    """
    quantizer = PRECISIONS.get(precision)()
    recipe = resolve_recipe(quantizer.default_recipe, recipe_overrides)
    src, dst = Path(fp32_path), Path(out_path)
    try:
        return _quantize(quantizer, recipe, src, dst, calibration_images, preprocessing)
    except BlindspotsError:
        raise
    except Exception as exc:  # numpy, pydantic, onnx and onnxruntime (pybind) errors alike
        raise ModelError(f"cannot quantize {src} to {precision}: {_cause(exc)}") from exc


def _quantize(
    quantizer: Quantizer,
    recipe: QuantRecipe,
    src: Path,
    dst: Path,
    calibration_images: np.ndarray | None,
    explicit: Preprocessing | None,
) -> QuantizedArtifact:
    """``quantize`` without the error wrapping: read, convert, quantize, check, publish."""
    precision = recipe.precision
    _check_destination(src, dst)
    source = _read_source(src)
    preprocessing = _resolve_preprocessing(source, explicit, recipe)
    if preprocessing is not None:
        _check_image_input(source, preprocessing, recipe)
    reader, calibration_record = _calibration(source, recipe, preprocessing, calibration_images)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="blindspots-quant-") as tmp:
        work_dir = Path(tmp)
        model_in, conversion = _working_copy(source, recipe, work_dir, notes)
        if recipe.preprocess:
            preprocessed = work_dir / "preprocessed.onnx"
            quant_pre_process(str(model_in), str(preprocessed), **PRE_PROCESS_ARGUMENTS)
            model_in = preprocessed
        work_out = work_dir / "quantized.onnx"
        applied = quantizer.run(model_in, work_out, recipe, reader, work_dir, notes)
        _finish_metadata(work_out, source.metadata, explicit, notes)
        problem = ort_run_problem(work_out)
        if problem is not None:
            raise ModelError(
                f"onnxruntime cannot run the quantized {precision} model made from {src} "
                f"(the quantizer produced a graph this onnxruntime does not execute): {problem}"
            )
        digest = sha256_file(work_out)
        artifact = QuantizedArtifact(
            precision=precision,
            path=str(dst),
            sidecar_path=str(sidecar_path(dst)),
            sha256=digest,
            recipe=applied,
            notes=notes,
        )
        sidecar = {
            "sidecar_version": SIDECAR_VERSION,
            "precision": precision,
            "artifact": {"path": str(dst), "sha256": digest, "bytes": work_out.stat().st_size},
            "source": _source_record(source),
            "opset_conversion": conversion,
            "preprocessing": _preprocessing_record(preprocessing, explicit),
            "recipe": applied.model_dump(mode="json"),
            "onnxruntime_arguments": _ort_arguments(applied),
            "calibration": calibration_record,
            "graph": describe_quantization(work_out),
            "versions": {"onnxruntime": ort.__version__, "onnx": onnx.__version__},
            "cpu_isa_flags": cpu_isa_flags(),
            "notes": notes,
        }
        _publish(work_out, dst, sidecar)
    return artifact


def _cause(exc: Exception) -> str:
    """One line saying what went wrong inside a library call."""
    if isinstance(exc, ValidationError):
        return validation_message(exc, "field")
    return f"{type(exc).__name__}: {one_line(exc, first_line=True)}"


def _check_destination(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise ModelError(f"ONNX model not found: {src}")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ModelError(f"quantized output {dst} would overwrite its source model")
    if dst.is_dir():
        raise ModelError(f"quantized output {dst} is a directory; name the .onnx file to write")


def _read_source(src: Path) -> _Source:
    """Load the source with any external weights from its own folder (onnx refuses locations
    that leave it), so everything downstream works on one self-contained graph."""
    try:
        proto = onnx.load(str(src), load_external_data=False)
        external_files = sorted(
            {
                external_data_helper.ExternalDataInfo(init).location
                for init in proto.graph.initializer
                if external_data_helper.uses_external_data(init)
            }
        )
        external_data_helper.load_external_data_for_model(proto, str(src.parent))
    except Exception as exc:  # DecodeError, OSError, onnx's own ValidationError ...
        raise ModelError(f"cannot read ONNX model {src}: {_cause(exc)}") from exc
    if proto.ByteSize() > MAX_MODEL_BYTES:
        raise ModelError(
            f"ONNX model {src} holds more than 2 GiB of weights; quantizing models beyond "
            "protobuf's 2 GiB limit is not supported"
        )
    metadata = {p.key: p.value for p in proto.metadata_props}
    return _Source(path=src, proto=proto, metadata=metadata, external_files=tuple(external_files))


def _source_record(source: _Source) -> dict[str, Any]:
    """Identity of the source: the model file and, for external weights, each weights file
    (a cached artifact must be rebuilt when only the weights changed)."""
    return {
        "path": str(source.path),
        "sha256": sha256_file(source.path),
        "external_data": {
            name: sha256_file(source.path.parent / name) for name in source.external_files
        },
    }


def _resolve_preprocessing(
    source: _Source, explicit: Preprocessing | None, recipe: QuantRecipe
) -> Preprocessing | None:
    """The explicit preprocessing, else the one stored in the model; a calibrated precision
    cannot do without one (its images must be normalised exactly as the model expects)."""
    if explicit is not None:
        return explicit
    if METADATA_KEY in source.metadata:
        return Preprocessing.from_json(source.metadata[METADATA_KEY])
    if recipe.needs_calibration:
        raise ModelError(
            f"ONNX model {source.path} carries no '{METADATA_KEY}' metadata, and "
            f"'{recipe.precision}' calibrates on images: give its preprocessing with "
            f"{PREPROCESSING_FLAGS}"
        )
    return None


def _image_input(source: _Source) -> onnx.ValueInfoProto:
    """The model's one data input (older IRs also list initializers as inputs)."""
    inputs = data_inputs(source.proto)
    if len(inputs) != 1:
        raise ModelError(
            f"expected one image input in {source.path}, found {[i.name for i in inputs]}"
        )
    return inputs[0]


def _check_image_input(source: _Source, preprocessing: Preprocessing, recipe: QuantRecipe) -> None:
    """Refuse a preprocessing the model's input contradicts (channel count at the layout's
    channel axis), and calibration of a model that does not take float32 images."""
    image = _image_input(source)
    tensor = image.type.tensor_type
    if recipe.needs_calibration and tensor.elem_type != onnx.TensorProto.FLOAT:
        kind = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
        raise ModelError(
            f"'{recipe.precision}' calibrates with float32 images but input '{image.name}' of "
            f"{source.path} takes {kind}"
        )
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if not tensor.HasField("shape") or len(dims) != 4:
        return
    channels = dims[1 if preprocessing.layout == "NCHW" else 3]
    if channels is not None and channels != preprocessing.channels:
        raise ModelError(
            f"input '{image.name}' of {source.path} has shape {dims}: {channels} channel(s) in "
            f"{preprocessing.layout} layout, but the preprocessing has {preprocessing.channels}; "
            "check --layout and the length of --mean/--std"
        )


def required_opset(recipe: QuantRecipe) -> int | None:
    """The lowest ai.onnx opset whose operators express ``recipe`` (None: a plain copy)."""
    if recipe.format == "none":
        return None
    if {recipe.weight_type, recipe.activation_type} & _OPSET21_TYPES:
        return INT4_MIN_OPSET
    if recipe.per_channel:
        return PER_CHANNEL_MIN_OPSET
    return QUANTIZED_MIN_OPSET


def _working_copy(
    source: _Source, recipe: QuantRecipe, work_dir: Path, notes: list[str]
) -> tuple[Path, dict[str, int] | None]:
    """The file the quantizer reads and the opset conversion applied to make it.

    The source path itself when it is already self-contained and new enough (so the fp32 copy
    stays byte-identical); otherwise a single-file copy in ``work_dir``, converted with onnx's
    version converter when the precision needs a newer opset. onnxruntime would bump the
    declared opset of an old file without converting every operator it touches, which is how
    opset 9/11 sources turned into graphs with a DequantizeLinear ``axis`` their opset lacks.
    """
    opset = model_opset(source.proto)
    needed = required_opset(recipe)
    if needed is None or opset >= needed:
        if not source.external_files:
            return source.path, None
        copy = work_dir / "source.onnx"
        onnx.save(source.proto, str(copy))
        notes.append("external weights of the source were embedded into one file")
        return copy, None
    try:
        converted = version_converter.convert_version(source.proto, needed)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises RuntimeError / onnx ValidationError
        raise ModelError(
            f"'{recipe.precision}' needs ONNX opset ≥ {needed} but {source.path} has opset "
            f"{opset}, and converting it failed: {_cause(exc)}"
        ) from exc
    copy = work_dir / "source.onnx"
    onnx.save(converted, str(copy))
    notes.append(
        f"converted a copy of the source from opset {opset} to {needed} (needed by "
        f"'{recipe.precision}'); the source file is unchanged"
    )
    return copy, {"from": opset, "to": needed}


def _calibration(
    source: _Source,
    recipe: QuantRecipe,
    preprocessing: Preprocessing | None,
    images: np.ndarray | None,
) -> tuple[PixelBatchReader | None, dict[str, Any] | None]:
    """The calibration reader for a calibrated recipe, and what the sidecar says about it."""
    if not recipe.needs_calibration:
        return None, None
    if images is None:
        raise ModelError(
            f"precision '{recipe.precision}' is calibrated: pass calibration_images "
            "(uint8 NHWC clean training images)"
        )
    if preprocessing is None:  # _resolve_preprocessing refuses this case already
        raise ModelError(f"precision '{recipe.precision}' needs the model's preprocessing")
    check_pixel_images(images, preprocessing.channels)
    chosen = select_calibration_images(images, recipe.calibration_size, recipe.calibration_seed)
    image_input = _image_input(source)
    fixed = declared_batch(image_input)
    batch_size = recipe.calibration_batch_size
    if fixed is not None:
        # A graph that declares batch B accepts exactly B images per call: calibrate in batches
        # of B over whole batches only (repeating images would weight them twice in histograms).
        if len(chosen) < fixed:
            raise ModelError(
                f"{source.path} declares a fixed batch of {fixed}; calibration needs at least "
                f"{fixed} images, got {len(chosen)}"
            )
        chosen, batch_size = chosen[: len(chosen) - len(chosen) % fixed], fixed
    reader = PixelBatchReader(chosen, preprocessing, image_input.name, batch_size)
    record = {
        "method": recipe.calibration_method,
        "images": len(chosen),
        "images_available": len(images),
        "images_sha256": images_fingerprint(chosen),
        "seed": recipe.calibration_seed,
        "batch_size": batch_size,
        "fixed_batch": fixed,
        "calibrator_options": calibrator_options(recipe),
    }
    return reader, record


def _ort_arguments(recipe: QuantRecipe) -> dict[str, Any] | None:
    """The exact onnxruntime calls a recipe maps to, for the sidecar."""
    if recipe.format == "none":
        return None
    pre_process = dict(PRE_PROCESS_ARGUMENTS) if recipe.preprocess else None
    if recipe.format == "dynamic":
        call = {"function": "quantize_dynamic", **jsonable(dynamic_kwargs(recipe))}
    else:
        call = {"function": "quantize_static", **jsonable(static_kwargs(recipe))}
    return {"quant_pre_process": pre_process, **call}


def _preprocessing_record(
    preprocessing: Preprocessing | None, explicit: Preprocessing | None
) -> dict[str, Any] | None:
    """The preprocessing used, and whether it came from the caller or the model's metadata."""
    if preprocessing is None:
        return None
    origin = "argument" if explicit is not None else "metadata"
    return {"origin": origin, **json.loads(preprocessing.to_json())}


def _finish_metadata(
    path: Path, source_metadata: dict[str, str], explicit: Preprocessing | None, notes: list[str]
) -> None:
    """Give the artifact the source's metadata_props — restoring any the quantizer dropped
    (onnxruntime 1.31 keeps them) — and write an explicitly given preprocessing into it."""
    proto = onnx.load(str(path))
    present = {p.key: p.value for p in proto.metadata_props}
    wanted = dict(source_metadata)
    if explicit is not None:
        wanted[METADATA_KEY] = explicit.to_json()
    if all(present.get(key) == value for key, value in wanted.items()):
        return
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in wanted]
    del proto.metadata_props[:]
    for key, value in [*kept, *sorted(wanted.items())]:
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
    dropped = sorted(key for key in source_metadata if key not in present)
    if dropped:
        notes.append(f"restored metadata dropped by the quantizer: {', '.join(dropped)}")
    if explicit is not None and source_metadata.get(METADATA_KEY) != explicit.to_json():
        notes.append(f"wrote the given preprocessing into the model metadata '{METADATA_KEY}'")


def _publish(artifact: Path, dst: Path, sidecar: dict[str, Any]) -> None:
    """Move the artifact and its sidecar into place together, with the project's atomic writer.

    The model is replaced before its sidecar, and a sidecar that cannot follow takes the new
    model away again, so no model is ever left without its own sidecar; a killed quantization
    leaves only temporary files that :func:`harness.core.atomic.remove_partials` clears.
    """
    with atomic_targets(dst, sidecar_path(dst)) as (model_tmp, side_tmp):
        shutil.copyfile(artifact, model_tmp)
        side_tmp.write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")


def quantize_all(
    exported: str | Path,
    folder: str | Path,
    precisions: list[str] | tuple[str, ...],
    calibration_images: np.ndarray | None,
    reuse_existing: bool = False,
) -> tuple[dict[str, Path], dict[str, float]]:
    """Every precision of one exported model as ``folder/<precision>.onnx``, with timings.

    ``reuse_existing`` keeps artifacts already on disk (the runner's cache: quantization is
    deterministic, so a rerun would write the same bytes).
    """
    paths: dict[str, Path] = {}
    timings: dict[str, float] = {}
    for precision in precisions:
        target = Path(folder) / f"{precision}.onnx"
        started = time.perf_counter()
        if not (reuse_existing and _is_current(target, exported, calibration_images)):
            quantize(precision, exported, target, calibration_images)
        timings[f"quantize_{precision}_s"] = time.perf_counter() - started
        paths[precision] = target
    return paths, timings


def _is_current(target: Path, source: str | Path, calibration_images: np.ndarray | None) -> bool:
    """True when ``target`` is intact and was made from this source and these calibration images.

    A cached artifact is reused only under that proof: a half-written file, an edited model, a
    new export or a changed calibration set all lead to quantizing again.
    """
    if not target.is_file():
        return False
    try:
        record = read_sidecar(target, verify=True)
    except ModelError:
        return False
    if record.get("source", {}).get("sha256") != sha256_file(source):
        return False
    calibration = record.get("calibration")
    if calibration is None:
        return True
    if calibration_images is None or calibration.get("images_available") != len(calibration_images):
        return False
    recipe = record.get("recipe", {})
    chosen = select_calibration_images(
        calibration_images, recipe.get("calibration_size"), recipe.get("calibration_seed", 0)
    )
    return calibration.get("images_sha256") == images_fingerprint(chosen)
