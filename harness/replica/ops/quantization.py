"""QuantizeLinear, DequantizeLinear and DynamicQuantizeLinear.

``DynamicQuantizeLinear`` derives its scale and zero point from the tensor it sees, exactly as
ORT does, and treats them as constants for the gradient (they depend on one extreme element;
differentiating through them adds noise, not signal).
"""

from __future__ import annotations

import torch

from harness.replica.arithmetic import dequantize, quantize
from harness.replica.ops.base import along_axis, register


@register("QuantizeLinear")
def _quantize_linear(spec, inputs, dtype):
    x, scale = inputs[0], inputs[1]
    zp = inputs[2] if len(inputs) > 2 else None
    axis, block = int(spec.attrs.get("axis", 1)), int(spec.attrs.get("block_size", 0))
    size = x.shape[axis % x.ndim] if x.ndim else 1
    scale = along_axis(scale, axis, x.ndim, size, block)
    zp = None if zp is None else along_axis(zp, axis, x.ndim, size, block)
    return [quantize(x.to(dtype), scale, zp, spec.attrs["_qrange"])]


@register("DequantizeLinear")
def _dequantize_linear(spec, inputs, dtype):
    q, scale = inputs[0], inputs[1]
    zp = inputs[2] if len(inputs) > 2 else None
    axis, block = int(spec.attrs.get("axis", 1)), int(spec.attrs.get("block_size", 0))
    size = q.shape[axis % q.ndim] if q.ndim else 1
    zp = None if zp is None else along_axis(zp, axis, q.ndim, size, block)
    return [dequantize(q, along_axis(scale, axis, q.ndim, size, block), zp, dtype)]


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
