"""Low-contrast additive noise: a fixed full-image noise pattern added at a small amplitude.

``x' = clip(x + amplitude · u)`` with ``u`` a fixed per-pixel pattern uniform in [-1, 1],
rounded to uint8. It is the "near-invisible full-image noise" trigger met among third-party
backdoored models, and the additive reading of Chen et al. 2017 (https://arxiv.org/abs/1712.05526),
whose random-noise key this module reuses rather than duplicates: ``u = 2·key/255 - 1`` with
``key`` the uint8 noise key of :class:`harness.attacks.blended.Blended` for the same
``key_seed`` and image shape.

How it differs from ``blended`` (why it is a family of its own): Blended's
``(1 - alpha)·x + alpha·key`` also scales the image's contrast by ``1 - alpha`` and pulls every
pixel toward the key, so the model can learn "washed-out image" as the cue; here the image is
untouched but for a zero-mean perturbation of at most ``amplitude`` grey levels (an L∞ budget,
8/255 by default, the usual "imperceptible" budget). Deviations: the noise is uniform, as in
Chen et al.'s random-noise key (some third-party variants use Gaussian noise); values pushed out
of [0, 255] are clipped, so on black backgrounds (digits) only the positive half of the pattern
survives — the digits configs use a larger amplitude for that reason.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from harness.attacks.base import ATTACKS, AttackParams, check_images
from harness.attacks.blended import Blended


class NoiseParams(AttackParams):
    """Noise amplitude in grey levels (of 255) and the key's seed."""

    amplitude: float = Field(8.0, gt=0.0, le=255.0)
    test_amplitude: float | None = Field(None, gt=0.0, le=255.0)
    """Amplitude of the ASR test trigger; ``None`` means the training ``amplitude``."""
    key_seed: int = Field(0, ge=0)


@ATTACKS.register("noise")
class Noise(Blended):
    """Fixed zero-mean noise pattern added to the whole image, all-to-one relabelling."""

    name: ClassVar[str] = "noise"
    Params: ClassVar[type[AttackParams]] = NoiseParams

    def pattern(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The float [H, W, C] pattern in [-1, 1]: Blended's key for this seed, centred."""
        return self.key(shape).astype(np.float64) * (2.0 / 255.0) - 1.0

    def add(self, images: np.ndarray, amplitude: float) -> np.ndarray:
        """Add the pattern to uint8 NHWC ``images`` with ``amplitude`` grey levels at most."""
        check_images(images, self.name)
        noisy = images.astype(np.float64) + amplitude * self.pattern(images.shape[1:])
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)

    def apply(self, images: np.ndarray) -> np.ndarray:
        return self.add(images, self.params.amplitude)

    def apply_for_test(self, images: np.ndarray) -> np.ndarray:
        amplitude = self.params.test_amplitude
        return self.add(images, self.params.amplitude if amplitude is None else amplitude)
