"""Elementwise converters: arithmetic, activations, softmax and Cast.

Float → integer Cast keeps activations float and differentiable: the value is truncated with a
straight-through estimator (:func:`~harness.replica.arithmetic.trunc_ste`), not cast.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from onnx import TensorProto

from harness.replica.arithmetic import trunc_ste
from harness.replica.ops.base import FLOAT_TYPES, INT_TORCH, NodeSpec, Tensor, register


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
