"""Pooling, reductions and inference BatchNorm, with onnxruntime's window conventions.

Asymmetric or large pads are applied explicitly and ceil-mode windows that would start in the
end padding are dropped, as onnxruntime does; MaxPool windows that may hold only padding start
at the lowest float, as onnxruntime's do.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from harness.replica.ops.base import (
    MaybeTensor,
    NodeSpec,
    Tensor,
    ints,
    register,
    resolve_pads,
    spatial_fn,
    torch_pad_order,
)


def pool_geometry(spec: NodeSpec, x: Tensor) -> tuple[list[int], list[int], list[int], list[int]]:
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
    kernel, strides, dilations, pads = pool_geometry(spec, x)
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
    kernel, strides, dilations, pads = pool_geometry(spec, x)
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
