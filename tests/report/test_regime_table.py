"""bench/pipeline/regime_table.py: every poisoned cell's regime columns, valid attack or not."""

from __future__ import annotations

import json

from bench.pipeline.regime_table import table

KEY = {"dataset": "npz", "model": "cifar_cnn", "attack": "badnet"}


def test_regime_columns_come_from_the_records_even_below_the_validity_bar(tmp_path):
    ss = {
        "status": "ok",
        "verdict": "not_detected",
        "flagged_labels": [],
        "details": {
            "target_class": {"poison_fraction_of_class": 0.148},
            "removed_fraction": 0.225,
            "filtering": {"poison_recall": 0.82},
        },
    }
    ac = {
        "status": "ok",
        "verdict": "detected",
        "flagged_labels": [2, 7],
        "details": {
            "target_class": {
                "smaller_cluster_poison_fraction": 0.97,
                "smaller_cluster_poison_recall": 0.86,
            }
        },
    }
    rows = [
        {
            **KEY,
            "seed": 0,
            "poisoned": True,
            "precision": "fp32",
            "asr": 0.882,
            "defenses": {"activation_clustering": ac, "spectral_signatures": ss},
        },
        {
            **KEY,
            "seed": 0,
            "poisoned": False,
            "precision": "fp32",
            "asr": 0.0,
            "defenses": {"activation_clustering": ac, "spectral_signatures": ss},
        },
    ]
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    lines = table(tmp_path).splitlines()
    assert len(lines) == 3  # header, rule, the one poisoned cell (clean controls have no regime)
    assert lines[2] == "| 0 | fp32 | 0.882 | 0.148 | 0.225 | 0.820 | [] | 0.970 | 0.860 | [2, 7] |"
