"""The grid's wall-time split counts each model's training once and every defense per cell."""

from __future__ import annotations

import pytest

from bench.pipeline.grid_timing import main, render, timing_split
from harness.core.errors import BlindspotsError


def _record(seed: int, poisoned: bool, precision: str, nc_s: float) -> dict:
    return {
        "dataset": "npz",
        "model": "cifar_cnn",
        "seed": seed,
        "poisoned": poisoned,
        "precision": precision,
        "timings": {
            "train_s": 100.0,
            "export_s": 10.0,
            "quantize_int8-static_s": 1.5,
            "evaluate_s": 2.0,
        },
        "defenses": {
            "neural_cleanse": {"wall_time_s": nc_s},
            "strip": {"wall_time_s": 5.0},
            "fine_pruning": {"wall_time_s": None},
        },
    }


def test_training_counts_once_per_model_and_defenses_per_cell():
    records = [
        _record(0, True, "fp32", 30.0),
        _record(0, True, "int8-static", 50.0),
        _record(0, False, "fp32", 20.0),
    ]
    split = timing_split(records)
    assert split["models"] == 2 and split["cells"] == 3
    totals = split["totals_s"]
    assert totals["train_s"] == 200.0  # two models, not three cells
    assert totals["export_quantize_s"] == 23.0  # export + every precision's quantization
    assert totals["evaluate_s"] == 6.0
    assert totals["neural_cleanse_s"] == 100.0 and totals["strip_s"] == 15.0
    assert split["mean_s"]["neural_cleanse"] == {"fp32": 25.0, "int8-static": 50.0}
    assert "fine_pruning" not in split["mean_s"]  # no time recorded is not 0 s
    table = render(split)
    assert "| neural_cleanse | 25.0 | 50.0 |" in table and "| strip | 5.0 | 5.0 |" in table


def test_models_of_different_architectures_are_counted_apart():
    a = _record(0, True, "fp32", 1.0)
    b = {**_record(0, True, "fp32", 1.0), "model": "resnet18"}
    assert timing_split([a, b])["models"] == 2


def test_empty_or_missing_store_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(BlindspotsError, match="no finished cells"):
        timing_split([])
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "holds no results.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()
