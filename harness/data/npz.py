"""Any dataset already packed as a ``.npz`` with ``x_train, y_train, x_test, y_test``.

This is the escape hatch for data no built-in loader knows: an auditor converts once and points
the harness at the file. Images must already be uint8 pixels (NHWC, or NHW grayscale); floats
are refused rather than guessed at, since a wrong guess (0..1 vs 0..255) would silently break
triggers and normalisation. Files are opened with ``allow_pickle=False`` so loading data can
never execute code. An optional ``class_names`` string array names the classes.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from harness.data._io import (
    check_image_size,
    one_line,
    reject_unknown_options,
    require_root,
    resize_images,
)
from harness.data.base import DATASETS, ImageDataset
from harness.errors import DataError

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
EXPECTED = "a .npz file (or a folder with exactly one) holding x_train, y_train, x_test, y_test"


def _find_file(root: Path) -> Path:
    """``root`` itself, or the single ``.npz`` inside the folder ``root``."""
    if root.is_file():
        return root
    candidates = sorted(p for p in root.glob("*.npz") if p.is_file())
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise DataError(
            f"npz: {root} must hold exactly one .npz, found {found} (expected {EXPECTED})"
        )
    return candidates[0]


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The required arrays (plus ``class_names`` when present), fully read into memory."""
    if not zipfile.is_zipfile(path):  # np.load would otherwise guess .npy or pickle
        raise DataError(f"npz: {path} is not an .npz (zip) archive (expected {EXPECTED})")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"npz: cannot read {path}: {one_line(exc)}") from exc
    with archive:
        missing = [k for k in REQUIRED_KEYS if k not in archive.files]
        if missing:
            raise DataError(
                f"npz: {path} lacks {', '.join(missing)} (has {', '.join(archive.files)}; "
                f"expected {EXPECTED})"
            )
        wanted = [*REQUIRED_KEYS, *(["class_names"] if "class_names" in archive.files else [])]
        try:
            return {k: archive[k] for k in wanted}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"npz: cannot read arrays from {path}: {one_line(exc)}") from exc


def _images(path: Path, split: str, x: np.ndarray) -> np.ndarray:
    """Check the pixel array's dtype and give grayscale NHW a channel axis."""
    if x.dtype != np.uint8:
        raise DataError(
            f"npz: {path} x_{split} must be uint8 pixels 0..255, got {x.dtype} "
            "(convert it; floats are not rescaled on guesswork)"
        )
    if x.ndim == 3:
        x = x[..., np.newaxis]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(
            f"npz: {path} x_{split} must be NHWC (1 or 3 channels) or NHW, got {x.shape}"
        )
    return x


def _labels(path: Path, split: str, y: np.ndarray, count: int) -> np.ndarray:
    """Integer labels as int64 ``(N,)``; a Keras-style ``(N, 1)`` column is flattened."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (count,):
        raise DataError(
            f"npz: {path} y_{split} must be {count} integer labels to match x_{split}, "
            f"got {y.dtype} {y.shape}"
        )
    if y.size and y.min() < 0:
        raise DataError(f"npz: {path} y_{split} has negative label {int(y.min())}")
    return y.astype(np.int64)


@DATASETS.register("npz")
def load_npz(
    data_root: Path | None, *, image_size: int | None = None, **options: object
) -> ImageDataset:
    """Load a prepared ``.npz``; ``num_classes`` is the largest label + 1 across both splits.

    ``image_size`` optionally resizes with PIL bilinear; by default images keep their size.
    """
    reject_unknown_options("npz", options)
    size = check_image_size("npz", image_size)
    path = _find_file(require_root("npz", data_root, EXPECTED))
    arrays = _read_arrays(path)
    x_train = _images(path, "train", arrays["x_train"])
    x_test = _images(path, "test", arrays["x_test"])
    y_train = _labels(path, "train", arrays["y_train"], len(x_train))
    y_test = _labels(path, "test", arrays["y_test"], len(x_test))
    num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    class_names: tuple[str, ...] = ()
    if "class_names" in arrays:
        class_names = tuple(str(n) for n in arrays["class_names"].ravel())
        if len(class_names) < num_classes:
            raise DataError(
                f"npz: {path} class_names lists {len(class_names)} names but labels reach "
                f"{num_classes - 1}"
            )
        num_classes = len(class_names)
    return ImageDataset(
        name="npz",
        x_train=resize_images(x_train, size),
        y_train=y_train,
        x_test=resize_images(x_test, size),
        y_test=y_test,
        num_classes=num_classes,
        class_names=class_names,
    )
