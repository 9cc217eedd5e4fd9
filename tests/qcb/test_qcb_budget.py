"""bench.qcb.qcb_budget: development runs change only what they should, and the rule reads both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.qcb.qcb_budget import development_config, folder_name, score, write_development_data
from harness.qcb.pipeline import load_qcb_config, qcb_dataset

CONFIG = Path(__file__).parents[2] / "configs" / "qcb" / "qcb-gtsrb.toml"


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


def test_the_rule_needs_accuracy_on_both_artifacts_int8_asr_and_a_dormant_fp32():
    control = [_record(False, "fp32", 0.85, 0.01), _record(False, "int8-static", 0.85, 0.01)]
    rule = (0.02, 0.9, 0.1)
    good = [_record(True, "fp32", 0.84, 0.0), _record(True, "int8-static", 0.84, 0.95)]
    assert score(control + good, *rule)["passes"]
    weak = [_record(True, "fp32", 0.84, 0.0), _record(True, "int8-static", 0.84, 0.89)]
    assert not score(control + weak, *rule)["passes"]
    costly = [_record(True, "fp32", 0.82, 0.0), _record(True, "int8-static", 0.84, 0.99)]
    assert not score(control + costly, *rule)["passes"]
    awake = [_record(True, "fp32", 0.84, 0.6), _record(True, "int8-static", 0.84, 0.99)]
    assert not score(control + awake, *rule)["passes"]  # a plain backdoor is no QCB


def test_development_runs_train_on_the_runs_images_and_score_on_held_out_ones(rgb_npz, tmp_path):
    config = load_qcb_config(CONFIG).model_copy(
        update={"data_root": str(rgb_npz), "train_limit": 50, "eval_limit": 30}
    )
    write_development_data(config, tmp_path / "dev.npz")
    dev = config.model_copy(update={"data_root": str(tmp_path / "dev.npz"), "train_limit": None})
    used, developed = qcb_dataset(config), qcb_dataset(dev)
    np.testing.assert_array_equal(developed.x_train, used.x_train)  # the same training images
    # scored on the 30 test images after the 30 the reported table is scored on
    np.testing.assert_array_equal(developed.x_test, used.x_test[30:60])
    with pytest.raises(SystemExit, match="2 x eval_limit"):
        write_development_data(config.model_copy(update={"eval_limit": 100}), tmp_path / "x.npz")


def test_a_changed_setting_gets_its_own_folder():
    assert folder_name(11, {"boost_units": 5}) != folder_name(11, {"boost_units": 6})
    assert folder_name(11, {"a": 1, "b": 2}) == folder_name(11, {"b": 2, "a": 1})
    assert folder_name(11, {"a": 1}) != folder_name(12, {"a": 1})
