"""Torch implementations of the ONNX ops the gradient replica interprets, one module per family.

Each converter takes the node's spec, its input tensors (``None`` for omitted optional inputs)
and the float dtype the replica runs in, and returns the node's outputs. They follow the ONNX
operator spec and, where it leaves room, onnxruntime's CPU arithmetic, because the replica must
reproduce the *deployed* model, not an idealised one. The integer arithmetic itself (rounding,
quantizing, requantizing, with straight-through gradients) is :mod:`harness.replica.arithmetic`,
shared with the quantization-conditioned backdoor's fake-quant mirror.

The families: :mod:`.elementwise`, :mod:`.linear` (Conv / Gemm / MatMul, float and integer),
:mod:`.quantization`, :mod:`.pooling` (with reductions and BatchNorm), :mod:`.shapes` and
:mod:`.qoperator` (onnxruntime's ``com.microsoft`` contrib ops). Importing this package imports
them all, so :data:`OPS` holds every converter whichever module a caller names first.

Converters never use data-dependent Python control flow on activations, so the whole
interpreter can run under ``torch.func.vmap`` (per-sample dynamic quantization).
"""

from harness.replica.ops import elementwise, linear, pooling, qoperator, quantization, shapes
from harness.replica.ops.base import MS, OPS, QUANT_RANGES, Converter, NodeSpec, register

__all__ = [
    "MS",
    "OPS",
    "QUANT_RANGES",
    "Converter",
    "NodeSpec",
    "elementwise",
    "linear",
    "pooling",
    "qoperator",
    "quantization",
    "register",
    "shapes",
]
