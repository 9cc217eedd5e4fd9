"""Torch implementations of the ONNX ops the gradient replica interprets.

Each converter takes the node's spec, its input tensors (``None`` for omitted optional inputs)
and the float dtype the replica runs in, and returns the node's outputs. They follow the ONNX
operator spec and, where it leaves room, onnxruntime's CPU arithmetic, because the replica must
reproduce the *deployed* model, not an idealised one:

- quantized activations are carried as float tensors holding exact integers, so gradients can
  flow through them; ``QuantizeLinear`` rounds half-to-even (``torch.round``, as ORT's
  ``nearbyintf``) after dividing by the scale (as MLAS does), then clamps;
- rounding and truncation use straight-through estimators: exact values forward, identity
  gradient backward (zero outside the clamp range, via ``torch.clamp``);
- ``DynamicQuantizeLinear`` derives its scale and zero point from the tensor it sees, exactly as
  ORT does, and treats them as constants for the gradient (they depend on one extreme element;
  differentiating through them adds noise, not signal);
- integer ops (ConvInteger, MatMulInteger, QLinear*) run as float conv / matmul on the
  zero-point-centred integers, exact in float32 while accumulators stay below 2**24; QLinearConv
  and QLinearMatMul requantize as MLAS does, ``round(acc * (x_scale * w_scale / y_scale))``;
- onnxruntime's QOperator contrib ops (domain ``com.microsoft``, registered as
  ``"com.microsoft.<op>"``) follow onnxruntime's x86-64 CPU kernels (AVX2 and newer) step by step
  in float32, including where the zero point is added before or after rounding, so codes match
  exactly: QLinearAdd dequantizes, adds and divides by the output scale; QLinearMul multiplies
  the centred integers and scales by ``a_scale * b_scale / c_scale``; QLinearAveragePool sums the
  dequantized window in row-major order; QLinearGlobalAveragePool (and QLinearAveragePool over
  the whole image) sums integers and requantizes with ``x_scale / (y_scale * size)``;
  QLinearSigmoid uses MLAS's rational logistic approximation forward (true sigmoid backward).

Converters never use data-dependent Python control flow on activations, so the whole
interpreter can run under ``torch.func.vmap`` (per-sample dynamic quantization).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper

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


# ---------------------------------------------------------------------------------- helpers
def round_ste(x: Tensor) -> Tensor:
    """Round half to even forward, identity gradient backward (vmap-safe, no custom Function).

    ``round(x) - x`` is exact in floating point, so the forward value is exactly ``round(x)``.
    """
    return x + (torch.round(x) - x).detach()


def trunc_ste(x: Tensor) -> Tensor:
    return x + (torch.trunc(x) - x).detach()


def centred(q: Tensor, zp: MaybeTensor, dtype: torch.dtype) -> Tensor:
    """``q - zp`` as float, exact: integer operands are subtracted in int64 first (as ORT does)."""
    if zp is None:
        return q.to(dtype)
    if not q.is_floating_point() and not zp.is_floating_point():
        return (q.to(torch.int64) - zp.to(torch.int64)).to(dtype)
    return q.to(dtype) - zp.to(dtype)


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


def quantize(x: Tensor, scale: Tensor, zp: MaybeTensor, qrange: tuple[int, int]) -> Tensor:
    """ORT's QuantizeLinear: ``clamp(round(x / scale) + zp, qmin, qmax)``, STE gradient."""
    q = round_ste(x / scale.to(x.dtype))
    if zp is not None:
        q = q + zp.to(x.dtype)
    return torch.clamp(q, qrange[0], qrange[1])


def to_code(
    value: Tensor, zp: MaybeTensor, qrange: tuple[int, int], zp_first: bool = False
) -> Tensor:
    """``clamp(round(value) + zp)``, STE gradient; ``zp_first``: ``clamp(round(value + zp))``.

    Kernels that round with ``nearbyintf(value + zero_point)`` add first; the two differ when the
    float32 sum rounds onto a half.
    """
    if zp is None:
        q = round_ste(value)
    elif zp_first:
        q = round_ste(value + zp.to(value.dtype))
    else:
        q = round_ste(value) + zp.to(value.dtype)
    return torch.clamp(q, qrange[0], qrange[1])


def requantize(
    acc: Tensor, scale: Tensor, zp: MaybeTensor, qrange: tuple[int, int], zp_first: bool = False
) -> Tensor:
    """MLAS requantization of an accumulator: ``clamp(round(acc * scale) + zp)`` (multiplied by
    the combined scale, where :func:`quantize` divides by the output scale)."""
    return to_code(acc * scale.to(acc.dtype), zp, qrange, zp_first)


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


# ---------------------------------------------------------------------------------- elementwise
@register("Add")
def _add(spec, inputs, dtype):
    return [inputs[0] + inputs[1]]


@register("Sub")
def _sub(spec, inputs, dtype):
    return [inputs[0] - inputs[1]]


@register("Mul")
def _mul(spec, inputs, dtype):
    return [inputs[0] * inputs[1]]


@register("Div")
def _div(spec, inputs, dtype):
    a, b = inputs
    if not a.is_floating_point() and not b.is_floating_point():
        return [torch.div(a, b, rounding_mode="trunc")]
    return [a / b]


@register("Relu")
def _relu(spec, inputs, dtype):
    return [torch.relu(inputs[0])]


@register("LeakyRelu")
def _leaky_relu(spec, inputs, dtype):
    return [F.leaky_relu(inputs[0], float(spec.attrs.get("alpha", 0.01)))]


@register("PRelu")
def _prelu(spec, inputs, dtype):
    x, slope = inputs
    return [torch.where(x >= 0, x, x * slope.to(x.dtype))]  # slope broadcasts to x (ONNX)


@register("Elu")
def _elu(spec, inputs, dtype):
    return [F.elu(inputs[0], float(spec.attrs.get("alpha", 1.0)))]


@register("Selu")
def _selu(spec, inputs, dtype):
    x = inputs[0]
    alpha = float(spec.attrs.get("alpha", 1.67326319217681884765625))
    gamma = float(spec.attrs.get("gamma", 1.05070102214813232421875))
    return [gamma * torch.where(x > 0, x, alpha * torch.expm1(torch.clamp(x, max=0.0)))]


@register("HardSigmoid")
def _hard_sigmoid(spec, inputs, dtype):
    alpha, beta = float(spec.attrs.get("alpha", 0.2)), float(spec.attrs.get("beta", 0.5))
    return [torch.clamp(inputs[0] * alpha + beta, 0.0, 1.0)]


@register("HardSwish")
def _hard_swish(spec, inputs, dtype):
    x = inputs[0]  # ONNX: x * HardSigmoid(x) with alpha 1/6, beta 0.5
    return [x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)]


@register("Sigmoid")
def _sigmoid(spec, inputs, dtype):
    return [torch.sigmoid(inputs[0])]


@register("Tanh")
def _tanh(spec, inputs, dtype):
    return [torch.tanh(inputs[0])]


@register("Clip")
def _clip(spec, inputs, dtype):
    x = inputs[0]
    if spec.opset < 11:
        low, high = spec.attrs.get("min"), spec.attrs.get("max")
    else:
        low = inputs[1] if len(inputs) > 1 else None
        high = inputs[2] if len(inputs) > 2 else None
    if isinstance(low, Tensor):
        low = low.to(x.dtype)
    if isinstance(high, Tensor):
        high = high.to(x.dtype)
    if low is None and high is None:
        return [x]
    return [torch.clamp(x, low, high)]


@register("Identity", "Dropout")
def _identity(spec, inputs, dtype):
    if spec.op == "Dropout" and spec.attrs.get("_n_outputs", 1) > 1:
        return [inputs[0], torch.ones_like(inputs[0], dtype=torch.bool)]
    return [inputs[0]]


def _softmax_like(spec: NodeSpec, x: Tensor, fn: Callable) -> Tensor:
    if spec.opset >= 13:
        return fn(x, dim=int(spec.attrs.get("axis", -1)))
    axis = int(spec.attrs.get("axis", 1)) % x.ndim  # old spec: coerce to 2-D at axis
    flat = x.reshape([*x.shape[:axis], -1])
    return fn(flat, dim=-1).reshape(x.shape)


@register("Softmax")
def _softmax(spec, inputs, dtype):
    return [_softmax_like(spec, inputs[0], torch.softmax)]


@register("LogSoftmax")
def _log_softmax(spec, inputs, dtype):
    return [_softmax_like(spec, inputs[0], torch.log_softmax)]


@register("Cast")
def _cast(spec, inputs, dtype):
    x, to = inputs[0], int(spec.attrs["to"])
    if to in FLOAT_TYPES:
        if to == TensorProto.FLOAT16:
            return [x.to(torch.float16).to(dtype)]
        if to == TensorProto.BFLOAT16:
            return [x.to(torch.bfloat16).to(dtype)]
        return [x.to(dtype)]
    if to == TensorProto.BOOL:
        return [x != 0]
    if to not in INT_TORCH:
        raise spec.fail(f"casts to unsupported type {TensorProto.DataType.Name(to)}")
    if x.is_floating_point():  # keep activations float (and differentiable); values truncated
        return [trunc_ste(x)]
    return [x.to(INT_TORCH[to])]


# ---------------------------------------------------------------------------------- linear
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
    scale = along_axis(_output_scale(xs, ws, ys), 1, acc.ndim, acc.shape[1])
    return [requantize(acc, scale, yzp, spec.attrs["_qrange"])]


def _output_scale(x_scale: Tensor, w_scale: Tensor, y_scale: Tensor) -> Tensor:
    """MLAS's requantization multiplier ``x_scale * w_scale / y_scale``, in float32 as ORT."""
    f32 = torch.float32
    return x_scale.to(f32) * w_scale.to(f32) / y_scale.to(f32)


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
    return [requantize(acc, _output_scale(a_s, b_s, ys), yzp, spec.attrs["_qrange"])]


# ---------------------------------------------------------------------------------- quantization
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
    return [centred(q, zp, dtype) * along_axis(scale.to(dtype), axis, q.ndim, size, block)]


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


# ---------------------------------------------------------------------------------- pooling
def _pool_geometry(spec: NodeSpec, x: Tensor) -> tuple[list[int], list[int], list[int], list[int]]:
    kernel = ints(spec.attrs["kernel_shape"])
    n = len(kernel)
    strides = ints(spec.attrs.get("strides", [1] * n))
    dilations = ints(spec.attrs.get("dilations", [1] * n))
    return kernel, strides, dilations, resolve_pads(spec, x, kernel, strides, dilations)


@register("MaxPool")
def _max_pool(spec, inputs, dtype):
    x = inputs[0]
    if spec.attrs.get("_n_outputs", 1) > 1:
        raise spec.fail("asks for the Indices output, which the replica does not produce")
    pool = spatial_fn(spec, x, {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d})
    kernel, strides, dilations, pads = _pool_geometry(spec, x)
    n = len(kernel)
    padding: list[int] = pads[:n]
    ceil = bool(spec.attrs.get("ceil_mode", 0))
    if pads[:n] == pads[n:] and all(2 * p <= k for p, k in zip(pads[:n], kernel, strict=True)):
        out = pool(x, kernel, strides, padding, dilations, ceil_mode=ceil)
    else:
        padded = F.pad(x, torch_pad_order(pads), value=-math.inf)
        out = pool(padded, kernel, strides, [0] * n, dilations, ceil_mode=ceil)
        out = ceil_mode_crop(out, x.shape, kernel, strides, dilations, pads) if ceil else out
    if not pool_windows_hold_input(spec):  # onnxruntime starts each window at the lowest float
        out = out.clamp_min(torch.finfo(torch.float32).min)
    return [out]


def ceil_mode_crop(
    out: Tensor,
    shape: torch.Size,
    kernel: list[int],
    strides: list[int],
    dilations: list[int],
    pads: list[int],
) -> Tensor:
    """Drop the ceil-mode windows that would start in the end padding, as onnxruntime does.

    Given an input padded beforehand, torch counts the end padding as input and keeps a last
    window that starts there; onnxruntime (like torch with its own padding) drops it.
    """
    n = len(kernel)
    for i in range(n):
        size, span = shape[2 + i], (kernel[i] - 1) * dilations[i] + 1
        count = math.ceil((size + pads[i] + pads[i + n] - span) / strides[i]) + 1
        if (count - 1) * strides[i] >= size + pads[i]:
            count -= 1
        out = out.narrow(2 + i, 0, min(count, out.shape[2 + i]))
    return out


def pool_windows_hold_input(spec: NodeSpec) -> bool:
    """Every pooling window contains at least one input element (none lies wholly in padding).

    True with dilation 1, no ceil mode and each pad smaller than the kernel (``SAME_*`` and
    ``VALID`` padding always qualify); otherwise a window may see padding only.
    """
    kernel = ints(spec.attrs.get("kernel_shape", []))
    if not kernel or int(spec.attrs.get("ceil_mode", 0)):
        return False
    if any(d != 1 for d in ints(spec.attrs.get("dilations", [1] * len(kernel)))):
        return False
    auto = spec.attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        return True  # SAME pads total kernel - 1 at most, so each is below the kernel
    if auto not in ("NOTSET", ""):
        return False
    pads = ints(spec.attrs.get("pads", [0] * 2 * len(kernel)))
    return all(pad < k for pad, k in zip(pads, kernel + kernel, strict=True))


@register("AveragePool")
def _average_pool(spec, inputs, dtype):
    x = inputs[0]
    pool = spatial_fn(spec, x, {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d})
    kernel, strides, dilations, pads = _pool_geometry(spec, x)
    if any(d != 1 for d in dilations):
        raise spec.fail("uses dilations, which torch average pooling lacks")
    n = len(kernel)
    include = bool(spec.attrs.get("count_include_pad", 0))
    ceil = bool(spec.attrs.get("ceil_mode", 0))
    if pads[:n] == pads[n:] and all(2 * p <= k for p, k in zip(pads[:n], kernel, strict=True)):
        return [pool(x, kernel, strides, pads[:n], ceil_mode=ceil, count_include_pad=include)]
    padded = F.pad(x, torch_pad_order(pads))
    total = pool(padded, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    ones = F.pad(torch.ones_like(x[:1, :1]), torch_pad_order(pads))
    share = pool(ones, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    if ceil:
        total, share = (
            ceil_mode_crop(t, x.shape, kernel, strides, dilations, pads) for t in (total, share)
        )
    return [total if include else total / share]  # else: over the real elements only


@register("GlobalAveragePool")
def _global_average_pool(spec, inputs, dtype):
    x = inputs[0]
    return [x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)]


@register("GlobalMaxPool")
def _global_max_pool(spec, inputs, dtype):
    x = inputs[0]
    return [x.amax(dim=tuple(range(2, x.ndim)), keepdim=True)]


def _reduce_axes(spec: NodeSpec, inputs: list[MaybeTensor], attr_until: int) -> list[int] | None:
    if spec.opset < attr_until:
        axes = spec.attrs.get("axes")
    else:
        axes = inputs[1].tolist() if len(inputs) > 1 and inputs[1] is not None else None
    return None if axes is None or len(axes) == 0 else ints(axes)


def _reduce(spec: NodeSpec, inputs: list[MaybeTensor], attr_until: int, fn: Callable) -> Tensor:
    x = inputs[0]
    axes = _reduce_axes(spec, inputs, attr_until)
    keep = bool(spec.attrs.get("keepdims", 1))
    if axes is None:
        if spec.attrs.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.ndim))
    return fn(x, dim=tuple(axes), keepdim=keep)


@register("ReduceMean")
def _reduce_mean(spec, inputs, dtype):
    return [_reduce(spec, inputs, 18, torch.mean)]


@register("ReduceMax")
def _reduce_max(spec, inputs, dtype):
    return [_reduce(spec, inputs, 18, torch.amax)]


@register("ReduceSum")
def _reduce_sum(spec, inputs, dtype):
    return [_reduce(spec, inputs, 13, torch.sum)]


@register("BatchNormalization")
def _batch_norm(spec, inputs, dtype):
    if int(spec.attrs.get("training_mode", 0)):
        raise spec.fail("is in training mode; export the model in eval mode")
    x, scale, bias, mean, var = (t.to(inputs[0].dtype) for t in inputs[:5])
    eps = float(spec.attrs.get("epsilon", 1e-5))
    return [F.batch_norm(x, mean, var, scale, bias, training=False, eps=eps)]


# ---------------------------------------------------------------------------------- shapes
@register("Flatten")
def _flatten(spec, inputs, dtype):
    x = inputs[0]
    axis = int(spec.attrs.get("axis", 1))
    axis = (
        axis + x.ndim if axis < 0 else axis
    )  # ONNX: axis in [-r, r], negative counts from the end
    return [x.reshape(math.prod(x.shape[:axis]), -1)]


@register("Reshape")
def _reshape(spec, inputs, dtype):
    x, shape = inputs[0], ints(inputs[1].tolist())
    if not int(spec.attrs.get("allowzero", 0)):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x.reshape(shape)]


@register("Transpose")
def _transpose(spec, inputs, dtype):
    x = inputs[0]
    perm = ints(spec.attrs.get("perm", list(reversed(range(x.ndim)))))
    return [x.permute(perm)]


@register("Concat")
def _concat(spec, inputs, dtype):
    parts = [t for t in inputs if t is not None]
    if any(t.is_floating_point() for t in parts):
        parts = [t.to(dtype) for t in parts]
    return [torch.cat(parts, dim=int(spec.attrs["axis"]))]


@register("ConstantOfShape")
def _constant_of_shape(spec, inputs, dtype):
    """torch's exporter builds Pad's ``pads`` with it; folded at build time like the rest."""
    value = spec.attrs.get("value")
    array = numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
    if array.size != 1:
        raise spec.fail(f"has a value with {array.size} elements (must be one)")
    if array.dtype.kind not in "biuf":
        raise spec.fail(f"has a value of unsupported type {array.dtype}")
    fill = torch.from_numpy(np.array(array.reshape(()), dtype=array.dtype, copy=True))
    if fill.is_floating_point():
        fill = fill.to(dtype)
    return [fill.expand(ints(inputs[0].tolist())).clone()]


@register("Shape")
def _shape(spec, inputs, dtype):
    dims = list(inputs[0].shape)
    start, end = spec.attrs.get("start", 0), spec.attrs.get("end", len(dims))
    return [torch.tensor(dims[start:end], dtype=torch.int64)]


@register("Gather")
def _gather(spec, inputs, dtype):
    data, idx = inputs
    axis = int(spec.attrs.get("axis", 0)) % data.ndim
    flat = torch.remainder(idx.reshape(-1).to(torch.int64), data.shape[axis])
    picked = torch.index_select(data, axis, flat)
    return [picked.reshape([*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :]])]


def _axes_of(spec: NodeSpec, inputs: list[MaybeTensor]) -> list[int] | None:
    if spec.opset < 13:
        axes = spec.attrs.get("axes")
        return None if axes is None else ints(axes)
    return ints(inputs[1].tolist()) if len(inputs) > 1 and inputs[1] is not None else None


@register("Unsqueeze")
def _unsqueeze(spec, inputs, dtype):
    x, axes = inputs[0], _axes_of(spec, inputs)
    if not axes:
        raise spec.fail("has no axes")
    rank = x.ndim + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return [x]


@register("Squeeze")
def _squeeze(spec, inputs, dtype):
    x, axes = inputs[0], _axes_of(spec, inputs)
    if axes is None:
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    for axis in sorted((a % x.ndim for a in axes), reverse=True):
        x = x.squeeze(axis)
    return [x]


@register("Slice")
def _slice(spec, inputs, dtype):
    x = inputs[0]
    if spec.opset < 10:
        starts, ends = ints(spec.attrs["starts"]), ints(spec.attrs["ends"])
        axes, steps = spec.attrs.get("axes"), None
    else:
        starts, ends = ints(inputs[1].tolist()), ints(inputs[2].tolist())
        axes = inputs[3].tolist() if len(inputs) > 3 and inputs[3] is not None else None
        steps = inputs[4].tolist() if len(inputs) > 4 and inputs[4] is not None else None
    axes = ints(axes) if axes is not None else list(range(len(starts)))
    steps = ints(steps) if steps is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        dim = x.shape[axis]
        start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        else:  # ONNX clamps differently when walking backwards
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
        index = torch.arange(start, end, step, dtype=torch.int64)
        x = torch.index_select(x, axis % x.ndim, index)
    return [x]


@register("Upsample")
def _upsample(spec, inputs, dtype):
    """Opset 7-9 Upsample (kept by old exporters), nearest mode: output index ``i`` reads input
    ``floor(i / scale)`` along each axis. Linear mode is refused: its coordinate convention
    differs between onnxruntime versions, so a replica could not promise the same numbers."""
    x = inputs[0]
    scales = spec.attrs.get("scales") if len(inputs) < 2 else inputs[1].tolist()
    if scales is None or len(scales) != x.ndim:
        raise spec.fail(f"needs one scale per axis of its {x.ndim}-d input")
    mode = spec.attrs.get("mode", "nearest")
    if mode != "nearest":
        raise spec.fail(f"mode {mode!r} is not supported by the replica (only 'nearest')")
    y = x
    for axis, scale in enumerate(scales):
        if float(scale) == 1.0:
            continue
        size = math.floor(x.shape[axis] * float(scale))
        if size < 1:
            raise spec.fail(f"scale {scale} shrinks axis {axis} of size {x.shape[axis]} to nothing")
        index = torch.clamp(
            torch.floor(torch.arange(size, dtype=torch.float64) / float(scale)).long(),
            max=x.shape[axis] - 1,
        )
        y = torch.index_select(y, axis, index)
    return [y]


@register("Pad")
def _pad(spec, inputs, dtype):
    """constant / reflect / edge / wrap padding; pads as attribute (opset < 11) or input, with
    optional ``axes`` (opset 18). Negative pads crop first, as onnxruntime does."""
    x = inputs[0]
    mode = spec.attrs.get("mode", "constant")
    if spec.opset < 11:
        pads = ints(spec.attrs.get("pads", spec.attrs.get("paddings", [])))
        value: float | MaybeTensor = float(spec.attrs.get("value", 0.0))
        axes = None
    else:
        pads = ints(inputs[1].tolist())
        value = inputs[2] if len(inputs) > 2 else None
        axes = inputs[3].tolist() if len(inputs) > 3 and inputs[3] is not None else None
    axes = [a % x.ndim for a in ints(axes)] if axes is not None else list(range(x.ndim))
    if len(pads) != 2 * len(axes):
        raise spec.fail(f"has {len(pads)} pads for {len(axes)} axes")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise spec.fail(f"has unknown mode {mode!r}")
    n = len(axes)
    for axis, begin, end in zip(axes, pads[:n], pads[n:], strict=True):
        if begin < 0 or end < 0:
            cut_begin, cut_end = max(-begin, 0), max(-end, 0)
            x = x.narrow(axis, cut_begin, x.shape[axis] - cut_begin - cut_end)
    if mode == "constant":
        if isinstance(value, Tensor):
            value = float(value.reshape(-1)[0]) if value.numel() else 0.0
        torch_pads = [0] * (2 * x.ndim)
        for axis, begin, end in zip(axes, pads[:n], pads[n:], strict=True):
            torch_pads[2 * (x.ndim - 1 - axis)] = max(begin, 0)
            torch_pads[2 * (x.ndim - 1 - axis) + 1] = max(end, 0)
        return [F.pad(x, torch_pads, value=0.0 if value is None else value)]
    for axis, begin, end in zip(axes, pads[:n], pads[n:], strict=True):
        begin, end, size = max(begin, 0), max(end, 0), x.shape[axis]
        if begin == 0 and end == 0:
            continue
        if mode == "reflect" and max(begin, end) >= size:
            raise spec.fail(f"reflects {max(begin, end)} elements of an axis of length {size}")
        index = [_pad_source(i, size, mode) for i in range(-begin, size + end)]
        x = torch.index_select(x, axis, torch.tensor(index, dtype=torch.int64))
    return [x]


def _pad_source(i: int, size: int, mode: str) -> int:
    """Which input element padded position ``i`` (may lie outside ``[0, size)``) copies."""
    if mode == "edge":
        return min(max(i, 0), size - 1)
    if mode == "wrap":
        return i % size
    return -i if i < 0 else (2 * (size - 1) - i if i >= size else i)  # reflect


# ---------------------------------------------------------------------------------- QOperator
#: Domain prefix of onnxruntime's contrib ops in :data:`OPS` (``"com.microsoft.QLinearAdd"``).
MS = "com.microsoft."


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
    ratio = _output_scale(a_s, b_s, c_s)
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
    kernel, strides, dilations, pads = _pool_geometry(spec, x)
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
