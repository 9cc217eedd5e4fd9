"""Fine-tuning a pruned model and shipping it again: the repair half of Fine-Pruning.

Fine-Pruning (Liu et al. 2018) prunes the last convolutional layer and then fine-tunes on clean
data. An auditor of a deployed model only keeps the repair if it survives the deployment
pipeline, so the fine-tuned model is re-exported and re-quantized with the same precision and
recipe as the artifact under audit, and evaluated on that new artifact.

Pruned channels are applied as a fixed 0/1 mask after ``model.features`` (the tensor the
runtime adapter calls ``last_conv``: the input of global pooling), so they stay pruned during
fine-tuning and in the exported graph.

Budget: Fine-Pruning fine-tunes the pruned network as a short training run on the defender's
clean data — a fraction of the original training's cost, not a handful of steps. The old default
(2 epochs of 500 images at batch 128) was 8 SGD steps, so "fine-pruning never removes the
backdoor" measured the budget, not the method. The retrainer now runs at least ``min_steps``
SGD steps (default 500, about a fifth of the GTSRB training run in
``configs/grids/gtsrb_badnet.toml``: 8 epochs of ~300 steps), adding whole passes over its clean set
until it gets there (``epochs`` is the floor in passes). :meth:`FinePruneRetrainer.describe`
states the budget a run used, and Fine-Pruning records it. Both numbers are ours (the paper does
not prescribe a step count for other networks); how many clean images the defender holds is the
runner's ``clean_x`` — fine-tuning many steps on a few hundred images overfits them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from exporters.onnx_export import export_onnx
from exporters.quantization import quantize
from harness.artifacts.preprocessing import Preprocessing
from harness.core.errors import ModelError
from harness.core.kernel_profiles import DEFAULT_PROFILE, KernelProfile
from harness.runtime.adapter import RuntimeAdapter
from harness.training.loop import TrainConfig, load_model, train_model


class PrunedModel(nn.Module):
    """``head(pool(features(x) * keep))`` for models built from :mod:`harness.training.models`."""

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
    """Fewest passes over ``clean_x`` (more are added to reach ``min_steps``)."""
    min_steps: int = 500
    """Fewest SGD steps of fine-tuning (see the module doc); 0 keeps exactly ``epochs``."""
    batch_size: int = 128
    lr: float = 0.01
    seed: int = 0
    threads: int | None = None
    kernel_profile: KernelProfile = DEFAULT_PROFILE
    """INT8 kernel profile of the repaired artifact's session: the audited cell's own."""
    source_indices: np.ndarray | None = None
    """Indices of ``clean_x`` in the set named by ``data_source`` (provenance; checked by tests)."""
    data_source: str = "training"
    """Where ``clean_x`` comes from: ``"training"`` (clean images the model was trained on, what
    the runner passed before docs/protocol.md v1) or ``"held_out"`` (clean images the model never
    saw, the paper's and protocol v1's fine-tuning data). Fine-Pruning records it."""

    def planned_epochs(self) -> int:
        """Passes over ``clean_x``: ``epochs``, raised until at least ``min_steps`` steps run."""
        if self.epochs == 0 and self.min_steps == 0:
            return 0
        steps_per_epoch = max(1, math.ceil(len(self.clean_x) / self.batch_size))
        return max(self.epochs, math.ceil(self.min_steps / steps_per_epoch))

    def describe(self) -> dict[str, Any]:
        """The fine-tuning budget this retrainer runs (recorded with Fine-Pruning's result)."""
        epochs = self.planned_epochs()
        return {
            "images": len(self.clean_x),
            "epochs": epochs,
            "steps": epochs * math.ceil(len(self.clean_x) / self.batch_size),
            "batch_size": self.batch_size,
            "min_steps": self.min_steps,
            "lr": self.lr,
            "schedule": "cosine",
            "data_source": self.data_source,
        }

    def __call__(self, keep: np.ndarray) -> RuntimeAdapter:
        model, meta = load_model(self.state_path)
        preprocessing = Preprocessing.from_json(meta["preprocessing"])
        pruned: nn.Module = PrunedModel(model, keep)
        epochs = self.planned_epochs()
        if epochs > 0:
            config = TrainConfig(
                model=meta["model"],
                epochs=epochs,
                batch_size=self.batch_size,
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
