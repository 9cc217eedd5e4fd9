"""QuantizeLinear, DequantizeLinear and DynamicQuantizeLinear.

``DynamicQuantizeLinear`` derives its scale and zero point from the tensor it sees, exactly as
ORT does, and treats them as constants for the gradient (they depend on one extreme element;
differentiating through them adds noise, not signal).
"""

from __future__ import annotations

import torch

from harness.replica.arithmetic import dequantize, quantize
from harness.replica.ops.base import MaybeTensor, NodeSpec, Tensor, along_axis, register


def _grid(spec: NodeSpec, x: Tensor, inputs: list[MaybeTensor]) -> tuple[Tensor, MaybeTensor]:
    """The node's scale and zero point shaped to broadcast over ``x``: per tensor, along
    ``axis`` or per ``block_size`` block, as the node's attributes say."""
    scale, zp = inputs[1], inputs[2] if len(inputs) > 2 else None
    axis, block = int(spec.attrs.get("axis", 1)), int(spec.attrs.get("block_size", 0))
    size = x.shape[axis % x.ndim] if x.ndim else 1
    zp = None if zp is None else along_axis(zp, axis, x.ndim, size, block)
    return along_axis(scale, axis, x.ndim, size, block), zp


@register("QuantizeLinear")
def _quantize_linear(spec, inputs, dtype):
    scale, zp = _grid(spec, inputs[0], inputs)
    return [quantize(inputs[0].to(dtype), scale, zp, spec.attrs["_qrange"])]


@register("DequantizeLinear")
def _dequantize_linear(spec, inputs, dtype):
    scale, zp = _grid(spec, inputs[0], inputs)
    return [dequantize(inputs[0], scale, zp, dtype)]


@register("DynamicQuantizeLinear")
def _dynamic_quantize_linear(spec, inputs, dtype):
    """uint8 quantization with scale/zero point from this tensor's range (ONNX spec, ORT code).

    Computed over the whole tensor it sees: the whole batch, or one sample under vmap.
    """
    x = inputs[0].to(dtype)
    low = torch.clamp(x.detach().amin(), max=0.0)
    high = torch.clamp(x.detach().amax(), min=0.0)
    span = (high - low) / 255.0
    scale = torch.where(high == low, torch.ones_like(span), span)
    zp = torch.round(torch.clamp(0.0 - low / scale, 0.0, 255.0))
    return [quantize(x, scale, zp, (0, 255)), scale, zp]
