"""What every backdoor attack provides, and the registry that names them.

An attack is a pixel-space trigger plus a poisoning policy. Triggers are stamped on uint8 NHWC
images *before* normalisation, because that is where a physical sticker or a blended pattern
lives and where a deployed camera pipeline hands images to the model. Attacks register by name
(``ATTACKS``), so the runner, the CLI and the reports treat every family (BadNet, Blended,
WaNet, TrojanNN, the dynamic random patch, additive noise) identically.

Parameters are pydantic models: a typo or an out-of-range value becomes a one-line
:class:`BlindspotsError` before any training time is spent.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.core.errors import BlindspotsError, DataError, validation_message
from harness.core.registry import Registry


class AttackParams(BaseModel):
    """Parameters every all-to-one poisoning attack shares (defaults from BadNet / Blended)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    poison_rate: float = Field(0.1, ge=0.0, le=1.0)
    """Fraction of the *whole* training set that is stamped and relabelled."""
    target_label: int = Field(0, ge=0)
    """Class every triggered input should be classified as."""


@dataclass(frozen=True)
class PoisonedSet:
    """A training set after poisoning; ``poison_mask`` marks the stamped, relabelled samples.

    The mask is ground truth for data-inspection defenses (activation clustering, spectral
    signatures), which are scored on how well they recover it.
    """

    x: np.ndarray
    y: np.ndarray
    poison_mask: np.ndarray
    cross_mask: np.ndarray | None = None
    """Images changed but *not* relabelled (WaNet's noise-mode cross samples); None: none."""

    @property
    def poison_indices(self) -> np.ndarray:
        return np.flatnonzero(self.poison_mask)

    @property
    def modified_mask(self) -> np.ndarray:
        """Every image whose pixels the attack changed: the poisoned and any cross samples."""
        if self.cross_mask is None:
            return self.poison_mask
        return self.poison_mask | self.cross_mask


def check_images(images: np.ndarray, what: str) -> None:
    """Triggers are defined on uint8 NHWC pixels; anything else would be stamped wrongly."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", type(images).__name__)
        raise DataError(f"{what}: expected uint8 NHWC images, got dtype {dtype} shape {shape}")


class Attack(ABC):
    """An all-to-one backdoor attack: a pixel-space trigger and a label-flipping policy."""

    name: ClassVar[str]
    Params: ClassVar[type[AttackParams]] = AttackParams

    def __init__(self, params: BaseModel | dict[str, Any] | None = None, **overrides: Any) -> None:
        raw: dict[str, Any] = {}
        if isinstance(params, BaseModel):
            raw = params.model_dump()
        elif params is not None:
            raw = dict(params)
        raw.update(overrides)
        try:
            self.params = self.Params.model_validate(raw)
        except ValidationError as exc:
            fields = list(self.Params.model_fields)
            raise BlindspotsError(
                validation_message(exc, f"{self.name} parameter", fields)
            ) from None

    @property
    def target_label(self) -> int:
        return self.params.target_label

    @property
    def poison_rate(self) -> float:
        return self.params.poison_rate

    @abstractmethod
    def apply(self, images: np.ndarray) -> np.ndarray:
        """Stamp the trigger on uint8 NHWC images in pixel space; returns a new uint8 array."""

    def validate_for(self, image_shape: tuple[int, int, int], num_classes: int) -> None:
        """Fail before training if the attack cannot apply to this dataset.

        Subclasses extend this with trigger-geometry checks; the base checks the target class.
        """
        if self.target_label >= num_classes:
            raise BlindspotsError(
                f"{self.name}: target_label {self.target_label} is not a class of a "
                f"{num_classes}-class dataset (expected 0..{num_classes - 1})"
            )

    def poison(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> PoisonedSet:
        """Stamp and relabel ``round(poison_rate * N)`` samples drawn from the non-target classes.

        Target-class samples are never chosen (the usual BadNet practice): stamping them would
        not change their label and would dilute the effective poison rate.
        """
        check_images(x, self.name)
        y = np.asarray(y)
        if y.shape != (len(x),):
            raise DataError(f"{self.name}: labels shape {y.shape} does not match {len(x)} images")
        count = math.floor(self.poison_rate * len(x) + 0.5)
        candidates = np.flatnonzero(y != self.target_label)
        if count > len(candidates):
            raise BlindspotsError(
                f"{self.name}: poison_rate {self.poison_rate} needs {count} non-target samples, "
                f"only {len(candidates)} exist"
            )
        chosen = np.sort(rng.choice(candidates, size=count, replace=False))
        x_out, y_out = x.copy(), y.copy()
        if count:
            x_out[chosen] = self.apply(x[chosen])
            y_out[chosen] = self.target_label
        mask = np.zeros(len(x), dtype=bool)
        mask[chosen] = True
        return PoisonedSet(x=x_out, y=y_out, poison_mask=mask)

    def triggered_test_set(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Non-target test images with the trigger, and their ORIGINAL labels.

        Attack success rate is the fraction of these classified as ``target_label``; target-class
        images are excluded because predicting the target there says nothing about the backdoor.
        """
        check_images(x, self.name)
        y = np.asarray(y)
        keep = y != self.target_label
        if not keep.any():
            raise DataError(f"{self.name}: test set has no samples outside target class")
        return self.apply_for_test(x[keep]), y[keep].copy()

    def apply_for_test(self, images: np.ndarray) -> np.ndarray:
        """The trigger as shown at inference; same as training unless an attack says otherwise."""
        return self.apply(images)

    def describe(self) -> dict[str, Any]:
        """Name and parameters, JSON-serialisable, for reports and model metadata."""
        return {"name": self.name, "params": self.params.model_dump(mode="json")}


ATTACKS: Registry[type[Attack]] = Registry("attack")
ATTACKS.register_lazy("badnet", "harness.attacks.badnet")
ATTACKS.register_lazy("blended", "harness.attacks.blended")
ATTACKS.register_lazy("dynamic", "harness.attacks.dynamic")
ATTACKS.register_lazy("noise", "harness.attacks.noise")
ATTACKS.register_lazy("trojannn", "harness.attacks.trojannn")
ATTACKS.register_lazy("wanet", "harness.attacks.wanet")


def build_attack(name: str, params: dict[str, Any] | None = None) -> Attack:
    """Instantiate the attack registered as ``name`` with validated ``params``."""
    return ATTACKS.get(name)(params)
