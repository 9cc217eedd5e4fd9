"""``report.json``'s published schema: current, enforced on write, and strict where it matters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.core.errors import BlindspotsError
from harness.report.document import check_schema
from harness.report.schema import json_schema

ROOT = Path(__file__).resolve().parents[2]

RUN = {
    "dataset": "digits", "model": "small_cnn", "attack": "badnet", "seed": 0,
    "poisoned": True, "precision": "int8-static", "clean_acc": 0.98, "asr": 1.0,
    "agreement_fp32": 0.99,
    "defenses": {"strip": {"defense": "strip", "group": "input_filtering", "status": "ok",
                           "verdict": "detected", "detected": True}},
}  # fmt: skip
ROW = {
    "dataset": "digits", "model": "small_cnn", "attack": "badnet", "precision": "int8-static",
    "poisoned": True, "n_seeds": 1, "clean_acc_mean": 0.98, "clean_acc_std": None,
    "asr_mean": 1.0, "asr_std": None, "agreement_fp32_mean": 0.99, "agreement_fp32_std": None,
    "defenses": {"strip": {"ok": 1, "errors": 0, "not_applicable": 0, "decided": 1,
                           "detected": 1, "inconclusive": 0}},
}  # fmt: skip


def _document(**changes) -> str:
    doc = {"schema_version": 1, "config": {}, "environment": {}, "runs": [RUN], "summary": [ROW]}
    doc.update(changes)
    return json.dumps(doc)


def test_the_committed_json_schema_is_the_one_the_models_generate():
    assert (ROOT / "docs" / "report.schema.json").read_text() == json_schema()


def test_a_document_of_the_documented_shape_passes():
    check_schema(_document())


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"schema_version": 2}, "schema_version"),
        ({"runs": [{**RUN, "clean_acc": "high"}]}, "clean_acc"),
        ({"runs": [{k: v for k, v in RUN.items() if k != "asr"}]}, "asr"),
        ({"runs": [{**RUN, "defenses": {"strip": {**RUN["defenses"]["strip"], "verdict": "yes"}}}]},
         "verdict"),
    ],
)  # fmt: skip
def test_a_document_that_breaks_the_schema_is_refused_in_one_line(changes, field):
    with pytest.raises(BlindspotsError) as info:
        check_schema(_document(**changes))
    assert field in str(info.value) and "\n" not in str(info.value)
