"""Shared helpers for the dataset loaders: option checks, path checks and image decoding.

Every loader turns whatever can go wrong on disk (a missing folder, a corrupt image, an odd
option) into a one-line :class:`DataError` naming the path, so the CLI can print it instead of a
PIL or numpy traceback. Image decoding and resizing live here once so that GTSRB, image folders
and resized in-memory datasets all go through the same PIL bilinear filter.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from harness.core.errors import DataError, one_line

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".ppm", ".bmp"})
"""File endings the image-folder loaders read (compared lower-case)."""

_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
"""What PIL raises for unreadable, truncated or absurdly large images."""


def reject_unknown_options(name: str, options: Mapping[str, object]) -> None:
    """Fail on options a loader does not understand, rather than silently ignoring a typo."""
    if options:
        unknown = ", ".join(sorted(options))
        raise DataError(f"{name}: unknown option(s) {unknown} (accepted: image_size)")


def check_image_size(name: str, image_size: object) -> int | None:
    """Validate the ``image_size`` option: ``None`` (keep native size) or a positive int."""
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"{name}: image_size must be a positive integer, got {image_size!r}")
    return image_size


def require_root(name: str, data_root: Path | None, expected: str) -> Path:
    """Return ``data_root`` if it exists; otherwise explain which layout the loader wanted."""
    if data_root is None:
        raise DataError(f"{name}: needs a data root (expected {expected})")
    path = Path(data_root).expanduser()
    if not path.exists():
        raise DataError(f"{name}: {path} does not exist (expected {expected})")
    return path


def read_image(name: str, path: Path, image_size: int) -> np.ndarray:
    """Decode one image file to uint8 RGB ``(image_size, image_size, 3)``.

    The full frame is resized with PIL's bilinear filter (which anti-aliases when shrinking),
    the preprocessing most backdoor papers apply to GTSRB-style data.
    """
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            if rgb.size != (image_size, image_size):
                rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except _PIL_ERRORS as exc:
        raise DataError(f"{name}: cannot read image {path}: {one_line(exc)}") from exc


def read_images(name: str, paths: Sequence[Path], image_size: int) -> np.ndarray:
    """Decode many image files into one uint8 NHWC RGB array, in the order given.

    A thread pool overlaps file I/O with decoding (PIL releases the GIL while it decodes and
    resizes), which matters for GTSRB's ~50k small files.
    """
    out = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, pixels in enumerate(pool.map(lambda p: read_image(name, p, image_size), paths)):
            out[i] = pixels
    return out


def resize_images(x: np.ndarray, image_size: int | None) -> np.ndarray:
    """Resize uint8 NHWC images (1 or 3 channels) to ``image_size`` square with PIL bilinear.

    Used by datasets stored at a fixed size (digits, CIFAR-10, .npz) so that every loader honours
    ``image_size`` the same way; returns ``x`` unchanged when no resize is needed.
    """
    if image_size is None or x.shape[1:3] == (image_size, image_size):
        return x
    channels = x.shape[-1]
    out = np.empty((len(x), image_size, image_size, channels), dtype=np.uint8)
    for i, image in enumerate(x):
        pil = Image.fromarray(image[..., 0] if channels == 1 else image)
        resized = np.asarray(pil.resize((image_size, image_size), Image.Resampling.BILINEAR))
        out[i] = resized.reshape(image_size, image_size, channels)
    return out


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name so label order is reproducible."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
