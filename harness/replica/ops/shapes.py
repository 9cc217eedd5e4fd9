"""Shape and indexing converters: Flatten, Reshape, Transpose, Concat, Gather, Slice, Pad, ...

Shape inputs are folded at build time like every other constant, so these converters see
concrete shapes and never branch on activation values.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from harness.replica.ops.base import MaybeTensor, NodeSpec, Tensor, ints, register


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
