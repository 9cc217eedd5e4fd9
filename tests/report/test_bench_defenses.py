"""bench_defenses reads Neural Cleanse's whole budget from the config and finds its model."""

from __future__ import annotations

import pytest

from bench.defenses.bench_defenses import GRID_NC, default_artifacts
from defenses.neural_cleanse import NeuralCleanseParams


def test_grid_budget_has_every_key_the_extrapolation_reads():
    # the config names the authors' step content (profile "paper", docs/protocol.md v1);
    # steps comes from the paper's default
    paper = NeuralCleanseParams(profile="paper")
    expected = {"steps": paper.steps, "n_samples": paper.n_samples, "batch_size": paper.batch_size}
    assert expected == GRID_NC == {"steps": 1000, "n_samples": 1000, "batch_size": 32}


def test_the_one_trained_model_is_found_and_none_or_two_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="no trained model under"):
        default_artifacts(tmp_path)
    (tmp_path / "artifacts" / "aaa" / "poisoned").mkdir(parents=True)
    assert default_artifacts(tmp_path) == tmp_path / "artifacts" / "aaa" / "poisoned"
    (tmp_path / "artifacts" / "bbb" / "poisoned").mkdir(parents=True)
    with pytest.raises(SystemExit, match="2 trained models"):
        default_artifacts(tmp_path)
