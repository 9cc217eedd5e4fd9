"""The one in-memory shape every dataset loader returns.

Every stage downstream (attacks, training, the runtime adapter, defenses) works on uint8 NHWC
images in pixel space, because that is where a physical trigger lives and what a deployed
camera pipeline hands the model. Normalisation happens once, inside the adapter / model wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from harness.core.errors import DataError
from harness.core.registry import Registry


@dataclass(frozen=True)
class ImageDataset:
    """A train/test split of uint8 NHWC images with int64 labels in ``[0, num_classes)``."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        for split, x, y in (
            ("train", self.x_train, self.y_train),
            ("test", self.x_test, self.y_test),
        ):
            validate_split(self.name, split, x, y, self.num_classes)
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"{self.name}: train images {self.x_train.shape[1:]} and test images "
                f"{self.x_test.shape[1:]} differ in shape"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of one image."""
        h, w, c = self.x_train.shape[1:]
        return int(h), int(w), int(c)


def validate_split(name: str, split: str, x: np.ndarray, y: np.ndarray, num_classes: int) -> None:
    """Reject arrays that would silently produce garbage later (wrong dtype, rank, labels)."""
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(
            f"{name}: {split} images must be uint8 NHWC with 1 or 3 channels, "
            f"got dtype {x.dtype} shape {x.shape}"
        )
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{name}: {split} labels shape {y.shape} does not match {len(x)} images")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name}: {split} labels must be integers, got {y.dtype}")
    if len(y) == 0:
        raise DataError(f"{name}: {split} split is empty")
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(
            f"{name}: {split} labels span {int(y.min())}..{int(y.max())}, "
            f"outside 0..{num_classes - 1}"
        )


DATASETS: Registry = Registry("dataset")
"""Loader callables ``(data_root: Path | None, **options) -> ImageDataset`` by name."""

for _name, _module in {
    "digits": "harness.data.digits",
    "cifar10": "harness.data.cifar10",
    "gtsrb": "harness.data.gtsrb",
    "npz": "harness.data.npz",
    "folder": "harness.data.folder",
}.items():
    DATASETS.register_lazy(_name, _module)


def load_dataset(name: str, data_root: str | None = None, **options: object) -> ImageDataset:
    """Load the dataset registered as ``name`` from ``data_root`` (ignored by embedded ones)."""
    from pathlib import Path

    loader = DATASETS.get(name)
    return loader(Path(data_root) if data_root is not None else None, **options)
