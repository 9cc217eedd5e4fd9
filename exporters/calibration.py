"""Calibration for static (QDQ) quantization: pixel images in, per-tensor ranges out.

Calibration images arrive in uint8 pixel space, like everything else in the harness, and are
normalised with the preprocessing stored in the fp32 model itself, so the ranges are measured on
exactly what the deployed model will see. Ranges are computed with onnxruntime's own
calibrators and handed to ``quantize_static`` through its calibration cache, because that is
the only route that lets the entropy / percentile calibrators use the histogram sizes the
recipe asks for.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

from exporters.recipes import QuantRecipe, calibrator_options, ort_calibration_method
from harness.artifacts.preprocessing import Preprocessing
from harness.core.errors import DataError

logger = logging.getLogger(__name__)


def check_pixel_images(images: object, channels: int, what: str = "calibration images") -> None:
    """Raise DataError unless ``images`` is a non-empty uint8 NHWC array with ``channels``."""
    if not isinstance(images, np.ndarray):
        raise DataError(f"{what} must be a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise DataError(f"{what} must be uint8 pixels (0..255), got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != channels:
        raise DataError(f"{what} must be NHWC with {channels} channel(s), got shape {images.shape}")
    if len(images) == 0:
        raise DataError(f"{what} are empty")


def select_calibration_images(images: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """All images when ``size`` is None, else a seeded subset of ``size`` kept in input order."""
    if size is None or size == len(images):
        return images
    if size > len(images):
        raise DataError(
            f"calibration_size {size} exceeds the {len(images)} calibration images given"
        )
    picked = np.random.default_rng(seed).choice(len(images), size=size, replace=False)
    return images[np.sort(picked)]


def images_fingerprint(images: np.ndarray) -> str:
    """sha256 over shape and pixels: identifies the calibration set in a sidecar."""
    digest = hashlib.sha256(repr(images.shape).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    return digest.hexdigest()


class PixelBatchReader(CalibrationDataReader):
    """Feeds preprocessed batches of pixel images to onnxruntime's calibrators, rewindably."""

    def __init__(
        self, images: np.ndarray, preprocessing: Preprocessing, input_name: str, batch_size: int
    ) -> None:
        self.images = images
        self.preprocessing = preprocessing
        self.input_name = input_name
        self.batch_size = batch_size
        self._start = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._start >= len(self.images):
            return None
        batch = self.images[self._start : self._start + self.batch_size]
        self._start += self.batch_size
        return {self.input_name: self.preprocessing.apply(batch)}

    def rewind(self) -> None:
        self._start = 0

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)


def write_calibration_cache(
    model_path: Path, reader: PixelBatchReader, recipe: QuantRecipe, work_dir: Path
) -> Path:
    """Run the recipe's calibrator over ``reader`` and save the ranges as an onnxruntime cache.

    onnxruntime's calibrators print progress to stdout; that chatter is sent to the debug log
    so a CLI run stays readable.
    """
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        calibrator = create_calibrator(
            model_path,
            None,
            augmented_model_path=str(work_dir / "augmented.onnx"),
            calibrate_method=ort_calibration_method(recipe),
            extra_options=calibrator_options(recipe),
        )
        calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
    if chatter.getvalue():
        logger.debug("onnxruntime calibrator: %s", chatter.getvalue().strip())
    cache = work_dir / "calibration_cache.json"
    save_tensors_data(ranges, cache)
    return cache
