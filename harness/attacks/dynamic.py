"""Dynamic backdoor, "Random Backdoor" variant (Salem et al., EuroS&P 2022,
https://arxiv.org/abs/2003.03675): a new random patch pattern at a random place in every image.

Each poisoned image gets its own ``patch_size``×``patch_size`` trigger whose pixels are drawn
uniformly from 0..255 (the paper samples each trigger value from U(0, 1)), pasted at a position
drawn from the location set; all are relabelled to the target. At test time *fresh* patterns
(another random stream, never seen in training) are pasted at random places, so the attack
success rate measures what the paper claims: the model learned "a random-noise patch anywhere
in the set means the target", not one pattern. No trigger is fixed, which is what Neural
Cleanse's single reversed patch cannot represent.

This is the generator-free technique of Salem et al.; their Backdoor Generating Network (BaN,
c-BaN) and the input-aware generator of Nguyen & Tran (NeurIPS 2020) are **not** implemented —
both train a generator network jointly with the classifier, which this project's data → train
pipeline does not do.

Determinism: the patterns and places for a batch are a pure function of ``key_seed``, the
stream (training or test) and the batch size, never of the poisoning rng, so ``apply`` on the
same images returns the same pixels. Deviations and our choices: ``patch_size`` 5 and
``locations = "anywhere"`` (every position where the patch fits; the paper's location set κ
may be a smaller region, ``"corners"`` gives the four corner positions); the paper's
trigger size for each dataset was not checked against its text, so 5 (a 2.4% patch on 32×32)
is ours.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from harness.attacks.badnet import CORNERS, patch_top_left
from harness.attacks.base import ATTACKS, Attack, AttackParams, check_images
from harness.core.errors import BlindspotsError

TRAIN_STREAM, TEST_STREAM = 0, 1


class DynamicParams(AttackParams):
    """Random-pattern trigger size and its location set."""

    patch_size: int = Field(5, ge=1)
    locations: Literal["anywhere", "corners"] = "anywhere"
    margin: int = Field(1, ge=0)
    """Gap between a corner patch and the image edge (``locations = "corners"`` only)."""
    key_seed: int = Field(0, ge=0)


@ATTACKS.register("dynamic")
class Dynamic(Attack):
    """Per-image random patch pattern at a random location, all-to-one relabelling."""

    name: ClassVar[str] = "dynamic"
    Params: ClassVar[type[AttackParams]] = DynamicParams

    def places(self, height: int, width: int) -> list[tuple[int, int]]:
        """Every top-left pixel in the location set (an error if the patch cannot fit)."""
        p = self.params
        if p.locations == "corners":
            return [
                patch_top_left(self.name, p.patch_size, c, p.margin, height, width) for c in CORNERS
            ]
        if p.patch_size > min(height, width):
            raise BlindspotsError(
                f"dynamic: a {p.patch_size}×{p.patch_size} patch does not fit a "
                f"{height}×{width} image"
            )
        rows, cols = height - p.patch_size + 1, width - p.patch_size + 1
        return [(r, c) for r in range(rows) for c in range(cols)]

    def validate_for(self, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().validate_for(image_shape, num_classes)
        self.places(int(image_shape[0]), int(image_shape[1]))

    def stamp(self, images: np.ndarray, stream: int) -> np.ndarray:
        """Paste one fresh uniform-noise patch per image at a place drawn from the set."""
        check_images(images, self.name)
        n, height, width, channels = images.shape
        places = self.places(height, width)
        size = self.params.patch_size
        rng = np.random.default_rng([self.params.key_seed, stream, n])
        patterns = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
        picks = rng.integers(0, len(places), size=n)
        out = images.copy()
        for i in range(n):
            row, col = places[int(picks[i])]
            out[i, row : row + size, col : col + size] = patterns[i]
        return out

    def apply(self, images: np.ndarray) -> np.ndarray:
        return self.stamp(images, TRAIN_STREAM)

    def apply_for_test(self, images: np.ndarray) -> np.ndarray:
        return self.stamp(images, TEST_STREAM)
