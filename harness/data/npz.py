"""Any dataset already packed as a ``.npz`` with ``x_train, y_train, x_test, y_test``.

This is the escape hatch for data no built-in loader knows: an auditor converts once and points
the harness at the file. Images must already be uint8 pixels (NHWC, or NHW grayscale); floats
are refused rather than guessed at, since a wrong guess (0..1 vs 0..255) would silently break
triggers and normalisation. An optional ``class_names`` string array names the classes.

The file may come from the party being audited, so it is treated as hostile: arrays are read
with ``allow_pickle=False`` (object arrays are refused from their header, so loading data can
never execute code), and the zip directory's declared sizes and each ``.npy`` header are
checked before anything is decompressed, so a zip bomb or a header claiming a terabyte-sized
shape is refused in one line instead of exhausting memory. Labels beyond ``MAX_CLASSES`` are
refused too, since the largest label sets the class count that later code allocates by.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.core.errors import DataError, one_line
from harness.data._io import (
    check_image_size,
    reject_unknown_options,
    require_root,
    resize_images,
)
from harness.data.base import DATASETS, ImageDataset

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
MAX_UNCOMPRESSED_BYTES = 16 << 30
"""Largest uncompressed size an archive may declare, per member and in all (16 GiB)."""

MAX_CLASSES = 1 << 16
"""Labels must lie below this; a larger label is corruption, not a 65 537-class dataset."""

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


_READ_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,  # a compression method zipfile lacks
    RuntimeError,  # an encrypted member
)
"""What zipfile, zlib and numpy's .npy reader raise for corrupt or odd archive members."""


@dataclass(frozen=True)
class _Member:
    """One array in the archive as its zip entry and ``.npy`` header describe it (unread)."""

    key: str
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The required arrays (plus ``class_names`` when present), fully read into memory.

    Everything that could make reading costly or unsafe is decided from the zip directory and
    the ``.npy`` headers first: declared uncompressed sizes (a zip bomb), header shapes larger
    than their member (numpy would allocate by the header), object arrays (pickles), dtypes
    and ranks. Only then is any array decompressed.
    """
    if not zipfile.is_zipfile(path):  # np.load would otherwise guess .npy or pickle
        raise DataError(f"npz: {path} is not an .npz (zip) archive (expected {EXPECTED})")
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"npz: cannot read {path}: {one_line(exc)}") from exc
    with archive:
        entries = _entries(path, archive)
        missing = [k for k in REQUIRED_KEYS if k not in entries]
        if missing:
            raise DataError(
                f"npz: {path} lacks {', '.join(missing)} (has {', '.join(entries)}; "
                f"expected {EXPECTED})"
            )
        wanted = [*REQUIRED_KEYS, *(["class_names"] if "class_names" in entries else [])]
        try:
            members = {k: _member(path, archive, k, entries[k]) for k in wanted}
            _check_members(path, members)
            return {k: _read_member(archive, m) for k, m in members.items()}
        except _READ_ERRORS as exc:
            raise DataError(f"npz: cannot read arrays from {path}: {one_line(exc)}") from exc


def _entries(path: Path, archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Archive members by array name, after checking declared uncompressed sizes.

    The sizes come from the zip directory, so a zip bomb is refused before anything is
    decompressed; zipfile then stops each member at its declared size, so a directory that
    understates a size cannot make reading produce more.
    """
    infos = archive.infolist()
    for info in infos:
        if not info.filename.isprintable():
            raise DataError(f"npz: {path} has a member with an unprintable name {info.filename!r}")
        if info.file_size > MAX_UNCOMPRESSED_BYTES:
            raise DataError(
                f"npz: {path} member {info.filename} declares {info.file_size:,} bytes "
                f"uncompressed, over the {MAX_UNCOMPRESSED_BYTES:,}-byte limit (a zip bomb?)"
            )
    total = sum(info.file_size for info in infos)
    if total > MAX_UNCOMPRESSED_BYTES:
        raise DataError(
            f"npz: {path} declares {total:,} bytes uncompressed in all, over the "
            f"{MAX_UNCOMPRESSED_BYTES:,}-byte limit (a zip bomb?)"
        )
    return {info.filename.removesuffix(".npy"): info for info in infos}


def _member(path: Path, archive: zipfile.ZipFile, key: str, info: zipfile.ZipInfo) -> _Member:
    """Read just the ``.npy`` header of one member and refuse what must never be loaded."""
    with archive.open(info) as stream:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise DataError(f"npz: {path} {key} uses unsupported .npy format {version}")
    if dtype.hasobject:
        raise DataError(
            f"npz: cannot read arrays from {path}: {key} holds Python objects ({dtype}), which "
            "would need unpickling; refused"
        )
    declared = math.prod(shape) * dtype.itemsize
    if declared > info.file_size:
        raise DataError(
            f"npz: {path} {key} declares shape {shape} ({declared:,} bytes) but its archive "
            f"member holds only {info.file_size:,} bytes"
        )
    return _Member(key, info, tuple(shape), dtype)


def _check_members(path: Path, members: dict[str, _Member]) -> None:
    """Dtypes and ranks of both splits, from the headers, before any pixel is read."""
    for split in ("train", "test"):
        x, y = members[f"x_{split}"], members[f"y_{split}"]
        if x.dtype != np.uint8:
            raise DataError(
                f"npz: {path} x_{split} must be uint8 pixels 0..255, got {x.dtype} "
                "(convert it; floats are not rescaled on guesswork)"
            )
        if len(x.shape) not in (3, 4) or (len(x.shape) == 4 and x.shape[-1] not in (1, 3)):
            raise DataError(
                f"npz: {path} x_{split} must be NHWC (1 or 3 channels) or NHW, got {x.shape}"
            )
        if 0 in x.shape[1:3]:
            raise DataError(f"npz: {path} x_{split} has empty images, shape {x.shape}")
        count = x.shape[0]
        if y.dtype.kind not in "iu" or y.shape not in ((count,), (count, 1)):
            raise DataError(
                f"npz: {path} y_{split} must be {count} integer labels to match x_{split}, "
                f"got {y.dtype} {y.shape}"
            )
    if members["x_test"].shape[0] == 0:
        raise DataError(f"npz: {path} x_test holds no images; there is nothing to evaluate")


def _read_member(archive: zipfile.ZipFile, member: _Member) -> np.ndarray:
    """Decompress one vetted member; never unpickles."""
    with archive.open(member.info) as stream:
        return np.lib.format.read_array(stream, allow_pickle=False)


def _images(x: np.ndarray) -> np.ndarray:
    """Give grayscale NHW a channel axis (dtype and rank were checked from the header)."""
    return x[..., np.newaxis] if x.ndim == 3 else x


def _labels(path: Path, split: str, y: np.ndarray) -> np.ndarray:
    """Integer labels as int64 ``(N,)``, each within 0..MAX_CLASSES-1.

    Only the minimum and maximum are inspected, so a label such as 2**40 is reported instead
    of becoming a class count that later sizes an allocation.
    """
    y = y.reshape(-1)
    if y.size and y.min() < 0:
        raise DataError(f"npz: {path} y_{split} has negative label {int(y.min())}")
    if y.size and int(y.max()) >= MAX_CLASSES:
        raise DataError(
            f"npz: {path} y_{split} has label {int(y.max())}; labels must lie in "
            f"0..{MAX_CLASSES - 1}"
        )
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
    x_train = _images(arrays["x_train"])
    x_test = _images(arrays["x_test"])
    y_train = _labels(path, "train", arrays["y_train"])
    y_test = _labels(path, "test", arrays["y_test"])
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
