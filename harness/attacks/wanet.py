"""WaNet (Nguyen & Tran, ICLR 2021, https://arxiv.org/abs/2102.10369): a smooth warp as trigger.

The trigger moves pixels instead of painting them. A ``k``×``k`` grid of random 2-D offsets
(uniform in [-1, 1], scaled to mean magnitude 1) is upsampled bicubically to the image size and
added, times ``s / H``, to the identity sampling grid in [-1, 1] coordinates; the image is
resampled bilinearly on that grid (``grid_sample`` with ``align_corners=True``) and rounded back
to uint8. The field is a pure function of ``key_seed`` and the image shape: the same warp for
training, testing and any re-run.

**Noise mode** (the paper's cross samples): besides the ``round(poison_rate·N)`` warped and
relabelled images, ``round(cross_ratio · that)`` other training images are warped with the
trigger field *plus* per-pixel random offsets (uniform in [-1, 1] / H) and keep their true label,
so the model has to learn that exactly this warp — not any warp — means the target.

Defaults are the authors' (``k=4``, ``s=0.5``, ``grid_rescale=1``, ``cross_ratio=2``; their
poisoning rate 0.1 is the project's default anyway). Deviations from the paper and its code:

* **Static poisoning.** The authors re-draw which images of each *batch* are warped and the
  cross samples' random offsets every step; here one set is drawn once from the poisoning rng
  (like every registered attack, so data-inspection defenses see a fixed poisoned set). The
  ratio of backdoor : cross : clean samples is the paper's.
* **uint8 images.** The authors warp normalised float tensors; here the warped image is rounded
  to uint8 (the trigger must live in the pixels a camera hands over). Sub-level displacements
  that round away are lost, so on low-resolution data (8×8 digits) a larger ``s`` is needed
  for the backdoor to be learnt; the configs say which.
* **Cross samples are not in ``poison_mask``** (their labels are true); only relabelled images
  are. ``PoisonedSet.cross_mask`` marks them.
* **No generator-side augmentation**: the paper also trains with random crop and rotation; here
  the training loop's own ``augment`` option applies to all images alike.
* The bicubic upsampling is our own Keys (a = -0.75) cubic convolution with edge clamping,
  which is what ``F.interpolate(mode="bicubic", align_corners=True)`` computes.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import ClassVar

import numpy as np
from pydantic import Field

from harness.attacks.base import ATTACKS, Attack, AttackParams, PoisonedSet, check_images
from harness.core.errors import BlindspotsError, DataError


class WaNetParams(AttackParams):
    """Warp strength and smoothness (authors' defaults) and the noise-mode ratio."""

    k: int = Field(4, ge=2)
    """Control grid size: the warp field is a k×k grid of random offsets, upsampled."""
    s: float = Field(0.5, gt=0.0, le=64.0)
    """Warp strength: offsets are ``s · field / H`` in [-1, 1] grid coordinates."""
    grid_rescale: float = Field(1.0, gt=0.0, le=16.0)
    cross_ratio: float = Field(2.0, ge=0.0, le=16.0)
    """Noise-mode samples per backdoor sample (random warps that keep their true label)."""
    key_seed: int = Field(0, ge=0)
    """Seed of the warp field alone (never the poisoning rng)."""


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel (the one PyTorch's bicubic interpolation uses)."""
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def _bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of align-corners bicubic upsampling with clamped borders."""
    out = np.zeros((size_out, size_in))
    scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    for i in range(size_out):
        src = i * scale
        base = math.floor(src)
        for tap in range(base - 1, base + 3):
            out[i, min(max(tap, 0), size_in - 1)] += _cubic(np.asarray(src - tap))
    return out


def bilinear_sample(images: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """``grid_sample(align_corners=True)`` for float NHWC images on a grid inside [-1, 1].

    ``grid`` is [N or 1, H, W, 2] with (x, y) last, as PyTorch orders it.
    """
    n, height, width, _ = images.shape
    px = (grid[..., 0] + 1.0) * (width - 1) / 2.0
    py = (grid[..., 1] + 1.0) * (height - 1) / 2.0
    x0 = np.clip(np.floor(px).astype(np.int64), 0, width - 1)
    y0 = np.clip(np.floor(py).astype(np.int64), 0, height - 1)
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    shape = (n, height, width)
    x0, x1, y0, y1 = (np.broadcast_to(v, shape) for v in (x0, x1, y0, y1))
    wx = np.broadcast_to((px - x0)[..., None], (*shape, 1))
    wy = np.broadcast_to((py - y0)[..., None], (*shape, 1))
    rows = np.arange(n)[:, None, None]
    top = images[rows, y0, x0] * (1 - wx) + images[rows, y0, x1] * wx
    bottom = images[rows, y1, x0] * (1 - wx) + images[rows, y1, x1] * wx
    return top * (1 - wy) + bottom * wy


@ATTACKS.register("wanet")
class WaNet(Attack):
    """Fixed smooth warping field, all-to-one relabelling, with noise-mode cross samples."""

    name: ClassVar[str] = "wanet"
    Params: ClassVar[type[AttackParams]] = WaNetParams

    def validate_for(self, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().validate_for(image_shape, num_classes)
        height, width = int(image_shape[0]), int(image_shape[1])
        if self.params.k > min(height, width):
            raise BlindspotsError(
                f"wanet: control grid k={self.params.k} is finer than a {height}×{width} image"
            )

    def grid(self, height: int, width: int) -> np.ndarray:
        """The trigger's sampling grid [1, H, W, 2] in [-1, 1]; a function of key_seed and size."""
        p = self.params
        if p.k > min(height, width):
            self.validate_for((height, width, 1), p.target_label + 1)
        rng = np.random.default_rng(p.key_seed)
        offsets = rng.uniform(-1.0, 1.0, size=(2, p.k, p.k))
        offsets = offsets / np.mean(np.abs(offsets))
        rows, cols = _bicubic_matrix(p.k, height), _bicubic_matrix(p.k, width)
        field = np.stack([rows @ offsets[c] @ cols.T for c in range(2)], axis=-1)
        ys, xs = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
        identity = np.stack([xs, ys], axis=-1)
        warped = identity + p.s * field / height * p.grid_rescale
        return np.clip(warped, -1.0, 1.0)[None]

    def warp(self, images: np.ndarray, grid: np.ndarray) -> np.ndarray:
        check_images(images, self.name)
        out = bilinear_sample(images.astype(np.float64), grid)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def apply(self, images: np.ndarray) -> np.ndarray:
        check_images(images, self.name)
        return self.warp(images, self.grid(images.shape[1], images.shape[2]))

    def cross_warp(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Noise mode: the trigger grid plus per-image random offsets in [-1, 1] / H."""
        check_images(images, self.name)
        n, height, width = images.shape[:3]
        noise = rng.uniform(-1.0, 1.0, size=(n, height, width, 2)) / height
        grid = np.clip(self.grid(height, width) + noise, -1.0, 1.0)
        return self.warp(images, grid)

    def poison(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> PoisonedSet:
        """Warp and relabel as every attack does, then add the noise-mode cross samples."""
        poisoned = super().poison(x, y, rng)
        cross = math.floor(self.params.cross_ratio * len(poisoned.poison_indices) + 0.5)
        free = np.flatnonzero(~poisoned.poison_mask)
        if cross > len(free):
            raise DataError(
                f"wanet: cross_ratio {self.params.cross_ratio} needs {cross} cross samples, "
                f"only {len(free)} unpoisoned images exist"
            )
        cross_mask = np.zeros(len(x), dtype=bool)
        if cross:
            chosen = np.sort(rng.choice(free, size=cross, replace=False))
            poisoned.x[chosen] = self.cross_warp(x[chosen], rng)
            cross_mask[chosen] = True
        return replace(poisoned, cross_mask=cross_mask)
