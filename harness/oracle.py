"""The gradient oracle: differentiable logits of the deployed graph, and proof that they match it.

:mod:`harness.replica` turns the ONNX graph into a torch module; this module puts the adapter's
pixel preprocessing in front of it and checks, before any defense trusts its gradients, that it
computes what the onnxruntime session *as configured* computes (kernel profile included).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from harness.errors import ModelError
from harness.replica import ReplicaModule, build_replica


class ParityReport(BaseModel):
    """How closely the replica reproduces onnxruntime on some images."""

    n: int
    agreement: float  # top-1 agreement with onnxruntime
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    threshold: float
    passed: bool


class PixelReplica(nn.Module):
    """NHWC pixels in [0, 255] → logits: the adapter's preprocessing, in torch, then the replica."""

    def __init__(self, replica: ReplicaModule, preprocessing: Any) -> None:
        super().__init__()
        self.replica = replica
        self.channels = preprocessing.channels
        self.channels_first = preprocessing.layout == "NCHW"
        # float32 constants and the same operation order as Preprocessing.apply: identical bits
        self.register_buffer("inv_255", torch.tensor(np.float32(1.0 / 255.0)))
        self.register_buffer("mean", torch.tensor(preprocessing.mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(preprocessing.std, dtype=torch.float32))
        self.eval()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 4 or pixels.shape[-1] != self.channels:
            raise ModelError(
                f"expected NHWC pixels with {self.channels} channel(s), "
                f"got shape {tuple(pixels.shape)}"
            )
        x = (pixels.to(self.inv_255.dtype) * self.inv_255 - self.mean) / self.std
        return self.replica(x.permute(0, 3, 1, 2) if self.channels_first else x)


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
        self.module: nn.Module = PixelReplica(self.replica, self.preprocessing)

    def logits(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Differentiable logits for NHWC pixels (float in [0, 255], or uint8)."""
        if isinstance(pixels, np.ndarray):
            pixels = torch.from_numpy(pixels)
        return self.module(pixels)

    def parity(
        self, pixels: np.ndarray, threshold: float = 0.995, batch_size: int = 256
    ) -> ParityReport:
        """Compare replica and onnxruntime logits on ``pixels`` (queries the adapter once each).

        Batch-wide dynamic quantization (``dynamic_per_sample=False``) depends on batch-mates,
        so the replica is then fed exactly the adapter's chunks.
        """
        if len(pixels) == 0:
            raise ModelError("parity needs at least one image")
        reference = self.adapter.logits(pixels)
        step = batch_size
        if self.replica.has_dynamic_quant and not self.replica.dynamic_per_sample:
            step = self.adapter.batch_size
        with torch.no_grad():
            ours = np.concatenate(
                [
                    self.logits(pixels[i : i + step]).float().numpy()
                    for i in range(0, len(pixels), step)
                ]
            )
        diff = np.abs(ours.astype(np.float64) - reference)
        agreement = float(np.mean(ours.argmax(axis=1) == reference.argmax(axis=1)))
        finite = bool(np.isfinite(diff).all())
        return ParityReport(
            n=len(pixels),
            agreement=agreement,
            max_abs_logit_diff=float(diff.max()),
            mean_abs_logit_diff=float(diff.mean()),
            threshold=threshold,
            passed=finite and agreement >= threshold,
        )
