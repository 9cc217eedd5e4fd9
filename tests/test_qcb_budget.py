"""bench.qcb_budget: development runs change only what they should, and the rule reads both."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.qcb_budget import development_config, score, write_subset
from harness.qcb_cli import load_qcb_config, qcb_dataset

CONFIG = Path(__file__).parents[1] / "configs" / "qcb-gtsrb.toml"


def _record(poisoned: bool, precision: str, acc: float, asr: float) -> dict:
    return {"poisoned": poisoned, "precision": precision, "clean_acc": acc, "asr": asr}


def test_a_development_run_keeps_the_recipe_and_changes_only_seed_scope_and_qcb():
    base = load_qcb_config(CONFIG)
    dev = development_config(base, 11, {"boost_units": 5})
    assert dev.seeds == [11] and not set(dev.seeds) & set(base.seeds)
    assert dev.precisions == ["fp32", "int8-static"] and dev.defenses == []
    assert dev.qcb_params().boost_units == 5
    assert dev.qcb_params().lr == base.qcb_params().lr  # the rest of [qcb] is the config's
    assert (dev.training, dev.attack_params, dev.train_limit) == (
        base.training,
        base.attack_params,
        base.train_limit,
    )


def test_the_rule_needs_accuracy_on_both_artifacts_and_int8_asr():
    control = [_record(False, "fp32", 0.85, 0.01), _record(False, "int8-static", 0.85, 0.01)]
    good = [_record(True, "fp32", 0.84, 0.0), _record(True, "int8-static", 0.84, 0.95)]
    assert score(control + good, 0.02, 0.9)["passes"]
    weak = [_record(True, "fp32", 0.84, 0.0), _record(True, "int8-static", 0.84, 0.89)]
    assert not score(control + weak, 0.02, 0.9)["passes"]
    costly = [_record(True, "fp32", 0.82, 0.0), _record(True, "int8-static", 0.84, 0.99)]
    assert not score(control + costly, 0.02, 0.9)["passes"]


def test_the_subset_holds_exactly_the_images_the_run_uses(rgb_npz, tmp_path):
    config = load_qcb_config(CONFIG).model_copy(
        update={"data_root": str(rgb_npz), "train_limit": 50, "eval_limit": 30}
    )
    write_subset(config, tmp_path / "subset.npz")
    subset = np.load(tmp_path / "subset.npz")
    used = qcb_dataset(config)
    np.testing.assert_array_equal(subset["x_train"], used.x_train)
    np.testing.assert_array_equal(subset["y_test"], used.y_test[:30])
    assert len(subset["x_train"]) in (49, 50, 51)  # stratified rounding over 10 classes
