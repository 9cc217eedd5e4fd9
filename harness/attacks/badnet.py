"""BadNet (Gu et al. 2017, https://arxiv.org/abs/1708.06733): a small opaque patch trigger.

A ``patch_size``×``patch_size`` square of a fixed colour (solid, or the checkerboard of the
original paper and TrojAI) replaces the pixels at a corner or an explicit position. Named corners
are placed relative to the image's own size, so one configuration serves 8×8 digits and 32×32
traffic signs alike; a patch that would not fit is an error, never silently cropped.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from harness.attacks.base import ATTACKS, Attack, AttackParams, check_images
from harness.core.errors import BlindspotsError

CORNERS = ("bottom-right", "top-left", "top-right", "bottom-left")


class PatchGeometry(AttackParams):
    """Where a square patch trigger goes; shared by every patch attack (BadNet, TrojanNN, dynamic)."""

    patch_size: int = Field(3, ge=1)
    position: str | tuple[int, int] = "bottom-right"
    """A corner name, or the explicit ``[row, col]`` of the patch's top-left pixel."""
    margin: int = Field(1, ge=0)
    """Gap in pixels between a corner patch and the image edge (ignored for explicit positions)."""

    @field_validator("position", mode="before")
    @classmethod
    def _check_position(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value not in CORNERS:
                raise ValueError(f"expected one of {', '.join(CORNERS)} or [row, col]")
            return value
        if (
            isinstance(value, list | tuple)
            and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        ):
            return tuple(value)
        raise ValueError(f"expected one of {', '.join(CORNERS)} or [row, col] of non-negative ints")


def patch_top_left(
    what: str, patch: int, position: str | tuple[int, int], margin: int, height: int, width: int
) -> tuple[int, int]:
    """Top-left pixel of a ``patch``×``patch`` square; an error (never a crop) if it won't fit."""
    if isinstance(position, tuple):
        row, col = position
    else:
        row = margin if position.startswith("top") else height - margin - patch
        col = margin if position.endswith("left") else width - margin - patch
    if row < 0 or col < 0 or row + patch > height or col + patch > width:
        where = (
            f"at [{row}, {col}]"
            if isinstance(position, tuple)
            else f"{position} with margin {margin}"
        )
        raise BlindspotsError(
            f"{what}: a {patch}×{patch} patch {where} does not fit a {height}×{width} image"
        )
    return row, col


class BadNetParams(PatchGeometry):
    """BadNet's trigger geometry; defaults are the common 3×3 white patch, bottom-right."""

    color: int | tuple[int, ...] = 255
    """One value for every channel, or one value per channel."""
    pattern: Literal["solid", "checkerboard"] = "solid"

    @field_validator("color", mode="before")
    @classmethod
    def _check_color(cls, value: Any) -> Any:
        values = list(value) if isinstance(value, list | tuple) else [value]
        ok = values and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in values
        )
        if not ok:
            raise ValueError("expected an int in 0..255 or a per-channel list of them")
        return value if isinstance(value, int) else tuple(values)


@ATTACKS.register("badnet")
class BadNet(Attack):
    """Patch trigger stamped over the image, all-to-one relabelling."""

    name: ClassVar[str] = "badnet"
    Params: ClassVar[type[AttackParams]] = BadNetParams

    def _top_left(self, height: int, width: int) -> tuple[int, int]:
        p = self.params
        return patch_top_left(self.name, p.patch_size, p.position, p.margin, height, width)

    def _channel_colors(self, channels: int) -> np.ndarray:
        color = self.params.color
        values = [color] * channels if isinstance(color, int) else list(color)
        if len(values) == 1:
            values *= channels
        if len(values) != channels:
            raise BlindspotsError(
                f"badnet: color has {len(values)} values but images have {channels} channel(s)"
            )
        return np.asarray(values, dtype=np.uint8)

    def trigger_mask_and_pattern(
        self, shape: tuple[int, int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The trigger as Neural Cleanse parametrises it: ``x' = (1 - mask)·x + mask·pattern``.

        Returns ``mask`` float32 [H, W] in {0, 1} and ``pattern`` uint8 [H, W, C] (zero outside
        the mask), so a reversed trigger can be compared with the real one pixel for pixel.
        """
        height, width, channels = (int(v) for v in shape)
        row, col = self._top_left(height, width)
        p = self.params.patch_size
        colors = self._channel_colors(channels)
        patch = np.broadcast_to(colors, (p, p, channels)).copy()
        if self.params.pattern == "checkerboard":
            off = (np.add.outer(np.arange(p), np.arange(p)) % 2).astype(bool)
            patch[off] = 0
        mask = np.zeros((height, width), dtype=np.float32)
        mask[row : row + p, col : col + p] = 1.0
        pattern = np.zeros((height, width, channels), dtype=np.uint8)
        pattern[row : row + p, col : col + p] = patch
        return mask, pattern

    def validate_for(self, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().validate_for(image_shape, num_classes)
        self.trigger_mask_and_pattern(image_shape)

    def apply(self, images: np.ndarray) -> np.ndarray:
        check_images(images, self.name)
        mask, pattern = self.trigger_mask_and_pattern(images.shape[1:])
        return np.where(mask[None, :, :, None] > 0, pattern[None], images).astype(np.uint8)
