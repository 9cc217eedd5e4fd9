"""The gradient oracle: differentiable logits of the deployed graph, and proof that they match it.

:mod:`harness.replica.interpreter` turns the ONNX graph into a torch module; this module puts the
adapter's
pixel preprocessing in front of it and checks, before any defense trusts its gradients, that it
computes what the onnxruntime session *as configured* computes (kernel profile included).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from harness.core.errors import ModelError
from harness.replica.interpreter import OutputQuantizer, ReplicaModule, build_replica
from harness.runtime.kernels import probe_host

#: Default parity bounds, relative to the logit scale (median top-minus-bottom logit range of
#: the session's own outputs). Under the exact kernel profile the replica reproduces the
#: session bit for bit except for rare one-code rounding flips in requantization, which moved
#: the digits fixture's logits by at most 0.65% of that range (int8-static, triggered inputs);
#: int16-saturating kernels moved them by ~23% (max |Δlogit| 3.51 on a ~15 range). 5% / 0.5%
#: admit a handful of flips and refuse any systematic difference.
MAX_REL_DIFF = 0.05
MEAN_REL_DIFF = 0.005


class ParitySet(BaseModel):
    """Replica vs session on one set of images (clean, or randomly stamped)."""

    name: str
    n: int
    agreement: float
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    logit_scale: float
    finite: bool


class ParityReport(BaseModel):
    """How closely the replica reproduces the onnxruntime session *as configured*.

    Passing needs, on every set, top-1 agreement ≥ ``threshold`` and max / mean |Δlogit| within
    ``max_rel_diff`` / ``mean_rel_diff`` of that set's logit scale. Top-line fields are the worst
    over the sets. ``failures`` says which bound broke; ``likely_cause`` what to do about it.
    """

    n: int
    agreement: float
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    threshold: float
    max_rel_diff: float = MAX_REL_DIFF
    mean_rel_diff: float = MEAN_REL_DIFF
    kernel_profile: str = "exact"
    sets: list[ParitySet] = Field(default_factory=list)
    failures: list[str] = Field(default_factory=list)
    likely_cause: str | None = None
    passed: bool

    def summary(self) -> str:
        """One line for a not-applicable reason."""
        broken = "; ".join(self.failures) or "passed"
        cause = f"; likely cause: {self.likely_cause}" if self.likely_cause else ""
        return f"replica does not match the onnxruntime session ({broken}){cause}"


class PixelReplica(nn.Module):
    """NHWC RGB pixels in [0, 255] → logits: the adapter's preprocessing in torch, then the replica.

    Each step mirrors :meth:`Preprocessing.apply` with the same float32 constants in the same
    order (channel swap, cast, scale, subtract mean, divide by std, layout), so the replica's
    inputs carry identical bits and parity failures can only come from the graph itself.
    """

    def __init__(self, replica: ReplicaModule, preprocessing: Any) -> None:
        super().__init__()
        self.replica = replica
        self.channels = preprocessing.channels
        self.channels_first = preprocessing.layout == "NCHW"
        self.reverse_channels = preprocessing.channel_order == "BGR"
        self.scale: torch.Tensor  # buffers: they follow the module across devices and dtypes
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("scale", torch.tensor(np.float32(preprocessing.scale)))
        self.register_buffer("mean", torch.tensor(preprocessing.mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(preprocessing.std, dtype=torch.float32))
        self.eval()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.replica(self.graph_input(pixels))

    def forward_with_pre_quantizer(
        self, pixels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and the logits before the output quantizer (see :class:`OutputQuantizer`)."""
        return self.replica.forward_with_pre_quantizer(self.graph_input(pixels))

    def graph_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """The adapter's preprocessing of NHWC pixels, in torch."""
        if pixels.ndim != 4 or pixels.shape[-1] != self.channels:
            raise ModelError(
                f"expected NHWC pixels with {self.channels} channel(s), "
                f"got shape {tuple(pixels.shape)}"
            )
        if self.reverse_channels:
            pixels = pixels.flip(-1)
        x = (pixels.to(self.scale.dtype) * self.scale - self.mean) / self.std
        return x.permute(0, 3, 1, 2) if self.channels_first else x


class GradientOracle:
    """Differentiable logits of the adapter's deployed graph, plus a parity check against ORT.

    ``dynamic_per_sample`` defaults to the adapter's batching: per-sample dynamic quantization
    unless the adapter was told to feed whole batches (``per_sample=False``).
    """

    def __init__(self, adapter: Any, dynamic_per_sample: bool | None = None) -> None:
        self.adapter = adapter
        self.preprocessing = adapter.preprocessing
        if dynamic_per_sample is None:
            dynamic_per_sample = adapter.per_sample is not False
        self.replica = build_replica(adapter.model, dynamic_per_sample=dynamic_per_sample)
        self.module = PixelReplica(self.replica, self.preprocessing)
        self.fixed_batch: int | None = getattr(adapter, "fixed_batch", None)

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the adapter: a pickled oracle computes the same logits and gradients in
        another process (Neural Cleanse's label fan-out ships it to workers), but has no
        onnxruntime session to check parity against, so :meth:`parity` needs the original."""
        return {**self.__dict__, "adapter": None}

    @property
    def output_quantizer(self) -> OutputQuantizer | None:
        """The quantizer producing the logits, when the graph ends in one (QDQ graphs)."""
        return self.replica.output_quantizer

    def logits(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Differentiable logits for NHWC pixels (float in [0, 255], or uint8)."""
        return self._batched(pixels, lambda chunk: (self.module(chunk),))[0]

    def logits_with_pre_quantizer(
        self, pixels: torch.Tensor | np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Differentiable logits and the logits entering the output quantizer (None without one).

        Where the pre-quantizer value lies beyond the quantizer's range the logit is clamped and
        its straight-through gradient is zero; :meth:`OutputQuantizer.saturated_high` says where.
        """
        if self.output_quantizer is None:
            return self.logits(pixels), None
        logits, pre = self._batched(pixels, self.module.forward_with_pre_quantizer)
        return logits, pre

    def _batched(
        self, pixels: torch.Tensor | np.ndarray, forward: Callable[[torch.Tensor], tuple]
    ) -> tuple[torch.Tensor, ...]:
        if isinstance(pixels, np.ndarray):
            pixels = torch.from_numpy(pixels)
        fixed = self.fixed_batch
        if not fixed or len(pixels) == fixed:
            return tuple(forward(pixels))
        # the graph fixes its batch (Reshapes may hard-code it): run it in padded chunks, as the
        # adapter feeds the session
        parts = []
        for start in range(0, len(pixels), fixed):
            chunk = pixels[start : start + fixed]
            real = len(chunk)
            if real < fixed:
                pad = torch.zeros((fixed - real, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = torch.cat([chunk, pad])
            parts.append([t[:real] for t in forward(chunk)])
        return tuple(torch.cat(column) for column in zip(*parts, strict=True))

    def parity(
        self,
        pixels: np.ndarray,
        threshold: float = 0.995,
        batch_size: int = 256,
        stamped: np.ndarray | None = None,
        max_rel_diff: float = MAX_REL_DIFF,
        mean_rel_diff: float = MEAN_REL_DIFF,
    ) -> ParityReport:
        """Compare replica and onnxruntime logits on clean ``pixels`` and ``stamped`` images.

        Defenses query the oracle far from clean images (Neural Cleanse stamps masks and
        patterns), so agreement on clean inputs alone is not enough; without ``stamped`` images
        a seeded set of randomly patched copies of ``pixels`` is used.
        """
        if self.adapter is None:
            raise ModelError("a pickled gradient oracle has no onnxruntime session for parity")
        if len(pixels) == 0:
            raise ModelError("parity needs at least one image")
        if stamped is None:
            stamped = random_stamps(pixels, np.random.default_rng(0))
        sets = [
            self._parity_set("clean", pixels, batch_size),
            self._parity_set("stamped", stamped, batch_size),
        ]
        failures = []
        for item in sets:
            if not item.finite:
                failures.append(f"{item.name}: non-finite logits")
                continue
            if item.agreement < threshold:
                failures.append(f"{item.name}: top-1 agreement {item.agreement:.4f} < {threshold}")
            if item.max_abs_logit_diff > max_rel_diff * item.logit_scale:
                failures.append(
                    f"{item.name}: max |Δlogit| {item.max_abs_logit_diff:.4g} > "
                    f"{max_rel_diff:g} × logit scale {item.logit_scale:.4g}"
                )
            if item.mean_abs_logit_diff > mean_rel_diff * item.logit_scale:
                failures.append(
                    f"{item.name}: mean |Δlogit| {item.mean_abs_logit_diff:.4g} > "
                    f"{mean_rel_diff:g} × logit scale {item.logit_scale:.4g}"
                )
        profile = str(getattr(self.adapter, "kernel_profile", "exact"))
        return ParityReport(
            n=sum(item.n for item in sets),
            agreement=min(item.agreement for item in sets),
            max_abs_logit_diff=max(item.max_abs_logit_diff for item in sets),
            mean_abs_logit_diff=max(item.mean_abs_logit_diff for item in sets),
            threshold=threshold,
            max_rel_diff=max_rel_diff,
            mean_rel_diff=mean_rel_diff,
            kernel_profile=profile,
            sets=sets,
            failures=failures,
            likely_cause=likely_cause(self.replica, profile) if failures else None,
            passed=not failures,
        )

    def _parity_set(self, name: str, pixels: np.ndarray, batch_size: int) -> ParitySet:
        """Batch-wide dynamic quantization (``dynamic_per_sample=False``) depends on batch-mates,
        so the replica is then fed exactly the adapter's chunks."""
        reference = self.adapter.logits(pixels).astype(np.float64)
        step = batch_size
        if self.replica.has_dynamic_quant and not self.replica.dynamic_per_sample:
            step = self.adapter.batch_size
        with torch.no_grad():
            ours = np.concatenate(
                [
                    self.logits(pixels[i : i + step]).float().numpy()
                    for i in range(0, len(pixels), step)
                ]
            ).astype(np.float64)
        diff = np.abs(ours - reference)
        finite = bool(np.isfinite(diff).all())
        spread = reference.max(axis=1) - reference.min(axis=1) if reference.ndim == 2 else diff
        return ParitySet(
            name=name,
            n=len(pixels),
            agreement=float(np.mean(ours.argmax(axis=1) == reference.argmax(axis=1))),
            max_abs_logit_diff=float(diff.max()) if finite else float("inf"),
            mean_abs_logit_diff=float(diff.mean()) if finite else float("inf"),
            logit_scale=float(np.median(spread)) if finite else 0.0,
            finite=finite,
        )


def random_stamps(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Copies of ``pixels`` with one random square patch of random colours each (seeded).

    Stand-ins for the inputs a trigger search evaluates: off the clean-image distribution, with
    saturated pixel values that stress the quantizers' ranges.
    """
    stamped = np.array(pixels, dtype=np.uint8, copy=True)
    n, h, w, c = stamped.shape
    side = max(1, min(h, w) // 4)
    for i in range(n):
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        stamped[i, top : top + side, left : left + side] = rng.choice(
            np.array([0, 255], dtype=np.uint8), size=(side, side, c)
        )
    return stamped


def likely_cause(replica: ReplicaModule, profile: str) -> str:
    """The most probable reason a replica and its session disagree, and what fixes it."""
    host = probe_host()
    if profile == "host" and host.profiles_differ:
        return (
            "this CPU's INT8 kernels saturate int16 pair sums (host kernel profile); "
            "use the exact profile (--int8-kernels exact) or re-quantize with reduce_range"
        )
    if not host.exact_verified:
        return (
            "onnxruntime's exact INT8 path did not reproduce int32 arithmetic on this CPU's probe "
            "graphs; re-quantize with reduce_range"
        )
    if replica.has_dynamic_quant and not replica.dynamic_per_sample:
        return "batch-wide dynamic quantization: run the adapter per sample (per_sample='auto')"
    return "an op whose onnxruntime kernel the replica does not reproduce exactly"
