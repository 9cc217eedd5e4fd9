"""Fine-tuning a pruned model and shipping it again: the repair half of Fine-Pruning.

Fine-Pruning (Liu et al. 2018) prunes the last convolutional layer and then fine-tunes on clean
data. An auditor of a deployed model only keeps the repair if it survives the deployment
pipeline, so the fine-tuned model is re-exported and re-quantized with the same precision and
recipe as the artifact under audit, and evaluated on that new artifact.

Pruned channels are applied as a fixed 0/1 mask after ``model.features`` (the tensor the
runtime adapter calls ``last_conv``: the input of global pooling), so they stay pruned during
fine-tuning and in the exported graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from exporters.onnx_export import export_onnx
from exporters.quantizers import quantize
from harness.adapter import RuntimeAdapter
from harness.errors import ModelError
from harness.kernels import DEFAULT_PROFILE, KernelProfile
from harness.preprocessing import Preprocessing
from harness.training import TrainConfig, load_model, train_model


class PrunedModel(nn.Module):
    """``head(pool(features(x) * keep))`` for models built from :mod:`harness.models`."""

    def __init__(self, model: nn.Module, keep: np.ndarray) -> None:
        super().__init__()
        for part in ("features", "pool", "head"):
            if not hasattr(model, part):
                raise ModelError(f"cannot prune: model has no '{part}' stage")
        self.inner = model
        mask = torch.as_tensor(np.asarray(keep, dtype=np.float32)).reshape(1, -1, 1, 1)
        self.register_buffer("keep", mask)

    def forward(self, x):
        return self.inner.head(self.inner.pool(self.inner.features(x) * self.keep))


@dataclass
class FinePruneRetrainer:
    """Callable given to Fine-Pruning: ``keep mask → RuntimeAdapter`` of the repaired artifact.

    ``clean_x``/``clean_y`` are the defender's clean fine-tuning images; they must be disjoint
    from the images the defense measures accuracy and ASR on.
    """

    state_path: Path
    precision: str
    clean_x: np.ndarray
    clean_y: np.ndarray
    calibration_images: np.ndarray
    out_dir: Path
    epochs: int = 2
    lr: float = 0.01
    seed: int = 0
    threads: int | None = None
    kernel_profile: KernelProfile = DEFAULT_PROFILE
    """INT8 kernel profile of the repaired artifact's session: the audited cell's own."""
    source_indices: np.ndarray | None = None
    """Indices of ``clean_x`` in the training set (provenance; checked by the tests)."""

    def __call__(self, keep: np.ndarray) -> RuntimeAdapter:
        model, meta = load_model(self.state_path)
        preprocessing = Preprocessing.from_json(meta["preprocessing"])
        pruned = PrunedModel(model, keep)
        if self.epochs > 0:
            config = TrainConfig(
                model=meta["model"],
                epochs=self.epochs,
                lr=self.lr,
                seed=self.seed,
                schedule="cosine",
                num_threads=self.threads,
            )
            pruned = train_model(
                self.clean_x,
                self.clean_y,
                int(meta["num_classes"]),
                preprocessing,
                config,
                progress=False,
                model=pruned,
            )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        exported = self.out_dir / f"fine_pruned-{self.precision}-exported.onnx"
        export_onnx(pruned, exported, self.calibration_images[:64], preprocessing)
        target = self.out_dir / f"fine_pruned-{self.precision}.onnx"
        artifact = quantize(self.precision, exported, target, self.calibration_images)
        return RuntimeAdapter.from_path(
            artifact.path, threads=self.threads, kernel_profile=self.kernel_profile
        )
