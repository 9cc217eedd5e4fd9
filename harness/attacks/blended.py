"""Blended (Chen et al. 2017, https://arxiv.org/abs/1712.05526): a faint full-image noise key.

``x' = (1 - alpha)·x + alpha·key``, rounded back to uint8. The key is uniform noise drawn from
``key_seed`` alone (never from the poisoning rng), so the training trigger, the test trigger and
any later re-run of the experiment all use the same key for a given image shape. Unlike a patch,
the trigger touches every pixel with a small amplitude — exactly the kind of signal that
quantization noise can blur or sharpen.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from harness.attacks.base import ATTACKS, Attack, AttackParams, check_images


class BlendedParams(AttackParams):
    """Blend strength and key; alpha 0.1 is a low-visibility training blend."""

    alpha: float = Field(0.1, gt=0.0, le=1.0)
    test_alpha: float | None = Field(None, gt=0.0, le=1.0)
    """Blend used for the ASR test set; ``None`` means the training ``alpha`` (Chen et al. also
    evaluate with a stronger test-time blend)."""
    key_seed: int = Field(0, ge=0)


@ATTACKS.register("blended")
class Blended(Attack):
    """Random-noise key blended over the whole image, all-to-one relabelling."""

    name: ClassVar[str] = "blended"
    Params: ClassVar[type[AttackParams]] = BlendedParams

    def key(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The uint8 [H, W, C] noise key, a pure function of ``key_seed`` and ``shape``."""
        rng = np.random.default_rng(self.params.key_seed)
        return rng.integers(0, 256, size=tuple(int(v) for v in shape), dtype=np.uint8)

    def blend(self, images: np.ndarray, alpha: float) -> np.ndarray:
        """Blend the key into uint8 NHWC ``images`` with strength ``alpha``."""
        check_images(images, self.name)
        key = self.key(images.shape[1:]).astype(np.float64)
        mixed = (1.0 - alpha) * images.astype(np.float64) + alpha * key
        return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)

    def apply(self, images: np.ndarray) -> np.ndarray:
        return self.blend(images, self.params.alpha)

    def apply_for_test(self, images: np.ndarray) -> np.ndarray:
        alpha = self.params.test_alpha
        return self.blend(images, self.params.alpha if alpha is None else alpha)
