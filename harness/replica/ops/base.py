"""What every converter shares: the node spec, the registry, integer types and ONNX geometry.

A converter is registered under its op type (``"Conv"``) or, for onnxruntime's contrib ops,
under ``"com.microsoft.<op>"`` (:data:`MS`); the interpreter looks each node up in :data:`OPS`.
The family modules beside this one fill the registry when :mod:`harness.replica.ops` is
imported. The helpers here shape scales and zero points (per tensor, axis or block) and resolve
ONNX padding, so every family reads attributes the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from onnx import TensorProto

from harness.core.errors import ModelError

Tensor = torch.Tensor
MaybeTensor = Tensor | None


@dataclass(frozen=True)
class NodeSpec:
    """What a converter needs to know about one node, prepared once at build time."""

    op: str
    name: str
    opset: int
    attrs: dict[str, Any] = field(default_factory=dict)

    def fail(self, why: str) -> ModelError:
        return ModelError(f"replica: ONNX op '{self.op}' (node {self.name}) {why}")


Converter = Callable[[NodeSpec, list[MaybeTensor], torch.dtype], list[Tensor]]
OPS: dict[str, Converter] = {}

#: Integer element types a quantized tensor may have, with their value ranges.
QUANT_RANGES: dict[int, tuple[int, int]] = {
    TensorProto.UINT8: (0, 255),
    TensorProto.INT8: (-128, 127),
    TensorProto.UINT4: (0, 15),
    TensorProto.INT4: (-8, 7),
    TensorProto.UINT16: (0, 65535),
    TensorProto.INT16: (-32768, 32767),
    TensorProto.INT32: (-(2**31), 2**31 - 1),
}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
INT_TORCH: dict[int, torch.dtype] = {
    TensorProto.INT8: torch.int8,
    TensorProto.UINT8: torch.uint8,
    TensorProto.INT4: torch.int8,
    TensorProto.UINT4: torch.uint8,
    TensorProto.INT16: torch.int16,
    TensorProto.UINT16: torch.int32,
    TensorProto.INT32: torch.int32,
    TensorProto.UINT32: torch.int64,
    TensorProto.INT64: torch.int64,
    TensorProto.UINT64: torch.int64,
}


def register(*names: str) -> Callable[[Converter], Converter]:
    def decorate(fn: Converter) -> Converter:
        for name in names:
            OPS[name] = fn
        return fn

    return decorate


#: Domain prefix of onnxruntime's contrib ops in :data:`OPS` (``"com.microsoft.QLinearAdd"``).
MS = "com.microsoft."


def along_axis(param: Tensor, axis: int, ndim: int, size: int, block: int = 0) -> Tensor:
    """Shape a scale / zero point so it broadcasts per-tensor, per-axis or per-block."""
    if param.numel() == 1 and block == 0:
        return param.reshape(())
    axis = axis % ndim
    if block > 0:  # blocked quantization: param has x's rank, axis dim shrunk by block
        return param.repeat_interleave(block, dim=axis).narrow(axis, 0, size)
    shape = [1] * ndim
    shape[axis] = param.numel()
    return param.reshape(shape)


def optional(inputs: list[MaybeTensor], count: int) -> list[MaybeTensor]:
    """``inputs`` padded with ``None`` to ``count`` entries (trailing optional inputs omitted)."""
    return [*inputs[:count], *([None] * (count - len(inputs)))]


def channel_param(param: MaybeTensor, ndim: int) -> MaybeTensor:
    """A per-output-channel weight parameter ``(M,)`` reshaped to ``(M, 1, ...)``."""
    if param is None or param.ndim == 0 or param.numel() == 1:
        return None if param is None else param.reshape(())
    return param.reshape([-1] + [1] * (ndim - 1))


def ints(value: Any) -> list[int]:
    return [int(v) for v in value]


def resolve_pads(
    spec: NodeSpec, x: Tensor, kernel: list[int], strides: list[int], dilations: list[int]
) -> list[int]:
    """ONNX ``pads`` (begins then ends), resolving ``auto_pad`` against the input shape."""
    n = len(kernel)
    auto = spec.attrs.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        return ints(spec.attrs.get("pads", [0] * 2 * n))
    if auto == "VALID":
        return [0] * 2 * n
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise spec.fail(f"has unknown auto_pad {auto!r}")
    begins, ends = [], []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations, strict=True):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else large)
        ends.append(large if auto == "SAME_UPPER" else small)
    return begins + ends


def torch_pad_order(pads: list[int]) -> list[int]:
    """ONNX (begins..., ends...) → F.pad's (last_begin, last_end, ..., first_begin, first_end)."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


def spatial_fn(spec: NodeSpec, x: Tensor, fns: dict[int, Callable]) -> Callable:
    dims = x.ndim - 2
    if dims not in fns:
        raise spec.fail(f"has {dims} spatial dimension(s); the replica supports {sorted(fns)}")
    return fns[dims]
