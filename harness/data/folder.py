"""Class-per-subfolder image trees: the layout an auditor's own data most often has.

``data_root/train/<class>/*.png`` and ``data_root/test/<class>/*.png`` (PNG, JPEG, PPM or BMP).
Class names sorted alphabetically become labels 0, 1, …, as in torchvision's ImageFolder, so a
model trained elsewhere on the same tree agrees on label ids. Test classes index into the train
classes; a test class unseen in training is an error, since no label id would be right for it.
Images are converted to RGB and resized to ``image_size`` (default 32) with PIL bilinear.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.core.errors import DataError
from harness.data._io import (
    IMAGE_SUFFIXES,
    check_image_size,
    list_images,
    read_images,
    reject_unknown_options,
    require_root,
)
from harness.data.base import DATASETS, ImageDataset

DEFAULT_IMAGE_SIZE = 32
EXPECTED = "train/<class>/<image> and test/<class>/<image>, images " + "/".join(
    sorted(IMAGE_SUFFIXES)
)


def _class_dirs(split_dir: Path) -> dict[str, Path]:
    """Visible subfolders of one split, by class name, each holding at least one image."""
    if not split_dir.is_dir():
        raise DataError(f"folder: {split_dir} is not a folder (expected {EXPECTED})")
    dirs = {
        d.name: d for d in sorted(split_dir.iterdir()) if d.is_dir() and not d.name.startswith(".")
    }
    if not dirs:
        raise DataError(f"folder: {split_dir} has no class subfolders (expected {EXPECTED})")
    return dirs


def _split_files(split_dir: Path, class_index: dict[str, int]) -> tuple[list[Path], np.ndarray]:
    """Image paths of one split and their labels, classes in sorted order."""
    paths: list[Path] = []
    labels: list[int] = []
    for name, class_dir in _class_dirs(split_dir).items():
        if name not in class_index:
            raise DataError(
                f"folder: test class {class_dir} has no matching train class "
                f"(train classes: {', '.join(class_index)})"
            )
        files = list_images(class_dir)
        if not files:
            raise DataError(
                f"folder: {class_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        paths += files
        labels += [class_index[name]] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


@DATASETS.register("folder")
def load_folder(
    data_root: Path | None, *, image_size: int | None = DEFAULT_IMAGE_SIZE, **options: object
) -> ImageDataset:
    """Load ``train/`` and ``test/`` class folders as uint8 RGB ``(N, S, S, 3)``, S=image_size."""
    reject_unknown_options("folder", options)
    size = check_image_size("folder", image_size) or DEFAULT_IMAGE_SIZE
    root = require_root("folder", data_root, EXPECTED)
    class_names = tuple(sorted(_class_dirs(root / "train")))
    class_index = {name: i for i, name in enumerate(class_names)}
    train_paths, y_train = _split_files(root / "train", class_index)
    test_paths, y_test = _split_files(root / "test", class_index)
    return ImageDataset(
        name="folder",
        x_train=read_images("folder", train_paths, size),
        y_train=y_train,
        x_test=read_images("folder", test_paths, size),
        y_test=y_test,
        num_classes=len(class_names),
        class_names=class_names,
    )
