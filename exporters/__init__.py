"""Torch → ONNX export with a parity check, and onnxruntime quantizers with sidecars.

Submodules load lazily (``exporters.export_onnx`` imports torch only when first used), so
listing precisions or reading a sidecar does not pay for a torch import.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ExportReport": "exporters.onnx_export",
    "export_onnx": "exporters.onnx_export",
    "read_preprocessing": "exporters.onnx_export",
    "QuantRecipe": "exporters.recipes",
    "PRECISIONS": "exporters.catalog",
    "QuantizedArtifact": "exporters.precisions",
    "quantize": "exporters.quantization",
    "read_sidecar": "harness.artifacts.sidecar",
    "describe_quantization": "exporters.inspection",
    "sha256_file": "harness.artifacts.sidecar",
    "cpu_isa_flags": "harness.runtime.kernels",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'exporters' has no attribute '{name}'")
    return getattr(importlib.import_module(_LAZY[name]), name)
