"""The one evaluation path's draws (distinct, seeded, disjoint where a defense needs them to be),
its metrics, and the defense data it builds for every caller."""

from __future__ import annotations

import numpy as np
import pytest

from defenses.fanout import SerialLabelMap
from harness.attacks.base import build_attack
from harness.data.base import ImageDataset
from harness.pipeline.evaluate import (
    CellRepair,
    calibration_draw,
    cell_defense_data,
    defense_pools,
    defense_split,
    defense_training_images,
    defense_training_subset,
    prediction_metrics,
    seeded_subset,
)
from harness.pipeline.retrain import FinePruneRetrainer

ATTACK = {"patch_size": 2, "poison_rate": 0.1, "target_label": 0}


def _dataset(n_train: int, n_test: int) -> ImageDataset:
    rng = np.random.default_rng(0)
    return ImageDataset(
        "synthetic",
        rng.integers(0, 256, (n_train, 8, 8, 1), dtype=np.uint8),
        np.arange(n_train) % 10,
        rng.integers(0, 256, (n_test, 8, 8, 1), dtype=np.uint8),
        np.arange(n_test) % 10,
        10,
        [str(k) for k in range(10)],
    )


def test_seeded_subsets_are_distinct_sorted_and_repeatable():
    first = seeded_subset(1347, 256, "audit-calibration", 0)
    assert len(np.unique(first)) == 256 and np.all(np.diff(first) > 0)
    np.testing.assert_array_equal(first, seeded_subset(1347, 256, "audit-calibration", 0))
    assert not np.array_equal(first, seeded_subset(1347, 256, "audit-calibration", 1))
    assert len(seeded_subset(10, 256, "x")) == 10  # never more than there are


def test_calibration_draw_never_repeats_an_image():
    images = np.arange(1347)[:, None, None, None].repeat(2, axis=1)
    drawn = calibration_draw(images, 256, seed=0, stream="audit-calibration")
    assert len(np.unique(drawn[:, 0, 0, 0])) == 256


def test_fine_tuning_images_are_held_out_and_disjoint_from_both_pools_when_the_test_split_allows():
    data = _dataset(n_train=600, n_test=1200)
    attack = build_attack("badnet", ATTACK)
    pools = defense_pools(data, attack, seed=3, clean_size=200)
    assert pools.tune_source == "held_out" and len(pools.tune_x) == 200
    pool, rest = defense_split(len(data.x_test), 200, seed=3)
    stamped = rest[data.y_test[rest] != 0][:200]
    np.testing.assert_array_equal(pools.tune_x, data.x_test[pools.tune_idx])
    assert not set(pools.tune_idx) & set(pool)
    assert not set(pools.tune_idx) & set(stamped)
    np.testing.assert_array_equal(pools.clean_x, data.x_test[pool])
    assert len(pools.triggered_x) == 200


def test_fine_tuning_falls_back_to_clean_training_images_and_says_so():
    data = _dataset(n_train=600, n_test=450)
    attack = build_attack("badnet", ATTACK)
    mask = np.zeros(600, dtype=bool)
    mask[::7] = True  # poisoned training images are never fine-tuned on
    pools = defense_pools(data, attack, seed=0, clean_size=225, poison_mask=mask)
    assert pools.tune_source == "training" and len(pools.tune_x) == 225
    assert not mask[pools.tune_idx].any()
    np.testing.assert_array_equal(pools.tune_x, data.x_train[pools.tune_idx])


@pytest.mark.parametrize("size", [None, 600, 5000])
def test_defense_training_subset_is_all_or_a_seeded_draw(size):
    keep = defense_training_subset(1000, size, seed=0)
    if size is None or size >= 1000:
        assert keep is None
    else:
        assert len(np.unique(keep)) == size


# ------------------------------------------------------------------ a cell's defense data
def test_cell_defense_data_builds_the_repair_from_the_pools_and_passes_the_label_map(tmp_path):
    data = _dataset(n_train=600, n_test=1200)
    attack = build_attack("badnet", ATTACK)
    pools = defense_pools(data, attack, seed=3, clean_size=200)
    mask = np.zeros(600, dtype=bool)
    mask[::5] = True
    training = defense_training_images(data.x_train, data.y_train, 100, 3, mask)
    label_map = SerialLabelMap()
    artifact = tmp_path / "int8-static.onnx"
    built = cell_defense_data(
        10,
        pools,
        training=training,
        target_label=0,
        poison_rate=0.1,
        repair=CellRepair(
            state_path=tmp_path / "model.pt",
            artifact_path=artifact,
            precision="int8-static",
            calibration_images=data.x_train[:8],
            epochs=2,
            seed=3,
            threads=1,
            kernel_profile="exact",
        ),
        label_map=label_map,
    )
    assert built.label_map is label_map
    np.testing.assert_array_equal(built.clean_x, pools.clean_x)
    np.testing.assert_array_equal(built.triggered_x, pools.triggered_x)
    keep = defense_training_subset(600, 100, 3)
    np.testing.assert_array_equal(built.train_x, data.x_train[keep])
    np.testing.assert_array_equal(built.poison_mask, mask[keep])  # cut with the images
    retrainer = built.retrainer
    assert isinstance(retrainer, FinePruneRetrainer)
    np.testing.assert_array_equal(retrainer.clean_x, pools.tune_x)
    np.testing.assert_array_equal(retrainer.source_indices, pools.tune_idx)
    assert retrainer.data_source == pools.tune_source == "held_out"
    assert retrainer.out_dir == tmp_path / "fine_pruned"
    assert (retrainer.precision, retrainer.kernel_profile, retrainer.seed) == (
        "int8-static",
        "exact",
        3,
    )


def test_cell_defense_data_from_a_clean_sample_alone_has_no_trigger_and_no_repair(tmp_path):
    x, y = np.zeros((20, 8, 8, 1), np.uint8), np.arange(20) % 10
    built = cell_defense_data(10, (x, y))
    assert built.triggered_x is None and built.train_x is None and built.retrainer is None
    assert built.label_map is None and built.reference is None
    with pytest.raises(ValueError, match="pass the pools"):
        cell_defense_data(
            10,
            (x, y),
            repair=CellRepair(tmp_path, tmp_path / "a.onnx", "fp32", x, 1, 0, 1, "exact"),
        )


def test_prediction_metrics_leave_out_what_there_is_nothing_to_measure_against():
    predictions, labels = np.array([0, 1, 2, 2]), np.array([0, 1, 2, 3])
    assert prediction_metrics(predictions, labels) == {"clean_acc": 0.75}
    both = prediction_metrics(
        predictions,
        labels,
        np.array([0, 1, 1, 1]),
        triggered_predictions=np.array([0, 0, 5]),
        target_label=0,
    )
    assert both == {"clean_acc": 0.75, "asr": 2 / 3, "agreement_fp32": 0.5}
