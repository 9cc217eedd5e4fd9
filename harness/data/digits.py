"""scikit-learn's bundled 8×8 handwritten digits: a dataset that needs no download.

It lets the whole pipeline (poison, train, export, quantize, defend) run offline in seconds, so
tests and first-time users exercise real code paths without fetching CIFAR-10 or GTSRB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits as _sklearn_digits
from sklearn.model_selection import train_test_split

from harness.data._io import check_image_size, reject_unknown_options, resize_images
from harness.data.base import DATASETS, ImageDataset

SPLIT_SEED = 0
"""Fixed so that "digits" names one train/test split everywhere, like a downloaded benchmark."""

TEST_FRACTION = 0.25
_MAX_PIXEL = 16  # sklearn's digits count "on" cells of a 4×4 block: values 0..16


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Map sklearn's 0..16 intensities onto the 0..255 pixel range every loader shares."""
    return np.rint(images.astype(np.float64) * (255.0 / _MAX_PIXEL)).astype(np.uint8)


@DATASETS.register("digits")
def load_digits(
    data_root: Path | None = None, *, image_size: int | None = None, **options: object
) -> ImageDataset:
    """Return the 1797 digits as uint8 ``(N, 8, 8, 1)`` with a stratified 75/25 split.

    ``data_root`` is ignored (the data ships with scikit-learn). ``image_size`` optionally
    resizes the images with PIL bilinear, e.g. to feed a model built for larger inputs.
    """
    reject_unknown_options("digits", options)
    size = check_image_size("digits", image_size)
    bunch = _sklearn_digits()
    x = to_uint8(bunch.images)[..., np.newaxis]
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    return ImageDataset(
        name="digits",
        x_train=resize_images(np.ascontiguousarray(x_train), size),
        y_train=y_train,
        x_test=resize_images(np.ascontiguousarray(x_test), size),
        y_test=y_test,
        num_classes=10,
        class_names=tuple(str(d) for d in range(10)),
    )
