"""The experiment configuration: one validated object that fully determines a run.

Same config (and seed) ⇒ same artifacts and the same table, so the config is stored inside
``report.json`` and its hash names the cached training artifacts. Files are TOML or JSON.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from harness.errors import BlindspotsError, validation_message
from harness.kernels import DEFAULT_PROFILE, KernelProfile

ALL_PRECISIONS = ["fp32", "int8-dynamic", "int8-static", "int4"]
ALL_DEFENSES = [
    "neural_cleanse",
    "activation_clustering",
    "spectral_signatures",
    "strip",
    "fine_pruning",
]


class TrainingOptions(BaseModel):
    """Subset of :class:`harness.training.TrainConfig` a config file may set (seed comes from seeds)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(0.05, gt=0)
    augment: bool = False


class ExperimentConfig(BaseModel):
    """Everything a run depends on. Unknown keys are errors (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "digits"
    data_root: str | None = None
    dataset_options: dict[str, Any] = Field(default_factory=dict)
    model: str = "small_cnn"
    attack: str = "badnet"
    attack_params: dict[str, Any] = Field(default_factory=lambda: {"patch_size": 2})
    training: TrainingOptions = Field(default_factory=TrainingOptions)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    """Each in 0..2**32-1: numpy, torch and the artifact cache keys all take them."""
    precisions: list[str] = Field(default_factory=lambda: list(ALL_PRECISIONS), min_length=1)
    calibration_size: int = Field(256, ge=1)
    clean_control: bool = True
    defenses: list[str] = Field(default_factory=lambda: list(ALL_DEFENSES))
    defense_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    defense_clean_size: int = Field(200, ge=10)
    """Held-out clean test images given to defenses (NC's optimisation set, STRIP's pool, ...)."""
    defense_train_size: int | None = Field(None, ge=10)
    """Cap on training images AC/SS analyse (None: the whole training set, as published)."""
    eval_limit: int | None = Field(None, ge=1)
    """Cap on test images for accuracy / ASR (None: the whole test set)."""
    finetune_epochs: int = Field(2, ge=0)
    threads: int | None = Field(None, ge=1)
    int8_kernels: KernelProfile = DEFAULT_PROFILE
    """INT8 kernel profile of every onnxruntime session (see :mod:`harness.kernels`): ``exact``
    (int32 accumulation, the same numbers on any x86 CPU) or ``host`` (this CPU's defaults)."""

    @field_validator("seeds")
    @classmethod
    def _seeds_in_range(cls, value: list[int]) -> list[int]:
        bad = [seed for seed in value if not 0 <= seed < 2**32]
        if bad:
            raise ValueError(f"seeds must lie in 0..{2**32 - 1}, got {bad}")
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate seeds in {value}")
        return value

    @field_validator("precisions", "defenses")
    @classmethod
    def _no_duplicates(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate entries in {value}")
        return value

    def training_key(self, seed: int) -> str:
        """Hash of everything that determines the trained weights for ``seed``."""
        relevant = self.model_dump(
            include={
                "dataset",
                "data_root",
                "dataset_options",
                "model",
                "attack",
                "attack_params",
                "training",
            }
        )
        relevant["seed"] = seed
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]

    def check_plugins(self) -> None:
        """Fail fast (before hours of training) on any unknown plug-in name."""
        from defenses.base import DEFENSES
        from exporters.quantizers import PRECISIONS
        from harness.attacks.base import ATTACKS
        from harness.data.base import DATASETS
        from harness.models import MODELS

        DATASETS.get(self.dataset)
        MODELS.get(self.model)
        ATTACKS.get(self.attack)
        for name in self.precisions:
            PRECISIONS.get(name)
        for name in [*self.defenses, *self.defense_params]:
            DEFENSES.get(name)(self.defense_params.get(name))  # validates the parameters too


def build_config(raw: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate a raw mapping into an :class:`ExperimentConfig` with a one-line error."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        message = validation_message(exc, "option", ExperimentConfig.model_fields)
        raise BlindspotsError(f"{source}: {message}") from None


def load_config(
    path: str | Path | None, overrides: dict[str, Any] | None = None
) -> ExperimentConfig:
    """Read a TOML or JSON config file (or none), apply CLI overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise BlindspotsError(f"config file not found: {path}")
        text = path.read_text()
        try:
            raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise BlindspotsError(f"{path}: cannot parse config: {exc}") from None
    if not isinstance(raw, dict):
        raise BlindspotsError(
            f"{path}: a config must be a table/object of options, got {type(raw).__name__}"
        )
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build_config(raw, str(path) if path else "config")
