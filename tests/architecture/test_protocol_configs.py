"""The configs say what docs/protocol.md v1 fixes: the authors' NC step in every paper config,
and the operating-regime arm's setup (§6) exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from defenses.neural_cleanse import NeuralCleanseParams
from harness.pipeline.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "grids"


@pytest.mark.parametrize(
    "name",
    [
        "gtsrb_badnet.toml",
        "paper-gtsrb-small.toml",
        "paper-gtsrb.toml",
        "paper-cifar10-small.toml",
        "paper-cifar10.toml",
        "regime-gtsrb-small.toml",
    ],
)
def test_every_paper_config_runs_neural_cleanse_at_the_authors_step(name):
    params = NeuralCleanseParams(
        **load_config(CONFIGS / name).defense_params.get("neural_cleanse", {})
    )
    assert (params.profile, params.n_samples, params.batch_size) == ("paper", 1000, 32)
    assert not params.custom_step and params.confirm_threshold == 0.9


def test_the_regime_arm_is_the_protocols():
    config = load_config(CONFIGS / "regime-gtsrb-small.toml")
    reference = load_config(CONFIGS / "paper-gtsrb-small.toml")
    assert config.attack_params["target_label"] == 2 and config.attack_params["poison_rate"] == 0.01
    assert config.seeds == [0, 1, 2]
    assert config.defense_params["spectral_signatures"] == {"epsilon": 0.15}
    # everything else is the S1 recipe
    same = ("dataset", "model", "attack", "precisions", "defenses", "training", "calibration_size")
    for key in (*same, "defense_clean_size", "defense_train_size", "finetune_epochs"):
        assert getattr(config, key) == getattr(reference, key), key
    trigger = {
        k: v for k, v in config.attack_params.items() if k not in ("target_label", "poison_rate")
    }
    assert trigger == {
        k: v for k, v in reference.attack_params.items() if k not in ("target_label", "poison_rate")
    }
    # 1% of GTSRB's 39,209 training images, all from other classes, onto its 2,250-image class 2
    poisoned = int(0.01 * 39_209 + 0.5)
    assert poisoned == 392 and round(poisoned / (poisoned + 2_250), 3) == 0.148
