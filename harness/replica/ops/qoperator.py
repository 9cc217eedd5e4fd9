"""onnxruntime's QOperator contrib ops (domain ``com.microsoft``, keys ``"com.microsoft.<op>"``).

They follow onnxruntime's x86-64 CPU kernels (AVX2 and newer) step by step in float32, including
where the zero point is added before or after rounding, so codes match exactly: QLinearAdd
dequantizes, adds and divides by the output scale; QLinearMul multiplies the centred integers and
scales by ``a_scale * b_scale / c_scale``; QLinearAveragePool sums the dequantized window in
row-major order; QLinearGlobalAveragePool (and QLinearAveragePool over the whole image) sums
integers and requantizes with ``x_scale / (y_scale * size)``; QLinearSigmoid uses MLAS's rational
logistic approximation forward (true sigmoid backward).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from harness.replica.arithmetic import centred, output_scale, quantize, requantize, to_code
from harness.replica.ops.base import (
    MS,
    MaybeTensor,
    NodeSpec,
    Tensor,
    optional,
    register,
    torch_pad_order,
)
from harness.replica.ops.pooling import pool_geometry


@register(MS + "QLinearAdd")
def _qlinear_add(spec, inputs, dtype):
    """``round((sa*(a-za) + sb*(b-zb)) / sc + zc)``: the zero point enters before rounding, as in
    MLAS's AVX2 kernel (folded into its constant term) and its portable kernel. The AVX2 kernel
    orders the float32 operations differently (ratios ``sa/sc``, ``sb/sc`` and fused
    multiply-adds), which can move a value across a rounding boundary by an ulp: a one-code
    difference, never seen in the parity tests."""
    a, a_s, a_zp, b, b_s, b_zp, c_s, c_zp = optional(inputs, 8)
    total = centred(a, a_zp, dtype) * a_s.to(dtype) + centred(b, b_zp, dtype) * b_s.to(dtype)
    return [to_code(total / c_s.to(dtype), c_zp, spec.attrs["_qrange"], zp_first=True)]


@register(MS + "QLinearMul")
def _qlinear_mul(spec, inputs, dtype):
    """MLAS: ``round(float((a-za)*(b-zb)) * (sa*sb/sc) + zc)``, the zero point added first."""
    a, a_s, a_zp, b, b_s, b_zp, c_s, c_zp = optional(inputs, 8)
    product = centred(a, a_zp, dtype) * centred(b, b_zp, dtype)  # exact: |product| <= 2**16
    ratio = output_scale(a_s, b_s, c_s)
    return [requantize(product, ratio, c_zp, spec.attrs["_qrange"], zp_first=True)]


def _channels_first(spec: NodeSpec, x: Tensor) -> tuple[Tensor, bool]:
    """NHWC input (``channels_last=1``) → NCHW view, and whether to permute the result back."""
    if int(spec.attrs.get("channels_last", 0)):
        return x.permute(0, x.ndim - 1, *range(1, x.ndim - 1)), True
    return x, False


def _channels_back(y: Tensor, last: bool) -> Tensor:
    return y.permute(0, *range(2, y.ndim), 1) if last else y


def _qlinear_global_pool(
    x: Tensor, xs: Tensor, xzp: MaybeTensor, ys: Tensor, yzp: MaybeTensor, qrange, dtype
) -> Tensor:
    """MLAS QLinearGlobalAveragePool: integer sum, then ``round(sum * xs / (ys * size)) + zp``."""
    size = math.prod(x.shape[2:])
    total = centred(x, xzp, dtype).sum(dim=tuple(range(2, x.ndim)), keepdim=True)
    f32 = torch.float32
    scale = xs.to(f32) / (ys.to(f32) * torch.tensor(float(size), dtype=f32))
    return requantize(total, scale, yzp, qrange)


@register(MS + "QLinearGlobalAveragePool")
def _qlinear_global_average_pool(spec, inputs, dtype):
    x, xs, xzp, ys, yzp = optional(inputs, 5)
    x, last = _channels_first(spec, x)
    y = _qlinear_global_pool(x, xs, xzp, ys, yzp, spec.attrs["_qrange"], dtype)
    return [_channels_back(y, last)]


def _pool_output_size(size: int, kernel: int, stride: int, pads: int, begin: int, ceil: bool):
    span = size + pads - kernel
    out = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= size + begin:  # a last window starting in the end padding
        out -= 1
    return out


@register(MS + "QLinearAveragePool")
def _qlinear_average_pool(spec, inputs, dtype):
    """onnxruntime's kernel: dequantize, sum each window in row-major order in float32, divide by
    the count, ``round(avg / y_scale + y_zero_point)``. A window covering the whole unpadded image
    falls back to the global-pool kernel (integer sum), as onnxruntime does."""
    x, xs, xzp, ys, yzp = optional(inputs, 5)
    qrange = spec.attrs["_qrange"]
    x, last = _channels_first(spec, x)
    kernel, strides, dilations, pads = pool_geometry(spec, x)
    if any(d != 1 for d in dilations):
        raise spec.fail("uses dilations, which onnxruntime's QLinearAveragePool ignores")
    n = len(kernel)
    if list(x.shape[2:]) == kernel and not any(pads):
        return [_channels_back(_qlinear_global_pool(x, xs, xzp, ys, yzp, qrange, dtype), last)]
    ceil = bool(spec.attrs.get("ceil_mode", 0))
    sizes = list(x.shape[2:])
    outs = [
        _pool_output_size(sizes[i], kernel[i], strides[i], pads[i] + pads[i + n], pads[i], ceil)
        for i in range(n)
    ]
    ends = [(outs[i] - 1) * strides[i] + kernel[i] - sizes[i] - pads[i] for i in range(n)]
    geometry = torch_pad_order(pads[:n] + ends)

    def windows(t: Tensor) -> Tensor:  # (N, C, *outs, prod(kernel)), window in row-major order
        t = F.pad(t, geometry)
        for i in range(n):
            t = t.unfold(2 + i, kernel[i], strides[i])
        return t.reshape(*t.shape[: 2 + n], -1)

    parts = windows(centred(x, xzp, dtype) * xs.to(dtype))
    total = parts[..., 0]
    for i in range(1, parts.shape[-1]):
        total = total + parts[..., i]
    if int(spec.attrs.get("count_include_pad", 0)):
        count = torch.tensor(float(math.prod(kernel)), dtype=dtype)
    else:
        count = windows(torch.ones([1, 1, *sizes], dtype=dtype)).sum(dim=-1)
    y = to_code(total / count / ys.to(dtype), yzp, qrange, zp_first=True)
    return [_channels_back(y, last)]


@register(MS + "QLinearConcat")
def _qlinear_concat(spec, inputs, dtype):
    """Each input requantized to the output's scale / zero point (onnxruntime's lookup table:
    ``round(x_scale * (x - x_zp) / y_scale) + y_zp``; an exact copy when the parameters match)."""
    ys, yzp, rest = inputs[0], inputs[1], inputs[2:]
    if len(rest) % 3:
        raise spec.fail("needs (tensor, scale, zero point) triples after the output parameters")
    qrange = spec.attrs["_qrange"]
    parts = [
        quantize(centred(rest[i], rest[i + 2], dtype) * rest[i + 1].to(dtype), ys, yzp, qrange)
        for i in range(0, len(rest), 3)
    ]
    return [torch.cat(parts, dim=int(spec.attrs["axis"]))]


@register(MS + "QGemm")
def _qgemm(spec, inputs, dtype):
    """onnxruntime's quantized Gemm (what ``QuantFormat.QOperator`` makes of a Gemm): the integer
    product of the centred codes plus the int32 bias ``C``, times ``alpha * a_scale * b_scale``
    (per output column when ``b_scale`` is), divided by ``y_scale`` and requantized when the
    output is quantized (``y_zero_point`` given), else returned as float."""
    a, a_s, a_zp, b, b_s, b_zp, c, y_s, y_zp = optional(inputs, 9)
    if int(spec.attrs.get("transA", 0)):
        a = a.transpose(0, 1)
    if int(spec.attrs.get("transB", 0)):
        b = b.transpose(0, 1)
    acc = torch.matmul(centred(a, a_zp, dtype), centred(b, b_zp, dtype))
    if c is not None:
        acc = acc + c.to(dtype)
    f32 = torch.float32
    scale = float(spec.attrs.get("alpha", 1.0)) * a_s.to(f32) * b_s.to(f32)
    if y_s is not None:
        scale = scale / y_s.to(f32)
    if y_zp is None:
        return [acc * scale.to(dtype)]
    return [requantize(acc, scale, y_zp, spec.attrs["_qrange"])]


def _lookup(spec: NodeSpec, inputs: list[MaybeTensor], dtype, fn: Callable) -> list[Tensor]:
    """onnxruntime's 256-entry lookup ops: ``quantize(fn(x_scale * (x - x_zp)))`` per code."""
    x, xs, xzp, ys, yzp = optional(inputs, 5)
    return [quantize(fn(centred(x, xzp, dtype) * xs.to(dtype)), ys, yzp, spec.attrs["_qrange"])]


@register(MS + "QLinearLeakyRelu")
def _qlinear_leaky_relu(spec, inputs, dtype):
    alpha = torch.tensor(float(spec.attrs.get("alpha", 0.01)), dtype=torch.float32)
    return _lookup(spec, inputs, dtype, lambda v: torch.where(v >= 0, v, alpha.to(v.dtype) * v))


@register(MS + "QLinearSigmoid")
def _qlinear_sigmoid(spec, inputs, dtype):
    def fn(v: Tensor) -> Tensor:
        exact = torch.sigmoid(v)
        return exact + (mlas_logistic(v).to(v.dtype) - exact).detach()

    return _lookup(spec, inputs, dtype, fn)


#: MLAS's logistic constants (Eigen's rational approximation): clamp range, the numerator's odd
#: coefficients alpha_9 ... alpha_1, the denominator's even coefficients beta_10 ... beta_0.
_LOGISTIC_RANGE = 18.0
_LOGISTIC_ALPHA = (
    4.37031012579801e-11,
    1.15627324459942e-07,
    6.08574864600143e-05,
    8.51377133304701e-03,
    2.48287947061529e-01,
)
_LOGISTIC_BETA = (
    6.10247389755681e-13,
    5.76102136993427e-09,
    6.29106785017040e-06,
    1.70198817374094e-03,
    1.16817656904453e-01,
    9.93151921023180e-01,
)


def _fma32(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """float32 fused multiply-add: the float32 product is exact in float64, one rounding after."""
    return (a.double() * b.double() + c.double()).float()


def mlas_logistic(v: Tensor) -> Tensor:
    """onnxruntime's float32 sigmoid (MLAS FMA3 kernel: Horner steps as fused multiply-adds,
    ``p / q + 0.5`` clamped at 0), so quantized sigmoid tables round exactly as onnxruntime's."""
    with torch.no_grad():
        x = torch.clamp(v.detach().float(), -_LOGISTIC_RANGE, _LOGISTIC_RANGE)
        x2 = x * x

        def horner(coefficients: tuple[float, ...]) -> Tensor:
            c = [torch.tensor(k, dtype=torch.float32) for k in coefficients]
            acc = _fma32(x2, c[0], c[1])
            for k in c[2:]:
                acc = _fma32(x2, acc, k)
            return acc

        p = x * horner(_LOGISTIC_ALPHA)
        q = horner(_LOGISTIC_BETA)
        return torch.clamp(p / q + 0.5, min=0.0)
