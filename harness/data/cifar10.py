"""CIFAR-10 from the official python distribution (``cifar-10-python.tar.gz``), read offline.

Accepts the extracted ``cifar-10-batches-py`` folder, its parent, the tarball, or a folder
holding the tarball; the tarball is streamed member by member rather than extracted, so a
read-only data mount works. The batches are pickles, and unpickling runs whatever code a file
names, so they are read with an unpickler that only admits the handful of numpy and builtin
names the real files use: a data file can never run code on the auditor's machine.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from harness.core.errors import DataError, one_line
from harness.data._io import (
    check_image_size,
    reject_unknown_options,
    require_root,
    resize_images,
)
from harness.data.base import DATASETS, ImageDataset

FOLDER = "cifar-10-batches-py"
TARBALL = "cifar-10-python.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
EXPECTED = f"{FOLDER} with data_batch_1..5 and test_batch, or {TARBALL}"
DEFAULT_CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
"""Used only when ``batches.meta`` is absent; the real file lists the same ten names."""

_SIDE = 32
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),  # pickles written by numpy 1.x (the real ones)
        ("numpy._core.multiarray", "_reconstruct"),  # pickles written by numpy 2.x
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes in protocol-2 pickles
    }
)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds dicts, lists, bytes and numpy arrays, and nothing callable."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refuses to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(raw: bytes, where: str) -> dict[bytes, Any]:
    """Decode one CIFAR batch pickle (Python 2 era, hence ``encoding="bytes"``)."""
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # pickle can raise nearly anything on corrupt input
        raise DataError(
            f"cifar10: {where} is not a readable CIFAR pickle: {one_line(exc)}"
        ) from exc
    if not isinstance(obj, dict):
        raise DataError(f"cifar10: {where} holds a {type(obj).__name__}, expected a dict")
    return obj


def _read_folder(folder: Path) -> dict[str, tuple[bytes, str]]:
    """Raw bytes (and a path for messages) of each batch file in an extracted folder."""
    wanted = (*TRAIN_BATCHES, TEST_BATCH, META)
    missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH) if not (folder / n).is_file()]
    if missing:
        raise DataError(f"cifar10: {folder} lacks {', '.join(missing)} (expected {EXPECTED})")
    try:
        return {
            n: ((folder / n).read_bytes(), str(folder / n))
            for n in wanted
            if (folder / n).is_file()
        }
    except OSError as exc:
        raise DataError(f"cifar10: cannot read {folder}: {one_line(exc)}") from exc


def _read_tarball(tarball: Path) -> dict[str, tuple[bytes, str]]:
    """Raw bytes (and a name for messages) of the batch files inside the tarball.

    The archive is streamed once, front to back, and nothing is extracted to disk.
    """
    wanted = {*TRAIN_BATCHES, TEST_BATCH, META}
    found: dict[str, tuple[bytes, str]] = {}
    try:
        with tarfile.open(tarball, mode="r|gz") as archive:
            for member in archive:
                name = Path(member.name).name
                if member.isfile() and name in wanted and name not in found:
                    handle = archive.extractfile(member)
                    if handle is not None:
                        found[name] = (handle.read(), f"{tarball}:{member.name}")
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise DataError(
            f"cifar10: cannot read tarball {tarball}: {one_line(exc)} (expected {EXPECTED})"
        ) from exc
    missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH) if n not in found]
    if missing:
        raise DataError(f"cifar10: {tarball} lacks {', '.join(missing)} (expected {EXPECTED})")
    return found


def _read_raw(root: Path) -> dict[str, tuple[bytes, str]]:
    """Find the batches in any of the accepted places under ``root`` and read them."""
    if root.is_file():
        return _read_tarball(root)
    for folder in (root, root / FOLDER):
        if (folder / TRAIN_BATCHES[0]).is_file():
            return _read_folder(folder)
    if (root / TARBALL).is_file():
        return _read_tarball(root / TARBALL)
    raise DataError(f"cifar10: no {FOLDER} under {root} (expected {EXPECTED})")


def _batch_arrays(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch's images as uint8 NHWC RGB and its labels as int64."""
    batch = _unpickle(raw, where)
    if b"data" not in batch or b"labels" not in batch:
        raise DataError(f"cifar10: {where} lacks the b'data' / b'labels' entries")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * _SIDE * _SIDE:
        raise DataError(
            f"cifar10: {where} data must be uint8 (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"cifar10: {where} has labels of shape {labels.shape} for {len(data)} images, "
            f"expected {len(data)} integers"
        )
    # Rows are channel-planar: 1024 red values, then 1024 green, then 1024 blue.
    images = data.reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _class_names(meta: tuple[bytes, str] | None) -> tuple[str, ...]:
    """The ``label_names`` of ``batches.meta``, or the standard ten when the file is absent."""
    if meta is None:
        return DEFAULT_CLASS_NAMES
    raw, where = meta
    names = _unpickle(raw, where).get(b"label_names")
    if not isinstance(names, list) or not names:
        raise DataError(f"cifar10: {where} lacks a b'label_names' list")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


@DATASETS.register("cifar10")
def load_cifar10(
    data_root: Path | None, *, image_size: int | None = None, **options: object
) -> ImageDataset:
    """Load the 50k/10k CIFAR-10 split as uint8 ``(N, 32, 32, 3)`` RGB.

    ``image_size`` optionally resizes with PIL bilinear (e.g. 64 for a larger model).
    """
    reject_unknown_options("cifar10", options)
    size = check_image_size("cifar10", image_size)
    root = require_root("cifar10", data_root, EXPECTED)
    raw = _read_raw(root)
    train = [_batch_arrays(*raw[n]) for n in TRAIN_BATCHES]
    x_test, y_test = _batch_arrays(*raw[TEST_BATCH])
    class_names = _class_names(raw.get(META))
    return ImageDataset(
        name="cifar10",
        x_train=resize_images(np.concatenate([x for x, _ in train]), size),
        y_train=np.concatenate([y for _, y in train]),
        x_test=resize_images(x_test, size),
        y_test=y_test,
        num_classes=len(class_names),
        class_names=class_names,
    )
