"""PyTorch → ONNX export that proves the exported graph computes what the torch model computes.

The ONNX file is the artifact every later stage (quantizers, runtime adapter, defenses) trusts,
so export ends with a parity check: the same pixel sample goes through torch and through
onnxruntime, and an export whose predictions disagree is refused instead of silently poisoning
every downstream number. The model's preprocessing is written into the file's metadata, so the
file alone says how pixels become inputs.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
from pydantic import BaseModel

from exporters.calibration import check_pixel_images
from harness.artifacts.attack_metadata import MODEL_META_ATTR, attack_entries
from harness.artifacts.preprocessing import METADATA_KEY, Preprocessing
from harness.core.atomic import atomic_target
from harness.core.errors import ModelError, one_line
from harness.runtime.kernels import session_options

if TYPE_CHECKING:  # torch is imported inside the export functions: reading metadata stays cheap
    import torch
    from torch import nn

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MIN_ARGMAX_AGREEMENT = 0.99
_TRACE_BATCH = 8
_PARITY_BATCH = 256


class ExportReport(BaseModel):
    """What was exported and how closely onnxruntime reproduces torch on the sample."""

    path: str
    opset: int
    exporter: str
    max_abs_logit_diff: float
    argmax_agreement: float
    n_samples: int
    torch_version: str
    onnx_version: str
    onnxruntime_version: str


def export_onnx(
    model: nn.Module,
    path: str | Path,
    sample: np.ndarray,
    preprocessing: Preprocessing,
    opset: int = 21,
    metadata: dict[str, str] | None = None,
) -> ExportReport:
    """Export ``model`` with a dynamic batch axis, stamp metadata, and check parity on ``sample``.

    ``sample`` is uint8 NHWC pixels; ``preprocessing`` maps them to the model's input. The model
    is exported in eval mode and its train/eval mode is restored afterwards. Raises ModelError if
    the exported graph is invalid or argmax agreement with torch is below 0.99.
    """
    import torch

    path = Path(path)
    check_pixel_images(sample, preprocessing.channels, what="export sample")
    # the attack behind the model (checkpoint metadata left on it by save_state/load_model)
    extra = {**attack_entries(getattr(model, MODEL_META_ATTR, None) or {}), **(metadata or {})}
    if METADATA_KEY in extra:
        raise ModelError(f"metadata key '{METADATA_KEY}' is reserved for the preprocessing")
    bad = [key for key, value in extra.items() if not isinstance(value, str)]
    if bad:
        raise ModelError(f"ONNX metadata values must be strings; not for keys {bad}")

    inputs = torch.from_numpy(preprocessing.apply(sample))
    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="blindspots-export-") as tmp:
            raw_path = Path(tmp) / "model.onnx"
            exporter = _export(model, inputs[:_TRACE_BATCH], raw_path, opset)
            # onnx.load pulls in any external-data files the exporter wrote next to raw_path.
            proto = onnx.load(str(raw_path))
        _stamp_metadata(proto, {METADATA_KEY: preprocessing.to_json(), **extra})
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as exc:
            first_line = str(exc).strip().splitlines()[0]
            raise ModelError(f"exported ONNX graph for {path} is invalid: {first_line}") from exc
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_target(path) as partial:  # a killed export never leaves a short file
            onnx.save(proto, str(partial))
        torch_logits = _torch_logits(model, inputs)
    finally:
        model.train(was_training)

    onnx_logits = onnx_logits_for(path, inputs.numpy())
    diff = float(np.max(np.abs(torch_logits - onnx_logits)))
    agreement = float(np.mean(torch_logits.argmax(axis=1) == onnx_logits.argmax(axis=1)))
    if np.isnan(diff) or agreement < MIN_ARGMAX_AGREEMENT:
        raise ModelError(
            f"ONNX export {path} disagrees with torch: argmax agreement {agreement:.3f} "
            f"(need ≥ {MIN_ARGMAX_AGREEMENT}), max |Δlogit| {diff:.3g}"
        )
    return ExportReport(
        path=str(path),
        opset=opset,
        exporter=exporter,
        max_abs_logit_diff=diff,
        argmax_agreement=agreement,
        n_samples=len(sample),
        torch_version=torch.__version__,
        onnx_version=onnx.__version__,
        onnxruntime_version=ort.__version__,
    )


def _export(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> str:
    """Legacy TorchScript exporter first (plain Conv/Gemm graph, fast); dynamo if it fails."""
    import torch

    common = {
        "opset_version": opset,
        "input_names": [INPUT_NAME],
        "output_names": [OUTPUT_NAME],
        "dynamic_axes": {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
    }
    with warnings.catch_warnings():
        # The legacy exporter warns that it is deprecated; it is still the one that emits the
        # plain operator set the quantizers expect, so the warning is noise here.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), str(path), dynamo=False, **common)
            return "torchscript"
        except Exception as legacy_error:  # any exporter failure → try the other exporter
            try:
                torch.onnx.export(model, (example,), str(path), dynamo=True, **common)
            except Exception as dynamo_error:
                raise ModelError(
                    f"cannot export {type(model).__name__} to ONNX opset {opset}: "
                    f"legacy exporter: {one_line(legacy_error, first_line=True)}; "
                    f"dynamo exporter: {one_line(dynamo_error, first_line=True)}"
                ) from dynamo_error
            return "dynamo"


def _stamp_metadata(proto: onnx.ModelProto, entries: dict[str, str]) -> None:
    """Set ``metadata_props`` entries, replacing any existing value under the same key."""
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    for key, value in [*kept, *sorted(entries.items())]:
        proto.metadata_props.add(key=key, value=value)


def _torch_logits(model: nn.Module, inputs: torch.Tensor) -> np.ndarray:
    import torch

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    chunks = []
    with torch.no_grad():
        for start in range(0, len(inputs), _PARITY_BATCH):
            batch = inputs[start : start + _PARITY_BATCH].to(device)
            chunks.append(model(batch).float().cpu().numpy())
    return np.concatenate(chunks)


def onnx_logits_for(path: str | Path, inputs: np.ndarray) -> np.ndarray:
    """Logits of the ONNX model at ``path`` on already-preprocessed float ``inputs`` (CPU)."""
    session = ort.InferenceSession(
        str(path), sess_options=session_options(), providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    chunks = [
        session.run(None, {name: inputs[start : start + _PARITY_BATCH]})[0]
        for start in range(0, len(inputs), _PARITY_BATCH)
    ]
    return np.concatenate(chunks)


def read_metadata(path: str | Path) -> dict[str, str]:
    """All ``metadata_props`` of the ONNX model at ``path`` (weights are not loaded)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"ONNX model not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf decode errors have no common public base class
        raise ModelError(
            f"cannot read ONNX model {path}: {one_line(exc, first_line=True)}"
        ) from exc
    return {p.key: p.value for p in proto.metadata_props}


def read_preprocessing(path: str | Path) -> Preprocessing:
    """The preprocessing stored in an exported (or quantized) model's metadata."""
    meta = read_metadata(path)
    if METADATA_KEY not in meta:
        raise ModelError(
            f"ONNX model {path} has no '{METADATA_KEY}' metadata; export it with "
            "exporters.export_onnx so it carries its preprocessing"
        )
    return Preprocessing.from_json(meta[METADATA_KEY])
