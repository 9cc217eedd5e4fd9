"""Protocol §4.6's armed-cell rule and rates (bench/qcb/differential_metrics.py)."""

from __future__ import annotations

import json

import pytest

from bench.qcb.differential_metrics import metrics, render


def _row(seed, poisoned, precision, asr, verdict=None, score=None, hit=False):
    dd = (
        {"status": "not_applicable"}
        if precision == "fp32"
        else {
            "status": "ok",
            "verdict": verdict,
            "score": score,
            "target_hit": hit,
            "details": {"best_is_stimulus": False},
        }
    )
    return {
        "dataset": "digits",
        "model": "small_cnn",
        "attack": "qcb",
        "seed": seed,
        "poisoned": poisoned,
        "precision": precision,
        "asr": asr,
        "defenses": {"deployment_diff": dd},
    }


def test_armed_rule_rates_and_exact_test(tmp_path):
    rows = []
    # seeds 1-3 armed at int4 (FP32 asleep); seed 4's FP32 is already awake: unarmed
    for seed, (fp32, int4, verdict, score, hit) in {
        1: (0.05, 0.9, "detected", 0.7, True),
        2: (0.05, 0.8, "not_detected", 0.4, False),
        3: (0.10, 0.6, "detected", 0.6, True),
        4: (0.30, 0.9, "detected", 0.9, True),
    }.items():
        rows += [
            _row(seed, True, "fp32", fp32),
            _row(seed, True, "int4", int4, verdict, score, hit),
        ]
        rows += [_row(seed, True, "int8-static", fp32, "not_detected", 0.01)]
        rows += [_row(seed, False, "fp32", 0.0)]
        rows += [
            _row(
                seed,
                False,
                "int4",
                0.0,
                "detected" if seed == 4 else "not_detected",
                0.55 if seed == 4 else 0.1 * seed,
            )
        ]
        rows += [_row(seed, False, "int8-static", 0.0, "not_detected", 0.0)]
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "qcb_config.json").write_text(json.dumps({"qcb": {"targets": ["int4"]}}))
    result = metrics(tmp_path)
    int4 = result["precisions"]["int4"]
    assert (int4["detection"]["k"], int4["detection"]["n"]) == (2, 3)
    assert int4["unarmed"] == [{"seed": 4, "asr": 0.9, "fp32_asr": 0.3}]
    assert (int4["false_alarm"]["k"], int4["false_alarm"]["n"]) == (1, 4)
    # QCB scores 0.7, 0.4, 0.6 vs clean 0.1, 0.2, 0.3, 0.55: 11 of 12 pairs won
    assert int4["auroc"]["value"] == pytest.approx(11 / 12)
    assert int4["auroc"]["holm_family"] == 1
    # int8-static is not a target: no detection rate, no AUROC, controls still count
    static = result["precisions"]["int8-static"]
    assert static["detection"] is None and static["auroc"] is None
    assert (static["false_alarm"]["k"], static["false_alarm"]["n"]) == (0, 4)
    table = render(result)
    assert "| int4 | 2/3 [" in table and "| int8-static | — | 0/4 [" in table
    assert len(metrics(tmp_path, {1, 2})["precisions"]["int4"]["unarmed"]) == 0
