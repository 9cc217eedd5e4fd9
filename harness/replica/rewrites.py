"""Build-time rewrites of the replica's step list that leave every value and gradient unchanged.

Neural Cleanse runs thousands of forward/backward passes through the replica, so its cost is
the defense's cost. Each rewrite here replaces steps by cheaper ones that compute the *same*
float32 values and the *same* gradients bit for bit (``tests/runtime/test_replica_rewrites.py`` checks
this against the plain interpretation), so they change nothing an auditor sees:

- :func:`fuse_fake_quant`: an activation ``QuantizeLinear → DequantizeLinear`` pair with one
  constant scale and zero point becomes one :data:`FAKE_QUANTIZE` step (same float32 operations
  in the same order). The unfused pair builds about ten autograd nodes per activation.
- :func:`drop_repeated_quantizers`: a fake-quant whose input is already quantized with the same
  scale, zero point and range (it went through a value-selecting op such as ``MaxPool`` or
  ``Flatten`` after an identical quantizer, as ``quantize_static`` writes around pools) is an
  exact identity: ``round(((c - z)·s) / s) = c - z`` for every code ``c``, and nothing clamps.
- :func:`centre_constant_weights`: ``ConvInteger`` / ``MatMulInteger`` with constant weights and
  weight zero points (dynamic INT8) subtract the zero point from the integer weights once, at
  build time, instead of on every call (exact: integer arithmetic, stored as float32 integers),
  and read them with the weight zero point omitted, through the same converters.
- :func:`pool_before_relu`: ``MaxPool(Relu(x))`` runs as ``Relu(MaxPool(x))``; both are
  monotone, so the values agree, and the gradient reaches the same input element (or is zero in
  both orders where the window's maximum is not positive) — on a quarter of the elements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness.replica.arithmetic import centred
from harness.replica.ops.base import Converter, NodeSpec, channel_param
from harness.replica.ops.pooling import pool_windows_hold_input


@dataclass(frozen=True)
class Step:
    """One node to interpret: its spec, tensor names ('' = omitted input) and, for steps the
    replica builds itself (fused ops), its converter (otherwise :data:`OPS` of ``spec.op``)."""

    spec: NodeSpec
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    convert: Converter | None = None


FAKE_QUANTIZE = "blindspots.FakeQuantize"
"""Op name of a fused QuantizeLinear → DequantizeLinear step (not an ONNX op: never in a graph)."""

#: Ops whose output elements are elements of their first input (rearranged or selected), so an
#: exactly quantized input gives an exactly quantized output with the same parameters.
VALUE_SELECTING = frozenset(
    {
        "Identity",
        "Flatten",
        "Reshape",
        "Squeeze",
        "Unsqueeze",
        "Transpose",
        "MaxPool",
        "GlobalMaxPool",
    }
)
#: Widest code range for which ``round(((c - z)·s) / s)`` provably returns ``c - z`` in float32
#: (relative error of the two roundings times the largest code stays far below one half).
_EXACT_CODE_SPAN = 1 << 16


def _fake_quantize_codes(
    x: torch.Tensor, scale: torch.Tensor, low: float, high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fake-quantized values and the unclamped codes (NaN codes moved out of range)."""
    code = torch.div(x, scale).round_()
    out = torch.clamp(code, low, high).mul_(scale)
    # a NaN code must count as clamped (as the mask and the unfused pair have it): the
    # backward kernel's comparisons give NaN a gradient in some lanes and not in others
    return out, code.nan_to_num_(nan=high + 1)


def _inside_gradient(grad: torch.Tensor, code: torch.Tensor, low: float, high: float):
    """``grad`` where ``low <= code <= high``, else 0, for integer codes, in one fused pass."""
    return torch.ops.aten.hardtanh_backward(grad, code, low - 0.5, high + 0.5)


class _FakeQuantize(torch.autograd.Function):
    """``(clamp(round(x / s) + zp) - zp) · s`` with the STE gradient ``1[unclamped]``.

    Computed as ``clamp(round(x / s), qmin - zp, qmax - zp) · s``: the codes are integers far below
    2**24, so adding and removing the zero point is exact in float32 and the values are
    bit-identical to ``QuantizeLinear`` then ``DequantizeLinear`` as
    :mod:`harness.replica.arithmetic` computes them (same division, same half-to-even rounding). The
    gradient is exactly 1 inside the range and 0 outside, as there: the unclamped code is saved (NaN
    codes as out of range), and since it is an integer, ``hardtanh``'s fused backward with the range
    widened by one half (open interval) is that indicator in a single pass, where a saved boolean
    mask costs a compare forward and a cast backward.

    This is the eager form, used outside functorch transforms: a ``setup_context`` Function
    pays for an ``inspect.signature`` bind on every call (about 80 µs, several per Neural
    Cleanse step). Under ``vmap`` (per-sample dynamic quantization) :class:`_FakeQuantizeVmap`
    computes the same thing.
    """

    @staticmethod
    def forward(ctx, x, scale, low, high):
        out, code = _fake_quantize_codes(x, scale, low, high)
        ctx.save_for_backward(code)
        ctx.bounds = (low, high)
        return out

    @staticmethod
    def backward(ctx, grad):
        (code,) = ctx.saved_tensors
        return _inside_gradient(grad, code, *ctx.bounds), None, None, None


class _FakeQuantizeVmap(torch.autograd.Function):
    """:class:`_FakeQuantize` in the form functorch transforms accept (``generate_vmap_rule``
    needs a ctx-free forward, so the code to save is a second, non-differentiable output)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, scale, low, high):
        return _fake_quantize_codes(x, scale, low, high)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])
        ctx.bounds = (inputs[2], inputs[3])
        ctx.set_materialize_grads(False)  # else autograd zero-fills a code-sized grad per call

    @staticmethod
    def backward(ctx, grad, _unused):
        if grad is None:
            return None, None, None, None
        (code,) = ctx.saved_tensors
        return _inside_gradient(grad, code, *ctx.bounds), None, None, None


def _in_functorch_transform() -> bool:
    """Whether a functorch transform (``vmap``) is active: the check torch's own
    ``Function.apply`` makes (private API; without it, always take the transform-safe path)."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return True if active is None else bool(active())


def fake_quantize(spec: NodeSpec, inputs: list, dtype: torch.dtype) -> list[torch.Tensor]:
    """Converter of a :data:`FAKE_QUANTIZE` step: inputs ``(x, scale, zero_point)``."""
    x, scale, zero_point = inputs
    low, high = spec.attrs["_qrange"]
    zp = spec.attrs.get("_zero_point")  # read at build time: no tensor → float per call
    if zp is None:
        zp = float(zero_point.reshape(()))
    args = (x.to(dtype), scale.reshape(()).to(dtype), low - zp, high - zp)
    if _in_functorch_transform():
        return [_FakeQuantizeVmap.apply(*args)[0]]
    return [_FakeQuantize.apply(*args)]


def _readers(steps: list[Step]) -> dict[str, list[int]]:
    readers: dict[str, list[int]] = {}
    for i, step in enumerate(steps):
        for name in step.inputs:
            if name:
                readers.setdefault(name, []).append(i)
    return readers


# ---------------------------------------------------------------------------------- fusion
def fuse_fake_quant(
    steps: list[Step], constants: dict[str, torch.Tensor], graph_outputs: set[str]
) -> list[Step]:
    """Replace each QuantizeLinear whose only reader is a DequantizeLinear with the same scalar
    constant scale and zero point by one :data:`FAKE_QUANTIZE` step (at the reader's place)."""
    readers = _readers(steps)
    fused: dict[int, Step] = {}
    dropped: set[int] = set()
    for i, q in enumerate(steps):
        if q.spec.op != "QuantizeLinear" or len(q.inputs) < 3 or q.outputs[0] in graph_outputs:
            continue
        users = readers.get(q.outputs[0], [])
        dq = steps[users[0]] if len(users) == 1 else None
        if dq is None or dq.spec.op != "DequantizeLinear" or dq.inputs[0] != q.outputs[0]:
            continue
        if not _same_scalar_params(q.inputs[1:3], dq.inputs[1:3], constants):
            continue
        attrs = {**q.spec.attrs, "_zero_point": float(constants[q.inputs[2]].reshape(()))}
        spec = NodeSpec(FAKE_QUANTIZE, f"{q.spec.name}+{dq.spec.name}", q.spec.opset, attrs)
        fused[users[0]] = Step(spec, q.inputs[:3], dq.outputs[:1], fake_quantize)
        dropped.add(i)
    return [fused.get(i, step) for i, step in enumerate(steps) if i not in dropped]


def _same_scalar_params(
    q_params: tuple[str, ...], dq_params: tuple[str, ...], constants: dict[str, torch.Tensor]
) -> bool:
    """Both (scale, zero point) pairs are present, constant, one element each and equal."""
    if len(dq_params) < 2 or not all(q_params) or not all(dq_params):
        return False
    if not all(name in constants for name in (*q_params, *dq_params)):
        return False
    pairs = [(constants[a], constants[b]) for a, b in zip(q_params, dq_params, strict=True)]
    return all(
        a.numel() == 1 and b.numel() == 1 and a.dtype == b.dtype and torch.equal(a, b)
        for a, b in pairs
    )


# ---------------------------------------------------------------------------------- requantization
def drop_repeated_quantizers(
    steps: list[Step], constants: dict[str, torch.Tensor], graph_outputs: set[str]
) -> list[Step]:
    """Remove fake-quant steps that re-quantize a tensor already quantized the same way.

    A tensor is *quantized as* ``(scale, zero point, range)`` when a fake-quant step wrote it or
    a :data:`VALUE_SELECTING` op read its data from such a tensor. A fake-quant reading a tensor
    quantized exactly as it would quantize is the identity (see the module docstring), so its
    readers read its input instead. A fake-quant writing a graph output is kept.
    """
    quantized_as: dict[str, tuple[float, float, tuple[int, int]]] = {}
    alias: dict[str, str] = {}
    kept: list[Step] = []
    for step in steps:
        inputs = tuple(alias.get(name, name) for name in step.inputs)
        if inputs != step.inputs:
            step = Step(step.spec, inputs, step.outputs, step.convert)
        params = _fake_quant_params(step, constants)
        if params is not None:
            if quantized_as.get(inputs[0]) == params and step.outputs[0] not in graph_outputs:
                alias[step.outputs[0]] = inputs[0]
                continue
            quantized_as[step.outputs[0]] = params
        elif _selects_values(step) and inputs[0] in quantized_as:
            quantized_as[step.outputs[0]] = quantized_as[inputs[0]]
        kept.append(step)
    return kept


def _selects_values(step: Step) -> bool:
    """A :data:`VALUE_SELECTING` op with a data input and a single output (a MaxPool only when
    each of its windows holds an input element: a window of padding only is the lowest float,
    which neither a quantizer nor a Relu leaves alone)."""
    single = step.spec.attrs.get("_n_outputs", 1) == 1
    if step.spec.op == "MaxPool" and not pool_windows_hold_input(step.spec):
        return False
    return step.spec.op in VALUE_SELECTING and bool(step.inputs) and single


def _fake_quant_params(
    step: Step, constants: dict[str, torch.Tensor]
) -> tuple[float, float, tuple[int, int]] | None:
    """``(scale, zero point, range)`` of a fused fake-quant whose repeat is provably exact."""
    if step.spec.op != FAKE_QUANTIZE:
        return None
    scale, zero_point = (constants.get(name) for name in step.inputs[1:3])
    if scale is None or zero_point is None:
        return None
    s, z = float(scale.reshape(())), float(zero_point.reshape(()))
    low, high = step.spec.attrs["_qrange"]
    finfo = torch.finfo(torch.float32)
    if not (math.isfinite(s) and s >= finfo.tiny) or high - low > _EXACT_CODE_SPAN:
        return None
    if s * max(abs(low - z), abs(high - z)) >= finfo.max:  # a code times s would overflow
        return None
    return s, z, (low, high)


# ---------------------------------------------------------------------------------- integer weights
def centre_constant_weights(steps: list[Step], constants: dict[str, torch.Tensor]) -> list[Step]:
    """Give each ConvInteger / MatMulInteger with a constant weight (and weight zero point, if
    any) a precomputed centred float32 weight, stored in ``constants`` under a new name, and
    drop the weight zero point input: the op's converter then centres nothing (``w - 0``)."""
    rewritten = []
    for step in steps:
        op, inputs = step.spec.op, step.inputs
        weight_zp = inputs[3] if len(inputs) > 3 else ""
        integer = op in ("ConvInteger", "MatMulInteger") and len(inputs) > 1
        if not integer or inputs[1] not in constants or (weight_zp and weight_zp not in constants):
            rewritten.append(step)
            continue
        weight = constants[inputs[1]]
        zp = constants[weight_zp] if weight_zp else None
        if op == "ConvInteger":  # per output channel; MatMulInteger's per column broadcasts
            zp = channel_param(zp, weight.ndim)
        name = f"{inputs[1]}::centred::{weight_zp}"
        constants[name] = centred(weight, zp, torch.float32)
        rewritten.append(Step(step.spec, (inputs[0], name, *inputs[2:3]), step.outputs))
    return rewritten


# ---------------------------------------------------------------------------------- Relu / MaxPool
def pool_before_relu(steps: list[Step], graph_outputs: set[str]) -> list[Step]:
    """Run each ``Relu → MaxPool`` pair (the Relu read by that MaxPool only) as MaxPool then Relu.

    The MaxPool takes over the Relu's output name (nothing else reads it) and the Relu writes the
    MaxPool's output, so every other step is untouched. MaxPool with an indices output is left.
    """
    readers = _readers(steps)
    order = list(steps)
    for i, relu in enumerate(steps):
        if relu.spec.op != "Relu" or relu.outputs[0] in graph_outputs:
            continue
        users = readers.get(relu.outputs[0], [])
        if len(users) != 1:
            continue
        pool = steps[users[0]]
        if pool.spec.op != "MaxPool" or not _selects_values(pool):
            continue
        order[i] = Step(pool.spec, relu.inputs[:1], relu.outputs, pool.convert)
        order[users[0]] = Step(relu.spec, relu.outputs, pool.outputs, relu.convert)
    return order
