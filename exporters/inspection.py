"""Looking at an ONNX file without changing it: does onnxruntime run it, which opset does it
declare, how much of it is stored in low precision. Used by the quantizers (a fallback decision,
a smoke run before publishing) and by ``blindspots info``.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from harness.core.errors import ModelError, one_line
from harness.runtime.kernels import DEFAULT_PROFILE, session_options


def ort_run_problem(path: str | Path, profile: str = DEFAULT_PROFILE) -> str | None:
    """None if onnxruntime CPU loads the model and runs it once, else why not.

    The session is built like every other harness session (kernel ``profile``), and each input
    gets zeros of its declared element type and shape, symbolic dimensions set to 1, so a model
    with a fixed batch or a non-float input is judged on what it really accepts.
    """
    try:
        session = ort.InferenceSession(
            str(path),
            sess_options=session_options(profile, threads=1),
            providers=["CPUExecutionProvider"],
        )
        feeds = {
            arg.name: np.zeros(_smoke_shape(arg.shape), dtype=_numpy_dtype(arg.type))
            for arg in session.get_inputs()
        }
        session.run(None, feeds)
    except Exception as exc:  # onnxruntime's pybind errors share no public base class
        return one_line(exc, first_line=True)
    return None


def _smoke_shape(shape: list[int | str | None]) -> list[int]:
    """Fixed dimensions as declared; symbolic or unknown ones as 1."""
    return [dim if isinstance(dim, int) and dim > 0 else 1 for dim in shape]


def _numpy_dtype(ort_type: str) -> np.dtype:
    """numpy dtype of an onnxruntime input type such as ``tensor(uint8)``."""
    match = re.fullmatch(r"tensor\((\w+)\)", ort_type)
    if match is None:
        raise ModelError(f"model input of type {ort_type} is not a tensor")
    name = match.group(1).upper()
    elem_type = onnx.TensorProto.DataType.Value("FLOAT" if name == "FLOAT32" else name)
    return helper.tensor_dtype_to_np_dtype(elem_type)


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
