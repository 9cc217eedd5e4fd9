"""GTSRB (German Traffic Sign Recognition Benchmark) from its on-disk layouts.

Two layouts are common: the official archives (``GTSRB/Final_Training/Images/NNNNN/*.ppm``,
``GTSRB/Final_Test/Images/*.ppm`` and the separately shipped ``GT-final_test.csv``) and the one
torchvision's downloader leaves (``gtsrb/GTSRB/Training/NNNNN/*.ppm``, ``gtsrb/GT-final_test.csv``).
Both are read as full frames (not the ROI crop), RGB, resized with PIL bilinear: the
preprocessing most backdoor papers use, so numbers are comparable with theirs.

Training labels come from the class folder names (``00007`` → 7), which is what the per-class
``GT-NNNNN.csv`` files repeat; test labels come from the ``ClassId`` column of
``GT-final_test.csv``, the only place they exist.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.core.errors import DataError, one_line
from harness.data._io import (
    check_image_size,
    list_images,
    read_images,
    reject_unknown_options,
    require_root,
)
from harness.data.base import DATASETS, ImageDataset

NUM_CLASSES = 43
DEFAULT_IMAGE_SIZE = 32
TEST_CSV = "GT-final_test.csv"
EXPECTED = (
    "GTSRB/Final_Training/Images/NNNNN/*.ppm, GTSRB/Final_Test/Images/*.ppm and "
    f"{TEST_CSV}, or torchvision's gtsrb/GTSRB/Training and gtsrb/{TEST_CSV}"
)


@dataclass(frozen=True)
class _Layout:
    """Where one GTSRB copy keeps its training classes, test images and test labels."""

    train_dir: Path
    test_dir: Path
    test_csv: Path


def _find_layout(root: Path) -> _Layout:
    """Locate a GTSRB copy at ``root``, ``root/GTSRB``, ``root/gtsrb`` or ``root/gtsrb/GTSRB``."""
    for base in (root, root / "gtsrb"):
        for gtsrb in (base / "GTSRB", base):
            train_dir = next(
                (
                    d
                    for d in (gtsrb / "Final_Training" / "Images", gtsrb / "Training")
                    if d.is_dir()
                ),
                None,
            )
            if train_dir is None:
                continue
            test_dir = gtsrb / "Final_Test" / "Images"
            if not test_dir.is_dir():
                raise DataError(f"gtsrb: {gtsrb} has no Final_Test/Images (expected {EXPECTED})")
            csv_places = (test_dir, gtsrb, base, root)
            test_csv = next((d / TEST_CSV for d in csv_places if (d / TEST_CSV).is_file()), None)
            if test_csv is None:
                raise DataError(
                    f"gtsrb: no {TEST_CSV} in {test_dir}, {gtsrb} or {root} "
                    "(it ships separately as GTSRB_Final_Test_GT.zip)"
                )
            return _Layout(train_dir, test_dir, test_csv)
    raise DataError(f"gtsrb: no GTSRB training folder under {root} (expected {EXPECTED})")


def _training_files(train_dir: Path) -> tuple[list[Path], np.ndarray]:
    """Every training image path, with the label its ``NNNNN`` class folder encodes."""
    paths: list[Path] = []
    labels: list[int] = []
    class_dirs = sorted(d for d in train_dir.iterdir() if d.is_dir() and d.name.isdigit())
    for class_dir in class_dirs:
        files = list_images(class_dir)
        paths += files
        labels += [int(class_dir.name)] * len(files)
    if not paths:
        raise DataError(
            f"gtsrb: no class folders with images in {train_dir} (expected NNNNN/*.ppm)"
        )
    return paths, np.asarray(labels, dtype=np.int64)


def _test_files(layout: _Layout) -> tuple[list[Path], np.ndarray]:
    """Test image paths and labels, in the order ``GT-final_test.csv`` lists them."""
    try:
        with layout.test_csv.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle, delimiter=";"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"gtsrb: cannot read {layout.test_csv}: {one_line(exc)}") from exc
    if not rows or not {"Filename", "ClassId"} <= set(rows[0]):
        raise DataError(
            f"gtsrb: {layout.test_csv} needs ';'-separated columns Filename and ClassId "
            f"with at least one row"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for line, row in enumerate(rows, start=2):
        filename, class_id = row["Filename"], row["ClassId"]
        try:
            labels.append(int(class_id))
        except (TypeError, ValueError) as exc:
            raise DataError(
                f"gtsrb: {layout.test_csv} line {line}: ClassId {class_id!r} is not an integer"
            ) from exc
        path = layout.test_dir / (filename or "")
        if not filename or not path.is_file():
            raise DataError(f"gtsrb: {layout.test_csv} line {line} names missing image {path}")
        paths.append(path)
    return paths, np.asarray(labels, dtype=np.int64)


@DATASETS.register("gtsrb")
def load_gtsrb(
    data_root: Path | None, *, image_size: int | None = DEFAULT_IMAGE_SIZE, **options: object
) -> ImageDataset:
    """Load GTSRB's 39,209 training and 12,630 test frames as uint8 RGB NHWC.

    Frames vary in size (15–250 px), so they are always resized to ``image_size`` (default 32).
    """
    reject_unknown_options("gtsrb", options)
    size = check_image_size("gtsrb", image_size) or DEFAULT_IMAGE_SIZE
    root = require_root("gtsrb", data_root, EXPECTED)
    layout = _find_layout(root)
    train_paths, y_train = _training_files(layout.train_dir)
    test_paths, y_test = _test_files(layout)
    return ImageDataset(
        name="gtsrb",
        x_train=read_images("gtsrb", train_paths, size),
        y_train=y_train,
        x_test=read_images("gtsrb", test_paths, size),
        y_test=y_test,
        num_classes=NUM_CLASSES,
        class_names=tuple(str(i) for i in range(NUM_CLASSES)),
    )
