"""Pixel → model-input preprocessing, defined once and stored inside the ONNX file.

Attacks and defenses live in uint8 pixel space (NHWC, 0..255), the space a physical trigger and
a deployed camera pipeline share; the network sees normalised float NCHW. Keeping the mapping in
one place, and writing it into the exported model's metadata, means a quantized artifact carries
exactly the preprocessing it was calibrated with — nothing for an auditor to re-guess.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import SupportsFloat

import numpy as np

from harness.core.errors import ModelError

METADATA_KEY = "blindspots.preprocessing"
#: The harness's own exports map 0..255 pixels to 0..1 before normalising.
DEFAULT_SCALE = 1.0 / 255.0
LAYOUTS = ("NCHW", "NHWC")
CHANNEL_ORDERS = ("RGB", "BGR")


@dataclass(frozen=True)
class Preprocessing:
    """``(pixels * scale - mean) / std`` per channel, then NHWC → NCHW (or kept NHWC).

    Foreign models differ in exactly these knobs: ``scale`` is 1/255 for models trained on 0..1
    inputs and 1.0 for ones that take raw 0..255 floats; ``channel_order`` "BGR" (Caffe/OpenCV
    lineage) reverses the harness's RGB pixels before anything else, so ``mean`` and ``std`` are
    always given in the *model's* channel order, as vendors publish them.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str = "NCHW"
    scale: float = DEFAULT_SCALE
    channel_order: str = "RGB"

    def __post_init__(self) -> None:
        # Coerce once so equality, hashing and JSON never depend on list-vs-tuple or int inputs.
        object.__setattr__(self, "mean", _floats("mean", self.mean))
        object.__setattr__(self, "std", _floats("std", self.std))
        object.__setattr__(self, "scale", _float("scale", self.scale))
        if len(self.mean) != len(self.std) or not self.mean:
            raise ModelError(
                f"preprocessing mean {self.mean} and std {self.std} must match in length"
            )
        # A NaN or zero std turns every input into NaN/inf: the model then "predicts" one class
        # for everything, which an audit would read as a perfect backdoor instead of a bad file.
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ModelError(f"preprocessing std must be finite and positive, got {self.std}")
        if not all(math.isfinite(m) for m in self.mean):
            raise ModelError(f"preprocessing mean must be finite, got {self.mean}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ModelError(f"preprocessing scale must be finite and positive, got {self.scale}")
        if self.layout not in LAYOUTS:
            raise ModelError(f"preprocessing layout must be NCHW or NHWC, got {self.layout!r}")
        if self.channel_order not in CHANNEL_ORDERS:
            raise ModelError(
                f"preprocessing channel order must be RGB or BGR, got {self.channel_order!r}"
            )
        if self.channel_order == "BGR" and self.channels != 3:
            raise ModelError(
                f"channel order BGR needs 3 channels, the preprocessing has {self.channels}"
            )

    @property
    def channels(self) -> int:
        return len(self.mean)

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """Map NHWC RGB pixels (uint8, or float in [0, 255]) to the model's float32 input.

        Every query passes through here, so it is written for speed without changing a bit of
        the result: the cast and the scale write straight into the output layout (one pass, one
        allocation; a BGR swap is a free reversed view read by that same pass), and the
        per-channel ops run on contiguous H×W planes instead of broadcasting over a last axis of
        length 3, which numpy runs ~6× slower.
        """
        if pixels.ndim != 4 or pixels.shape[-1] != self.channels:
            raise ModelError(
                f"expected NHWC images with {self.channels} channel(s), got shape {pixels.shape}"
            )
        if self.channel_order == "BGR":
            pixels = pixels[..., ::-1]
        scale = np.float32(self.scale)
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
        """Parse stored metadata; keys added later (scale, channel_order) default to what the
        versions that did not write them meant, so older exports keep loading unchanged."""
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ModelError(
                f"malformed preprocessing metadata (not JSON: {exc}): {text[:80]!r}"
            ) from None
        if not isinstance(raw, dict):
            # Python's own message here ("list indices must be integers") names no field
            raise ModelError(
                "preprocessing metadata must be a JSON object with 'mean' and 'std', "
                f"got a JSON {type(raw).__name__}: {text[:80]!r}"
            )
        missing = [key for key in ("mean", "std") if key not in raw]
        if missing:
            raise ModelError(f"preprocessing metadata lacks {', '.join(missing)}: {text[:80]!r}")
        for key in ("mean", "std"):
            if not isinstance(raw[key], list):
                raise ModelError(
                    f"preprocessing metadata '{key}' must be a list of numbers, got {raw[key]!r}"
                )
        try:
            return cls(
                mean=tuple(raw["mean"]),
                std=tuple(raw["std"]),
                layout=raw.get("layout", "NCHW"),
                scale=raw.get("scale", DEFAULT_SCALE),
                channel_order=raw.get("channel_order", "RGB"),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"malformed preprocessing metadata {text!r}: {exc}") from exc
        except ModelError as exc:
            raise ModelError(f"invalid preprocessing metadata {text!r}: {exc}") from exc

    @classmethod
    def from_images(cls, x: np.ndarray) -> Preprocessing:
        """Per-channel mean/std of a uint8 NHWC training set (computed once, before poisoning)."""
        flat = x.reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
        std = np.maximum(flat.std(axis=0), 1e-3)
        return cls(
            mean=tuple(float(v) for v in flat.mean(axis=0)), std=tuple(float(v) for v in std)
        )


def _floats(name: str, values: object) -> tuple[float, ...]:
    """``values`` as a tuple of Python floats, or a one-line error naming the field."""
    # tuple("0.5") would silently give three numbers
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise ModelError(f"preprocessing {name} must be a list of numbers, got {values!r}")
    try:
        return tuple(_float(name, v) for v in values)
    except TypeError as exc:
        raise ModelError(f"preprocessing {name} must be a list of numbers, got {values!r}") from exc


def _float(name: str, value: object) -> float:
    """``value`` as a Python float (numpy scalars and ints included), never a string."""
    if isinstance(value, str | bytes) or not isinstance(value, SupportsFloat):
        raise ModelError(f"preprocessing {name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"preprocessing {name} must be a number, got {value!r}") from exc
