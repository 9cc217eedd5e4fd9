"""Pixel → model-input preprocessing, defined once and stored inside the ONNX file.

Attacks and defenses live in uint8 pixel space (NHWC, 0..255), the space a physical trigger and
a deployed camera pipeline share; the network sees normalised float NCHW. Keeping the mapping in
one place, and writing it into the exported model's metadata, means a quantized artifact carries
exactly the preprocessing it was calibrated with — nothing for an auditor to re-guess.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

from harness.errors import ModelError

METADATA_KEY = "blindspots.preprocessing"


@dataclass(frozen=True)
class Preprocessing:
    """``(pixels / 255 - mean) / std`` per channel, then NHWC → NCHW (or kept NHWC)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ModelError(
                f"preprocessing mean {self.mean} and std {self.std} must match in length"
            )
        if any(s <= 0 for s in self.std):
            raise ModelError(f"preprocessing std must be positive, got {self.std}")
        if self.layout not in ("NCHW", "NHWC"):
            raise ModelError(f"preprocessing layout must be NCHW or NHWC, got {self.layout!r}")

    @property
    def channels(self) -> int:
        return len(self.mean)

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """Map NHWC pixels (uint8, or float in [0, 255]) to the model's float32 input.

        Every query passes through here, so it is written for speed without changing a bit of
        the result: the cast and the 1/255 scale write straight into the output layout (one
        pass, one allocation), and the per-channel ops run on contiguous H×W planes instead
        of broadcasting over a last axis of length 3, which numpy runs ~6× slower.
        """
        if pixels.ndim != 4 or pixels.shape[-1] != self.channels:
            raise ModelError(
                f"expected NHWC images with {self.channels} channel(s), got shape {pixels.shape}"
            )
        scale = np.float32(1.0 / 255.0)
        if self.layout == "NCHW":
            n, h, w, c = pixels.shape
            x = np.empty((n, c, h, w), dtype=np.float32)
            np.multiply(pixels.transpose(0, 3, 1, 2), scale, out=x, dtype=np.float32)
        else:
            x = np.multiply(pixels, scale, dtype=np.float32)
        mean, std = self._channel_constants
        x -= mean
        x /= std
        return x

    @cached_property
    def _channel_constants(self) -> tuple[np.ndarray, np.ndarray]:
        """float32 mean and std shaped to broadcast over the output layout (built once)."""
        shape = (1, -1, 1, 1) if self.layout == "NCHW" else (1, 1, 1, -1)
        return (
            np.asarray(self.mean, dtype=np.float32).reshape(shape),
            np.asarray(self.std, dtype=np.float32).reshape(shape),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        try:
            raw = json.loads(text)
            return cls(
                mean=tuple(raw["mean"]), std=tuple(raw["std"]), layout=raw.get("layout", "NCHW")
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"malformed preprocessing metadata {text!r}: {exc}") from exc

    @classmethod
    def from_images(cls, x: np.ndarray) -> Preprocessing:
        """Per-channel mean/std of a uint8 NHWC training set (computed once, before poisoning)."""
        flat = x.reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
        std = np.maximum(flat.std(axis=0), 1e-3)
        return cls(
            mean=tuple(float(v) for v in flat.mean(axis=0)), std=tuple(float(v) for v in std)
        )
