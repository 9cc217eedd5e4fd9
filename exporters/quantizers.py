"""FP32 ONNX model → deployable precision, each artifact with a reproducibility sidecar.

Precisions are plug-ins in ``PRECISIONS``: a quantizer is a class with a default recipe and a
``run`` method wrapping one onnxruntime quantizer. ``quantize`` does the rest the same way for
all of them: validation, optional ``quant_pre_process``, calibration from pixel images,
preserving the model metadata (the preprocessing!), a smoke run in onnxruntime, and the sidecar
``<artifact>.json`` recording every argument, library version, file hash and the CPU's INT8
instruction sets (the same QDQ file runs different kernels on VNNI / AMX machines).

Quantization here is deterministic: identical fp32 model, images and recipe give a
byte-identical artifact and an identical sidecar apart from paths (checked in the tests).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from pydantic import BaseModel

from exporters.calibration import (
    PixelBatchReader,
    check_pixel_images,
    images_fingerprint,
    select_calibration_images,
    write_calibration_cache,
)
from exporters.onnx_export import one_line, read_metadata, read_preprocessing
from exporters.recipes import (
    QuantRecipe,
    calibrator_options,
    dynamic_kwargs,
    jsonable,
    resolve_recipe,
    static_kwargs,
)
from harness.errors import BlindspotsError, ModelError
from harness.registry import Registry

logger = logging.getLogger(__name__)

SIDECAR_VERSION = 1
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")
INT4_MIN_OPSET = 21
# Symbolic shape inference is skipped: it is meant for transformer graphs, and plain ONNX
# shape inference already resolves every shape of these CNNs.
PRE_PROCESS_ARGUMENTS = {"skip_symbolic_shape": True}


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

    def check_source(self, proto: onnx.ModelProto, src: Path) -> None:
        """Refuse source models this precision cannot handle; default: anything goes."""

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


PRECISIONS: Registry[type[Quantizer]] = Registry("precision")


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
    """W4A8: per-channel INT4 weights, uint8 activations; needs ONNX's native INT4 (opset 21)."""

    default_recipe = QuantRecipe(
        precision="int4",
        format="qdq",
        weight_type="int4",
        activation_type="uint8",
        per_channel=True,
        calibration_method="minmax",
        preprocess=True,
    )

    def check_source(self, proto: onnx.ModelProto, src: Path) -> None:
        opset = model_opset(proto)
        if opset < INT4_MIN_OPSET:
            raise ModelError(
                f"int4 needs ONNX opset ≥ {INT4_MIN_OPSET} (native INT4 tensors) but {src} has "
                f"opset {opset}; re-export with opset={INT4_MIN_OPSET}"
            )


def quantize(
    precision: str,
    fp32_path: str | Path,
    out_path: str | Path,
    calibration_images: np.ndarray | None = None,
    recipe_overrides: dict[str, Any] | None = None,
) -> QuantizedArtifact:
    """Quantize the exported fp32 model at ``fp32_path`` to ``precision``, writing ``out_path``.

    ``calibration_images`` are uint8 NHWC pixels (clean training images), required by the
    calibrated precisions; they are normalised with the preprocessing stored in the model.
    ``recipe_overrides`` replace fields of the precision's default recipe.
    """
    quantizer = PRECISIONS.get(precision)()
    recipe = resolve_recipe(quantizer.default_recipe, recipe_overrides)
    src = Path(fp32_path)
    dst = Path(out_path)
    if src.resolve() == dst.resolve():
        raise ModelError(f"quantized output {dst} would overwrite its source model")
    source_meta = read_metadata(src)
    quantizer.check_source(onnx.load(str(src), load_external_data=False), src)

    reader, calibration_record = _calibration(src, recipe, calibration_images)
    notes: list[str] = []
    dst.parent.mkdir(parents=True, exist_ok=True)
    # A sidecar left by an earlier run must not vouch for whatever this run writes.
    sidecar_path(dst).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="blindspots-quant-") as tmp:
        work_dir = Path(tmp)
        model_in = src
        try:
            if recipe.preprocess:
                model_in = work_dir / "preprocessed.onnx"
                quant_pre_process(str(src), str(model_in), **PRE_PROCESS_ARGUMENTS)
            applied = quantizer.run(model_in, dst, recipe, reader, work_dir, notes)
        except BlindspotsError:
            raise
        except Exception as exc:  # onnx / onnxruntime raise unrelated (pybind) exception types
            raise ModelError(
                f"onnxruntime could not quantize {src} to {precision}: {one_line(exc)}"
            ) from exc

    _restore_metadata(dst, source_meta, notes)
    problem = ort_run_problem(dst)
    if problem is not None:
        raise ModelError(f"onnxruntime cannot run the {precision} model {dst}: {problem}")

    digest = sha256_file(dst)
    sidecar = {
        "sidecar_version": SIDECAR_VERSION,
        "precision": precision,
        "artifact": {"path": str(dst), "sha256": digest, "bytes": dst.stat().st_size},
        "source": {"path": str(src), "sha256": sha256_file(src)},
        "recipe": applied.model_dump(mode="json"),
        "onnxruntime_arguments": _ort_arguments(applied),
        "calibration": calibration_record,
        "graph": describe_quantization(dst),
        "versions": {"onnxruntime": ort.__version__, "onnx": onnx.__version__},
        "cpu_isa_flags": cpu_isa_flags(),
        "notes": notes,
    }
    side_path = sidecar_path(dst)
    side_path.write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return QuantizedArtifact(
        precision=precision,
        path=str(dst),
        sidecar_path=str(side_path),
        sha256=digest,
        recipe=applied,
        notes=notes,
    )


def _calibration(
    src: Path, recipe: QuantRecipe, images: np.ndarray | None
) -> tuple[PixelBatchReader | None, dict[str, Any] | None]:
    """The calibration reader for a calibrated recipe, and what the sidecar says about it."""
    if not recipe.needs_calibration:
        return None, None
    if images is None:
        raise ModelError(
            f"precision '{recipe.precision}' is calibrated: pass calibration_images "
            "(uint8 NHWC clean training images)"
        )
    preprocessing = read_preprocessing(src)
    check_pixel_images(images, preprocessing.channels)
    chosen = select_calibration_images(images, recipe.calibration_size, recipe.calibration_seed)
    reader = PixelBatchReader(
        chosen, preprocessing, _input_name(src), recipe.calibration_batch_size
    )
    record = {
        "method": recipe.calibration_method,
        "images": len(chosen),
        "images_available": len(images),
        "images_sha256": images_fingerprint(chosen),
        "seed": recipe.calibration_seed,
        "batch_size": recipe.calibration_batch_size,
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


def _input_name(path: Path) -> str:
    proto = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in initializers]
    if len(names) != 1:
        raise ModelError(f"expected one image input in {path}, found {names}")
    return names[0]


def _restore_metadata(dst: Path, source_meta: dict[str, str], notes: list[str]) -> None:
    """Copy source metadata_props the quantizer dropped (onnxruntime 1.31 keeps them)."""
    proto = onnx.load(str(dst))
    present = {p.key for p in proto.metadata_props}
    missing = sorted(key for key in source_meta if key not in present)
    if not missing:
        return
    for key in missing:
        proto.metadata_props.add(key=key, value=source_meta[key])
    onnx.save(proto, str(dst))
    notes.append(f"restored metadata dropped by the quantizer: {', '.join(missing)}")


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


def ort_run_problem(path: str | Path) -> str | None:
    """None if onnxruntime CPU loads the model and runs one all-zero input, else why not."""
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {}
        for arg in session.get_inputs():
            shape = [dim if isinstance(dim, int) and dim > 0 else 1 for dim in arg.shape]
            feeds[arg.name] = np.zeros(shape, dtype=np.float32)
        session.run(None, feeds)
    except Exception as exc:  # onnxruntime's pybind errors share no public base class
        return one_line(exc)
    return None


def model_opset(proto: onnx.ModelProto) -> int:
    """The default-domain (ai.onnx) opset a model declares."""
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ModelError("ONNX model declares no default-domain opset")


def describe_quantization(onnx_path: str | Path) -> dict[str, Any]:
    """Op-type counts and initializer dtypes: evidence that a graph really is quantized.

    ``initializer_dtypes`` counts tensors per element type (``float``, ``int8``, ``uint8``,
    ``int4``, ...) and ``initializer_elements`` counts their elements, so a report can say
    what fraction of the weights is stored in low precision.
    """
    proto = onnx.load(str(onnx_path))
    dtypes: Counter[str] = Counter()
    elements: Counter[str] = Counter()
    for init in proto.graph.initializer:
        name = onnx.TensorProto.DataType.Name(init.data_type).lower()
        dtypes[name] += 1
        elements[name] += int(np.prod(init.dims, dtype=np.int64))
    return {
        "opset": model_opset(proto),
        "op_types": dict(sorted(Counter(node.op_type for node in proto.graph.node).items())),
        "initializer_dtypes": dict(sorted(dtypes.items())),
        "initializer_elements": dict(sorted(elements.items())),
    }


def cpu_isa_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, bool | None]:
    """Which INT8-relevant x86 instruction sets the CPU reports; None each when unknowable."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return dict.fromkeys(ISA_FLAGS)
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags = set(value.split())
            break
    else:
        return dict.fromkeys(ISA_FLAGS)
    return {flag: flag in flags for flag in ISA_FLAGS}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar_path(onnx_path: str | Path) -> Path:
    """``<artifact>.json`` next to the artifact (``model.onnx`` → ``model.onnx.json``)."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".json")


def read_sidecar(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The sidecar of an artifact (pass the ``.onnx`` or the ``.json`` path).

    With ``verify`` the artifact's current sha256 must match the recorded one, so a model
    edited after quantization is never reported under its old recipe.
    """
    path = Path(path)
    side = path if path.suffix == ".json" else sidecar_path(path)
    try:
        record = json.loads(side.read_text())
    except FileNotFoundError as exc:
        raise ModelError(f"no quantization sidecar at {side}") from exc
    except (OSError, ValueError) as exc:
        raise ModelError(f"unreadable quantization sidecar {side}: {exc}") from exc
    if not isinstance(record, dict) or "artifact" not in record:
        raise ModelError(f"{side} is not a quantization sidecar (no 'artifact' entry)")
    if verify:
        artifact = side.with_name(side.name.removesuffix(".json"))
        if not artifact.is_file():
            raise ModelError(f"sidecar {side} describes a missing model {artifact}")
        if sha256_file(artifact) != record["artifact"]["sha256"]:
            raise ModelError(f"model {artifact} changed after quantization (sha256 mismatch)")
    return record
