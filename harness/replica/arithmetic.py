"""onnxruntime's integer arithmetic in torch, with straight-through gradients: the one copy.

Two parts of the project must compute, in differentiable torch, exactly the codes onnxruntime's
CPU kernels compute: the gradient replica (:mod:`harness.replica.ops`, which interprets a
quantized ONNX graph) and the quantization-conditioned backdoor's fake-quant mirror
(:mod:`harness.qcb.fakequant`, which re-derives the deployed arithmetic from a live torch model).
Both used to carry their own rounding and quantizing helpers; a fix to one (a rounding mode, the
order in which the zero point enters) would silently have left the other reproducing a different
file. They now share these functions, so the two cannot drift apart.

The rules, from onnxruntime and MLAS:

- values are carried as float tensors holding exact integers, so gradients can flow through
  them; rounding is half-to-even (``torch.round``, as ORT's ``nearbyintf``);
- rounding and truncation use straight-through estimators: exact values forward, identity
  gradient backward (zero outside the clamp range, via ``torch.clamp``), with no custom
  ``autograd.Function``, so everything runs under ``torch.func.vmap``;
- ``QuantizeLinear`` divides by the scale (as MLAS does), rounds, adds the zero point and
  clamps; requantizing an integer accumulator multiplies by the combined scale instead.

Scales and zero points may be tensors or plain Python numbers (the mirror's activation grids);
a number enters the arithmetic as it is, so each caller computes exactly what it did before.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor
MaybeTensor = Tensor | None
Number = Tensor | float | int


def round_ste(x: Tensor) -> Tensor:
    """Round half to even forward, identity gradient backward (vmap-safe, no custom Function).

    ``round(x) - x`` is exact in floating point, so the forward value is exactly ``round(x)``.
    """
    return x + (torch.round(x) - x).detach()


def trunc_ste(x: Tensor) -> Tensor:
    """Truncate toward zero forward (a float → integer Cast), identity gradient backward."""
    return x + (torch.trunc(x) - x).detach()


def _as(value: Number, x: Tensor) -> Number:
    """A tensor parameter in ``x``'s dtype; a Python number unchanged (torch promotes it)."""
    return value.to(x.dtype) if isinstance(value, Tensor) else value


def centred(q: Tensor, zp: MaybeTensor | int, dtype: torch.dtype) -> Tensor:
    """``q - zp`` as float, exact: integer operands are subtracted in int64 first (as ORT does)."""
    if zp is None:
        return q.to(dtype)
    if not isinstance(zp, Tensor):
        return q.to(dtype) - zp
    if not q.is_floating_point() and not zp.is_floating_point():
        return (q.to(torch.int64) - zp.to(torch.int64)).to(dtype)
    return q.to(dtype) - zp.to(dtype)


def quantize(x: Tensor, scale: Number, zp: Number | None, qrange: tuple[int, int]) -> Tensor:
    """ORT's QuantizeLinear: ``clamp(round(x / scale) + zp, qmin, qmax)``, STE gradient."""
    q = round_ste(x / _as(scale, x))
    if zp is not None:
        q = q + _as(zp, x)
    return torch.clamp(q, qrange[0], qrange[1])


def dequantize(q: Tensor, scale: Number, zp: MaybeTensor | int, dtype: torch.dtype) -> Tensor:
    """ORT's DequantizeLinear: ``(q - zp) · scale`` (the centring exact, as :func:`centred`)."""
    return centred(q, zp, dtype) * (scale.to(dtype) if isinstance(scale, Tensor) else scale)


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


def output_scale(x_scale: Tensor, w_scale: Tensor, y_scale: Tensor) -> Tensor:
    """MLAS's requantization multiplier ``x_scale * w_scale / y_scale``, in float32 as ORT."""
    f32 = torch.float32
    return x_scale.to(f32) * w_scale.to(f32) / y_scale.to(f32)
