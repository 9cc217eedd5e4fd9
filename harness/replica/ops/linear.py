"""Conv, Gemm and MatMul, in float and integer form.

Integer ops (ConvInteger, MatMulInteger, QLinearConv, QLinearMatMul) run as float conv / matmul
on the zero-point-centred integers, exact in float32 while accumulators stay below 2**24;
QLinearConv and QLinearMatMul requantize as MLAS does,
``round(acc * (x_scale * w_scale / y_scale))`` (:mod:`harness.replica.arithmetic`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.replica.arithmetic import centred, output_scale, requantize
from harness.replica.ops.base import (
    MaybeTensor,
    NodeSpec,
    Tensor,
    along_axis,
    channel_param,
    ints,
    register,
    resolve_pads,
    spatial_fn,
    torch_pad_order,
)


@register("Conv")
def _conv(spec, inputs, dtype):
    x, w = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    return [_conv_float(spec, x, w.to(x.dtype), bias)]


def _conv_float(spec: NodeSpec, x: Tensor, w: Tensor, bias: MaybeTensor) -> Tensor:
    conv = spatial_fn(spec, x, {1: F.conv1d, 2: F.conv2d, 3: F.conv3d})
    n = x.ndim - 2
    kernel = ints(spec.attrs.get("kernel_shape", w.shape[2:]))
    strides = ints(spec.attrs.get("strides", [1] * n))
    dilations = ints(spec.attrs.get("dilations", [1] * n))
    pads = resolve_pads(spec, x, kernel, strides, dilations)
    padding: list[int] | int = pads[:n]
    if pads[:n] != pads[n:]:
        x, padding = F.pad(x, torch_pad_order(pads)), 0
    b = None if bias is None else bias.to(x.dtype)
    group = int(spec.attrs.get("group", 1))
    return conv(x, w, b, stride=strides, padding=padding, dilation=dilations, groups=group)


@register("ConvInteger")
def _conv_integer(spec, inputs, dtype):
    x, w = inputs[0], inputs[1]
    x_zp = inputs[2] if len(inputs) > 2 else None
    w_zp = inputs[3] if len(inputs) > 3 else None
    xc = centred(x, x_zp, dtype)  # ORT pads with x_zero_point, i.e. 0 once centred
    wc = centred(w, channel_param(w_zp, w.ndim), dtype)
    return [_conv_float(spec, xc, wc, None)]


@register("QLinearConv")
def _qlinear_conv(spec, inputs, dtype):
    x, xs, xzp, w, ws, wzp, ys, yzp = inputs[:8]
    bias = inputs[8] if len(inputs) > 8 else None
    acc = _conv_float(
        spec, centred(x, xzp, dtype), centred(w, channel_param(wzp, w.ndim), dtype), None
    )
    if bias is not None:
        acc = acc + along_axis(bias.to(dtype), 1, acc.ndim, acc.shape[1])
    scale = along_axis(output_scale(xs, ws, ys), 1, acc.ndim, acc.shape[1])
    return [requantize(acc, scale, yzp, spec.attrs["_qrange"])]


@register("Gemm")
def _gemm(spec, inputs, dtype):
    a, b = inputs[0], inputs[1].to(inputs[0].dtype)
    c = inputs[2] if len(inputs) > 2 else None
    if int(spec.attrs.get("transA", 0)):
        a = a.transpose(0, 1)
    if not int(spec.attrs.get("transB", 0)):
        b = b.transpose(0, 1)
    alpha, beta = float(spec.attrs.get("alpha", 1.0)), float(spec.attrs.get("beta", 1.0))
    y = F.linear(a, b) if alpha == 1.0 else alpha * F.linear(a, b)
    if c is not None:
        y = y + (c.to(y.dtype) if beta == 1.0 else beta * c.to(y.dtype))
    return [y]


@register("MatMul")
def _matmul(spec, inputs, dtype):
    a, b = inputs
    return [torch.matmul(a, b.to(a.dtype))]


def _row_zp(zp: MaybeTensor) -> MaybeTensor:
    """MatMulInteger's A zero point may be per row ``(M,)``: broadcast it over columns."""
    return zp.unsqueeze(-1) if zp is not None and zp.ndim == 1 and zp.numel() > 1 else zp


@register("MatMulInteger")
def _matmul_integer(spec, inputs, dtype):
    a, b = inputs[0], inputs[1]
    a_zp = inputs[2] if len(inputs) > 2 else None
    b_zp = inputs[3] if len(inputs) > 3 else None
    return [torch.matmul(centred(a, _row_zp(a_zp), dtype), centred(b, b_zp, dtype))]


@register("QLinearMatMul")
def _qlinear_matmul(spec, inputs, dtype):
    a, a_s, a_zp, b, b_s, b_zp, ys, yzp = inputs
    acc = torch.matmul(centred(a, _row_zp(a_zp), dtype), centred(b, b_zp, dtype))
    return [requantize(acc, output_scale(a_s, b_s, ys), yzp, spec.attrs["_qrange"])]
