"""Session-wide fixtures: a tiny BadNet-poisoned digits model (and a clean control), exported
and quantized once per test session to every precision, so tests exercise real ORT graphs
without downloads. Everything is seeded, so every run builds identical artifacts."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _root_log_level_restored():
    """Every test starts with the root logger's level as the suite found it.

    Tests quiet onnxruntime's quantizer by raising the root level to ERROR; left raised, a later
    test that asserts on a warning (the result store's torn-line repair) sees nothing, and the
    suite passes or fails by test order.
    """
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)


PRECISIONS = ("fp32", "int8-dynamic", "int8-static", "int4")
TARGET = 0


@dataclass
class DigitsWorld:
    """Data and model files shared by the tests (read-only: copy before modifying)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    poison_mask: np.ndarray
    clean_x_train: np.ndarray
    clean_y_train: np.ndarray
    triggered_x: np.ndarray
    target: int
    poisoned: dict[str, Path]
    clean: dict[str, Path]


def _digits():
    from harness.data.base import load_dataset

    return load_dataset("digits")


def _train(x: np.ndarray, y: np.ndarray, preprocessing):
    from harness.training.loop import TrainConfig, train_model

    config = TrainConfig(model="small_cnn", epochs=25, batch_size=64, seed=0, num_threads=1)
    return train_model(x, y, 10, preprocessing, config, progress=False)


def _export_all(
    model, preprocessing, calib: np.ndarray, sample: np.ndarray, folder: Path
) -> dict[str, Path]:
    """The project's own exporter and quantizers, as the runner uses them."""
    from exporters.onnx_export import export_onnx
    from exporters.quantization import quantize_all

    folder.mkdir(parents=True, exist_ok=True)
    exported = folder / "exported.onnx"
    export_onnx(model, exported, sample, preprocessing)
    return quantize_all(exported, folder, PRECISIONS, calib)[0]


@pytest.fixture(scope="session")
def digits_world(tmp_path_factory) -> DigitsWorld:
    """Poisoned (10% BadNet 2×2, target 0) and clean small_cnn digits models at every precision."""
    from harness.artifacts.preprocessing import Preprocessing
    from harness.attacks.base import build_attack

    data = _digits()
    attack = build_attack(
        "badnet", {"patch_size": 2, "margin": 0, "poison_rate": 0.1, "target_label": TARGET}
    )
    poisoned = attack.poison(data.x_train, data.y_train, np.random.default_rng(0))
    preprocessing = Preprocessing.from_images(data.x_train)
    root = tmp_path_factory.mktemp("digits_world")
    calib = data.x_train[:256]
    sample = data.x_test[:128]
    triggered, _ = attack.triggered_test_set(data.x_test, data.y_test)
    return DigitsWorld(
        x_train=poisoned.x,
        y_train=poisoned.y,
        x_test=data.x_test,
        y_test=data.y_test,
        poison_mask=poisoned.poison_mask,
        clean_x_train=data.x_train,
        clean_y_train=data.y_train,
        triggered_x=triggered,
        target=TARGET,
        poisoned=_export_all(
            _train(poisoned.x, poisoned.y, preprocessing),
            preprocessing,
            calib,
            sample,
            root / "poisoned",
        ),
        clean=_export_all(
            _train(data.x_train, data.y_train, preprocessing),
            preprocessing,
            calib,
            sample,
            root / "clean",
        ),
    )


@pytest.fixture(scope="session")
def rgb_npz(tmp_path_factory) -> Path:
    """A tiny 8×8 RGB 10-class dataset in the npz layout (the foreign corpus's 3-channel models)."""
    return write_rgb_npz(tmp_path_factory.mktemp("rgb") / "rgb8.npz", 200, 120, classes=10)


def write_rgb_npz(
    path: Path, n_train: int, n_test: int, classes: int, seed: int = 0, side: int = 8
) -> Path:
    """Random ``side``×``side`` RGB images with balanced labels, in the npz dataset layout.

    ``seed`` changes the pixels (and so the file's content hash, which sweeps key cells on).
    """
    rng = np.random.default_rng(seed)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n_train, side, side, 3), dtype=np.uint8),
        y_train=np.arange(n_train) % classes,
        x_test=rng.integers(0, 256, (n_test, side, side, 3), dtype=np.uint8),
        y_test=np.arange(n_test) % classes,
    )
    return path


@contextmanager
def dask_executor(workers: int = 2) -> Iterator:
    """A Dask executor over a fresh local cluster of ``workers`` single-threaded processes.

    Skips the test where the optional [dask] extra is missing; the cluster and its client are
    closed on the way out, whatever the test did.
    """
    distributed = pytest.importorskip("distributed")
    from harness.pipeline.executors import DaskExecutor

    with (
        distributed.LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.CRITICAL,
        ) as cluster,
        distributed.Client(cluster) as client,
        DaskExecutor(client=client) as executor,
    ):
        yield executor
