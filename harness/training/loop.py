"""Deterministic, seeded CPU training of the poisoned model and its clean control.

The poisoned and clean models must differ only in their data, so that any gap a defense finds
between them is the backdoor and not training noise. Hence: the same seed gives the same initial
weights and the same batch order, deterministic kernels are enforced while training, and no
DataLoader workers (whose scheduling would reorder nothing here but costs start-up time).
Preprocessing is applied once to the whole uint8 set; batches are slices of one tensor.

Checkpoints are plain ``torch.save`` dicts of tensors and JSON-like metadata, read back with
``weights_only=True`` so that loading a model file can never execute code from it. They are
written atomically (a run killed mid-save leaves the previous file or none, never a torn one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from harness.artifacts.attack_metadata import MODEL_META_ATTR
from harness.artifacts.preprocessing import Preprocessing
from harness.core.atomic import atomic_target, write_error
from harness.core.errors import BlindspotsError, ModelError, validation_message
from harness.core.progress import Progress, ProgressMode, progress_for
from harness.core.threads import scoped_threads
from harness.data.base import validate_split
from harness.training.models import MODELS, build_model

REQUIRED_META = ("model", "num_classes", "in_channels", "preprocessing")


MIN_ONECYCLE_STEPS = 8


class TrainConfig(BaseModel):
    """Training hyper-parameters; defaults train the small CNNs to convergence in a few epochs.

    One-cycle SGD (warm-up then cosine annealing) is the schedule: it reaches high accuracy in
    few epochs without tuning, which matters when every experiment trains two models on CPU.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "small_cnn"
    # Bounds that no sensible run crosses: a learning rate of inf or 1e30 would otherwise be
    # accepted and only surface minutes later as an export parity error on a diverged model.
    epochs: int = Field(20, ge=1, le=10_000)
    batch_size: int = Field(128, ge=2, le=65_536)
    lr: float = Field(0.05, gt=0.0, le=10.0, allow_inf_nan=False)
    """Peak learning rate of the schedule (0.01 leaves small_cnn at ~60% on digits after 20
    epochs; 0.05 reaches ~97%)."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0, allow_inf_nan=False)
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0, allow_inf_nan=False)
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    seed: int = Field(0, ge=0)
    augment: bool = False
    """Random crop with zero padding (no flips: a mirrored traffic sign changes meaning)."""
    num_threads: int | None = Field(None, ge=1)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise BlindspotsError(
                validation_message(exc, "training option", TrainConfig.model_fields)
            ) from None

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        MODELS.get(value)  # raises the registry's did-you-mean error
        return value


@contextmanager
def _deterministic_torch(seed: int, num_threads: int | None) -> Iterator[None]:
    """Seed, force deterministic kernels and set threads; restore the caller's state after."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]), scoped_threads(torch, num_threads):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)


def _model_inputs(x: np.ndarray, preprocessing: Preprocessing, pad: int) -> torch.Tensor:
    """Normalise once; with ``pad`` > 0, zero-pad in pixel space first (black border for crops)."""
    if preprocessing.layout != "NCHW":
        raise ModelError(f"training needs NCHW preprocessing, got layout {preprocessing.layout!r}")
    if pad:
        x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return torch.from_numpy(preprocessing.apply(x))


def _random_crops(
    padded: torch.Tensor, idx: np.ndarray, size: tuple[int, int], rng: np.random.Generator
) -> torch.Tensor:
    """Crop each selected padded image at its own random offset (one gather, no Python loop)."""
    height, width = size
    max_dy, max_dx = padded.shape[2] - height, padded.shape[3] - width
    dy = rng.integers(0, max_dy + 1, size=len(idx))
    dx = rng.integers(0, max_dx + 1, size=len(idx))
    rows = torch.from_numpy(dy[:, None] + np.arange(height))[:, None, :, None]
    cols = torch.from_numpy(dx[:, None] + np.arange(width))[:, None, None, :]
    chans = torch.arange(padded.shape[1])[None, :, None, None]
    return padded[torch.from_numpy(idx)[:, None, None, None], chans, rows, cols]


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A fresh permutation per epoch; a trailing batch of one is dropped (BatchNorm needs ≥ 2)."""
    order = rng.permutation(n)
    batches = [order[start : start + batch_size] for start in range(0, n, batch_size)]
    return [b for b in batches if len(b) >= 2]


def _num_batches(n: int, batch_size: int) -> int:
    """How many batches :func:`_batches` yields per epoch (the scheduler needs it up front)."""
    return n // batch_size + (1 if n % batch_size >= 2 else 0)


def train_model(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    preprocessing: Preprocessing,
    config: TrainConfig,
    progress: ProgressMode | Progress = True,
    desc: str = "",
    model: nn.Module | None = None,
) -> nn.Module:
    """Train ``config.model`` on uint8 NHWC ``x`` / labels ``y``; returns the model in eval mode.

    Same inputs and seed on the same machine ⇒ bitwise-identical weights. Passing ``model``
    fine-tunes that module in place instead of building a fresh ``config.model`` (Fine-Pruning
    retrains a pruned network this way); the seed then fixes only the batch order.

    ``progress``: ``True`` reports per batch on stderr (a bar on a terminal, timestamped lines
    otherwise, see :func:`harness.core.progress.progress_for`), ``"lines"`` always prints lines,
    ``False`` is silent, a :class:`~harness.core.progress.Progress` instance reports there.
    Reporting never changes weights.
    """
    validate_split("training data", "train", x, y, num_classes)
    if len(x) < 2:
        raise BlindspotsError(f"training needs at least 2 images, got {len(x)}")
    height, width, channels = (int(v) for v in x.shape[1:])
    pad = max(1, min(height, width) // 8) if config.augment else 0
    inputs = _model_inputs(x, preprocessing, pad)
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    rng = np.random.default_rng(config.seed)
    steps_per_epoch = _num_batches(len(x), config.batch_size)

    with _deterministic_torch(config.seed, config.num_threads):
        if model is None:
            model = build_model(config.model, num_classes, channels)
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=config.momentum > 0,
        )
        total = config.epochs * steps_per_epoch
        scheduler: torch.optim.lr_scheduler.LRScheduler
        # One-cycle needs >= 2 warm-up steps (torch divides by the phase length): a run of fewer
        # than 8 batches in total anneals with cosine instead of crashing.
        if config.schedule == "onecycle" and total >= MIN_ONECYCLE_STEPS:
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=config.lr, total_steps=total, pct_start=0.25
            )
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        reporter = (
            progress
            if isinstance(progress, Progress)
            else progress_for(desc or f"train {config.model}", enabled=progress)
        )
        reporter.begin(config.epochs, steps_per_epoch)
        try:
            for epoch in range(config.epochs):
                seen, correct, loss_sum = 0, 0, 0.0
                for done, idx in enumerate(_batches(len(x), config.batch_size, rng), 1):
                    batch = _random_crops(inputs, idx, (height, width), rng) if pad else inputs[idx]
                    target = labels[idx]
                    logits = model(batch)
                    loss = loss_fn(logits, target)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    seen += len(idx)
                    loss_sum += loss.item() * len(idx)
                    correct += int((logits.argmax(1) == target).sum())
                    reporter.batch(epoch, done, {"loss": loss_sum / seen})
                reporter.epoch_end(epoch, {"loss": loss_sum / seen, "acc": correct / seen})
        finally:
            reporter.close()
    return model.eval()


def predict_torch(
    model: nn.Module, x_uint8: np.ndarray, preprocessing: Preprocessing, batch_size: int = 512
) -> np.ndarray:
    """Float32 logits of the PyTorch model on uint8 NHWC images (the fp32 reference)."""
    model.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(x_uint8), batch_size):
            batch = torch.from_numpy(preprocessing.apply(x_uint8[start : start + batch_size]))
            outputs.append(model(batch).numpy())
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(outputs).astype(np.float32, copy=False)


def save_state(model: nn.Module, path: str | Path, meta: dict[str, Any]) -> Path:
    """Write weights plus metadata (model name, num_classes, in_channels, preprocessing JSON).

    ``meta`` must be JSON-like (it is checked) so that ``weights_only`` loading accepts it.
    """
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise ValueError(f"save_state meta lacks {missing}")
    json.dumps(meta)  # only JSON-like values survive weights_only loading
    path = Path(path)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with atomic_target(path) as partial:  # a kill mid-save leaves the old file or none
        torch.save({"state_dict": state, "meta": dict(meta)}, partial)
    setattr(model, MODEL_META_ATTR, dict(meta))  # its exports carry the attack (export_onnx)
    return path


def checkpoint_is_valid(path: str | Path) -> bool:
    """Whether ``path`` is a whole, readable checkpoint (the runner's test before reusing one)."""
    try:
        load_state(path)
    except ModelError:
        return False
    return True


def set_aside_if_corrupt(path: str | Path) -> Path | None:
    """Rename a damaged cached checkpoint to ``<name>.corrupt-<UTC time>``; returns the new path.

    A cache entry that cannot be read must not stop every later run until someone deletes it by
    hand: the runner moves it aside (kept for inspection, never overwritten) and retrains. A
    missing or valid file is left alone (returns ``None``). Only for files the harness wrote
    itself: a model file a user passed in is reported by :func:`load_model`, never moved.
    """
    path = Path(path)
    if not path.is_file() or checkpoint_is_valid(path):
        return None
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    try:
        os.replace(path, aside)
    except OSError as exc:
        raise write_error(path, exc, "move aside the damaged checkpoint") from None
    return aside


def load_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_state`, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged / foreign file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot load model file {path}: it is truncated, damaged or not a torch "
            f"checkpoint ({reason})"
        ) from None
    if (
        not isinstance(blob, dict)
        or not isinstance(blob.get("state_dict"), dict)
        or not isinstance(blob.get("meta"), dict)
    ):
        raise ModelError(f"{path} is not a blindspots checkpoint (expected state_dict and meta)")
    missing = [key for key in REQUIRED_META if key not in blob["meta"]]
    if missing:
        raise ModelError(f"{path}: checkpoint metadata lacks {', '.join(missing)}")
    return blob["state_dict"], blob["meta"]


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the registered architecture named in the checkpoint and load its weights."""
    state_dict, meta = load_state(path)
    try:
        model = build_model(str(meta["model"]), int(meta["num_classes"]), int(meta["in_channels"]))
        model.load_state_dict(state_dict, strict=True)
    except BlindspotsError as exc:
        raise ModelError(f"{path}: {exc}") from None
    except (RuntimeError, ValueError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise ModelError(
            f"{path}: weights do not match model '{meta['model']}': {reason}"
        ) from None
    setattr(model, MODEL_META_ATTR, dict(meta))  # its exports carry the attack (export_onnx)
    return model.eval(), meta


def checkpoint_meta(
    config: TrainConfig,
    num_classes: int,
    in_channels: int,
    preprocessing: Preprocessing,
    **extra: Any,
) -> dict[str, Any]:
    """The metadata :func:`load_model` needs, plus the training config and anything in ``extra``."""
    return {
        "model": config.model,
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "preprocessing": preprocessing.to_json(),
        "train_config": config.model_dump(mode="json"),
        **extra,
    }
