"""The experiment configuration: one validated object that fully determines a run.

Same config (and seed) ⇒ same artifacts and the same table, so the config is stored inside
``report.json`` and its hash names the cached training artifacts. Files are TOML or JSON.

A config may list several datasets, models or attacks (a sweep): ``dataset = ["digits",
"cifar10"]``. :meth:`ExperimentConfig.expand` turns it into one single-valued config per
combination, which is what training and evaluation take. Per-item settings are then keyed by
name (``[data_root] cifar10 = "..."``, ``[attack_params.badnet] patch_size = 3``): one flat
table would be applied to every attack, and BadNet's ``patch_size`` is an error for Blended.
Single-valued configs keep their flat tables.

Every evaluated cell has a content id (:meth:`ExperimentConfig.cell_key`): a hash of the
settings that determine its numbers, the package version and the input data's bytes, so a
changed data file or parameter can never be mistaken for a finished cell.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from defenses.base import DEFENSES, build_defense, default_defenses
from exporters.catalog import PRECISIONS
from harness import __version__
from harness.attacks.base import ATTACKS, build_attack
from harness.core.errors import BlindspotsError, DataError, validation_message
from harness.core.kernel_profiles import DEFAULT_PROFILE, KernelProfile
from harness.data.base import DATASETS
from harness.training.catalog import MODELS


class TrainingOptions(BaseModel):
    """Subset of :class:`harness.training.loop.TrainConfig` a config file may set (seed comes from seeds)."""

    model_config = ConfigDict(extra="forbid")

    # The bounds of TrainConfig, checked when the config is read, before any work.
    epochs: int = Field(30, ge=1, le=10_000)
    batch_size: int = Field(128, ge=2, le=65_536)
    lr: float = Field(0.05, gt=0, le=10.0, allow_inf_nan=False)
    augment: bool = False


class ExperimentConfig(BaseModel):
    """Everything a run depends on. Unknown keys are errors (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str | list[str] = "digits"
    """One registered dataset, or several for a sweep."""
    data_root: str | dict[str, str] | None = None
    """The dataset's location; for several datasets a table keyed by dataset name."""
    dataset_options: dict[str, Any] = Field(default_factory=dict)
    """Loader options; for several datasets a table of tables keyed by dataset name."""
    model: str | list[str] = "small_cnn"
    attack: str | list[str] = "badnet"
    attack_params: dict[str, Any] = Field(default_factory=lambda: {"patch_size": 2})
    """The attack's parameters; for several attacks a table of tables keyed by attack name."""
    training: TrainingOptions = Field(default_factory=TrainingOptions)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    """Each in 0..2**32-1: numpy, torch and the artifact cache keys all take them."""
    precisions: list[str] = Field(default_factory=PRECISIONS.ordered, min_length=1)
    calibration_size: int = Field(256, ge=1)
    clean_control: bool = True
    defenses: list[str] = Field(default_factory=lambda: default_defenses("run"))
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
    """INT8 kernel profile of every onnxruntime session (see :mod:`harness.runtime.kernels`): ``exact``
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

    @field_validator("dataset", "model", "attack")
    @classmethod
    def _axis_values(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            if not value:
                raise ValueError("a sweep axis needs at least one entry")
            if len(set(value)) != len(value):
                raise ValueError(f"duplicate entries in {value}")
        return value

    @field_validator("data_root", "dataset_options", "attack_params")
    @classmethod
    def _per_item_tables(cls, value: Any, info: ValidationInfo) -> Any:
        """Keyed tables for list axes, flat ones for single values: never a silent mix-up."""
        axis = "attack" if info.field_name == "attack_params" else "dataset"
        names = info.data.get(axis)
        if not isinstance(names, list):
            if info.field_name == "data_root" and isinstance(value, dict):
                raise ValueError("a table of roots needs a list of datasets; give one path")
            return value
        if value is None:
            return value
        if not isinstance(value, dict):
            raise ValueError(f"with several {axis}s, give a table keyed by {axis} name")
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"keys must be {axis}s listed in '{axis}' {names}; unknown: {unknown}")
        kind = str if info.field_name == "data_root" else dict
        wrong = sorted(key for key, item in value.items() if not isinstance(item, kind))
        if wrong:
            raise ValueError(f"entry '{wrong[0]}' must be a {'path' if kind is str else 'table'}")
        return value

    def _one(self, name: str) -> str:
        value = getattr(self, name)
        if not isinstance(value, str):
            raise BlindspotsError(f"{name} names several values; expand() the sweep config first")
        return value

    @property
    def dataset_name(self) -> str:
        """The dataset of a single-valued config (see :meth:`expand`)."""
        return self._one("dataset")

    @property
    def model_name(self) -> str:
        """The model of a single-valued config."""
        return self._one("model")

    @property
    def attack_name(self) -> str:
        """The attack of a single-valued config."""
        return self._one("attack")

    @property
    def data_location(self) -> str | None:
        """The data root of a single-valued config (a table only before :meth:`expand`)."""
        if isinstance(self.data_root, dict):
            raise BlindspotsError("data_root is a table per dataset; expand() the config first")
        return self.data_root

    def expand_axes(self) -> list[tuple[str, str, str]]:
        """Every (dataset, model, attack) combination, in the config's order."""
        return list(
            itertools.product(_as_list(self.dataset), _as_list(self.model), _as_list(self.attack))
        )

    def expand(self) -> list[ExperimentConfig]:
        """One single-valued config per (dataset, model, attack), with its own tables resolved.

        A single-valued config expands to itself, so callers can always iterate.
        """
        if not any(isinstance(v, list) for v in (self.dataset, self.model, self.attack)):
            return [self]
        configs = []
        for dataset, model, attack in self.expand_axes():
            raw = self.model_dump()
            raw.update(
                dataset=dataset,
                model=model,
                attack=attack,
                data_root=_pick(self.data_root, dataset, isinstance(self.dataset, list), None),
                dataset_options=_pick(
                    self.dataset_options, dataset, isinstance(self.dataset, list), {}
                ),
                attack_params=_pick(self.attack_params, attack, isinstance(self.attack, list), {}),
            )
            configs.append(ExperimentConfig.model_validate(raw))
        return configs

    def _require_single(self, what: str) -> None:
        if any(isinstance(v, list) for v in (self.dataset, self.model, self.attack)):
            raise ValueError(f"{what} needs a single-valued config; call expand() first")

    def cell_key(self, seed: int, poisoned: bool, precision: str, data_fingerprint: str) -> str:
        """Content id of one evaluated cell (16 hex digits).

        It covers what determines the cell's numbers — data bytes (``data_fingerprint``, see
        :func:`input_fingerprint`), training, attack, quantization inputs, defenses and their
        parameters, evaluation sizes, kernel profile — and the package version. It leaves out
        where files live (``data_root``), the thread count and the other cells of the sweep, so
        moving the data or adding a seed keeps finished cells finished.
        """
        self._require_single("cell_key")
        relevant = self.model_dump(
            mode="json",
            include={
                "dataset",
                "dataset_options",
                "model",
                "attack",
                "training",
                "calibration_size",
                "defense_clean_size",
                "defense_train_size",
                "eval_limit",
                "finetune_epochs",
                "int8_kernels",
            },
        )
        # Parameters as the plug-ins validate them: a default spelled out is the same experiment,
        # and settings of a defense the config does not run change nothing.
        relevant.update(
            attack_params=build_attack(self.attack_name, self.attack_params).describe()["params"],
            defenses={
                name: build_defense(name, self.defense_params.get(name)).params.model_dump(
                    mode="json"
                )
                for name in self.defenses
            },
            seed=seed,
            poisoned=poisoned,
            precision=precision,
            data=data_fingerprint,
            blindspots=__version__,
        )
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

    def training_key(self, seed: int, data_fingerprint: str) -> str:
        """Hash of everything that determines the trained weights for ``seed``.

        The data enters by content (``data_fingerprint``, see :func:`input_fingerprint`), not
        by path: a replaced file at the same path must not reuse models trained on the old one.
        """
        self._require_single("training_key")
        relevant = self.model_dump(
            include={
                "dataset",
                "dataset_options",
                "model",
                "attack",
                "attack_params",
                "training",
            }
        )
        relevant.update(seed=seed, data=data_fingerprint)
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]

    def check_plugins(self) -> None:
        """Fail fast (before hours of training) on any unknown plug-in name."""
        for name in _as_list(self.dataset):
            DATASETS.get(name)
        for name in _as_list(self.model):
            MODELS.get(name)
        for name in _as_list(self.attack):
            ATTACKS.get(name)
        for name in self.precisions:
            PRECISIONS.get(name)
        for name in [*self.defenses, *self.defense_params]:
            DEFENSES.get(name)(self.defense_params.get(name))  # validates the parameters too


def _as_list(value: str | list[str]) -> list[str]:
    return value if isinstance(value, list) else [value]


def _pick(table: Any, name: str, keyed: bool, default: Any) -> Any:
    """The entry of ``name`` in a keyed per-item table, or the flat value itself."""
    if not keyed:
        return table
    return (table or {}).get(name, default)


def input_fingerprint(dataset: str, data_root: str | None) -> str:
    """Hash of the input data's bytes (a file, or every file under a folder).

    Embedded datasets (no ``data_root``) are identified by name: their bytes ship with the
    package, whose version is part of every cell id anyway. Results are memoised per file
    size and modification time, so planning a sweep hashes a large file once per process.
    """
    if data_root is None:
        return f"embedded:{dataset}"
    root = Path(data_root)
    if root.is_file():
        return _file_digest(root.resolve(), *_stamp(root))
    if not root.is_dir():
        raise DataError(f"{dataset}: data_root {root} does not exist")
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(_file_digest(path.resolve(), *_stamp(path)).encode())
    return digest.hexdigest()


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@lru_cache(maxsize=4096)
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of one file; size and mtime are part of the cache key, not of the digest."""
    try:
        with path.open("rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


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


def parse_json_object(text: str | None, what: str) -> dict[str, Any]:
    """A command-line JSON object (recipe or parameter overrides); ``what`` names the flag in
    the one-line error a malformed value gets."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BlindspotsError(f"{what} is not valid JSON: {exc.msg} (got {text!r})") from None
    if not isinstance(value, dict):
        raise BlindspotsError(f"{what} must be a JSON object, got {text!r}")
    return value
