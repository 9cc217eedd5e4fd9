"""Audit verdicts read against the project's own clean controls (issue 18 item 3)."""

from __future__ import annotations

import json

import pytest

from harness.audit.controls import (
    ControlReference,
    control_context,
    describe,
    find_reference,
    load_reference,
    packaged_references,
    percentile,
)
from harness.core.errors import BlindspotsError


def _entry(verdict: str, suspects=(), score=None) -> dict:
    return {
        "verdict": verdict,
        "suspected_labels": list(suspects),
        "score": score,
        "score_name": "max_anomaly_index_below_median",
    }


def _reference(**overrides) -> ControlReference:
    models = [
        {
            "seed": 0,
            "poisoned": False,
            "artifacts": {"fp32": {"nc": _entry("suspicious", [3], 2.5)}},
        },
        {"seed": 1, "poisoned": False, "artifacts": {"fp32": {"nc": _entry("clean", [], 1.0)}}},
        {
            "seed": 2,
            "poisoned": False,
            "artifacts": {"fp32": {"nc": _entry("inconclusive", [1], 1.5)}},
        },
        {"seed": 3, "poisoned": False, "artifacts": {"int4": {"nc": _entry("clean", [], 0.5)}}},
        {
            "seed": 0,
            "poisoned": True,
            "target_label": 0,
            "artifacts": {"fp32": {"nc": _entry("suspicious", [0], 3.0)}},
        },
        {
            "seed": 1,
            "poisoned": True,
            "target_label": 0,
            "artifacts": {"fp32": {"nc": _entry("suspicious", [4], 2.2)}},
        },
    ]
    raw = {
        "schema": 1,
        "dataset": "digits",
        "model_family": "small_cnn",
        "budget": "quick",
        "attack": {"name": "badnet", "params": {}},
        "provenance": {},
        "models": models,
    }
    return ControlReference.model_validate({**raw, **overrides})


def test_rates_count_decided_runs_and_keep_inconclusive_apart():
    context = control_context(_reference(), "fp32", "nc", score=1.5)
    fa = context["false_alarm"]
    assert (fa["k"], fa["n"], fa["inconclusive"]) == (1, 2, 1)  # seed 3 is another precision
    assert fa["ci"][0] < 0.5 < fa["ci"][1]
    det = context["detection"]
    assert (det["k"], det["n"]) == (1, 2)  # a suspect that is not the target is no detection
    # clean scores 2.5, 1.0, 1.5: one below 1.5, one tie (half) -> 1.5 / 3
    assert context["score_percentile"] == pytest.approx(0.5)
    assert context["n_clean_scores"] == 3
    line = describe(context)
    assert line.startswith(
        "false alarms 1/2 clean controls (+1 inconclusive); detected 1/2 poisoned"
    )
    assert "score at the 50th percentile of 3 clean scores" in line and line.endswith(
        "[digits/small_cnn/quick]"
    )


def test_a_precision_or_defense_the_reference_never_ran_is_none_known():
    context = control_context(_reference(), "int8-static", "nc", score=2.0)
    assert "none_known" in context and "int8-static" in context["none_known"]
    assert describe(context).startswith("none known: ")
    assert describe(None) == "—"


def test_percentile_is_mid_rank():
    assert percentile(5.0, [1.0, 2.0, 3.0, 4.0]) == 1.0
    assert percentile(0.0, [1.0, 2.0]) == 0.0
    assert percentile(2.0, [1.0, 2.0, 2.0, 3.0]) == pytest.approx(0.5)


def test_a_reference_applies_only_to_its_dataset_family_and_budget():
    refs = [_reference()]
    assert find_reference(refs, "digits", "small_cnn", "quick")[0] is refs[0]
    none, why = find_reference(refs, "digits", None, "quick")
    assert none is None and "--model-family" in why
    none, why = find_reference(refs, "digits", "resnet18", "quick")
    assert none is None and "known: digits/small_cnn/quick" in why
    none, why = find_reference(refs, "digits", "small_cnn", "paper")
    assert none is None and "budget paper" in why


def test_bad_reference_files_are_one_line_errors(tmp_path):
    with pytest.raises(BlindspotsError, match="not found"):
        load_reference(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(BlindspotsError, match="is not JSON"):
        load_reference(bad)
    bad.write_text(json.dumps({"schema": 1, "dataset": "digits"}))
    with pytest.raises(BlindspotsError, match="is not a control reference") as info:
        load_reference(bad)
    assert "\n" not in str(info.value)
    good = tmp_path / "good.json"
    good.write_text(_reference().model_dump_json(by_alias=True))
    assert load_reference(good).dataset == "digits"


def test_packaged_references_load():
    for reference in packaged_references():
        assert reference.models and reference.provenance.get("git_commit")
        assert any(not m.poisoned for m in reference.models)


def test_no_decided_control_run_is_none_known():
    ref = _reference()
    for model in ref.models:
        for entries in model.artifacts.values():
            for entry in entries.values():
                entry.verdict = "not applicable"
    context = control_context(ref, "fp32", "nc", score=1.0)
    assert "false_alarm" not in context
    assert "never ran nc at fp32" in context["none_known"]
    ref.models[0].artifacts["fp32"]["nc"].verdict = "inconclusive"
    context = control_context(ref, "fp32", "nc", score=1.0)
    assert "1 of the reference's 3 clean controls were inconclusive" in context["none_known"]
    assert describe(context).startswith("none known: ")


def test_the_audit_reads_each_verdict_against_a_matching_reference(tmp_path):
    """End to end: ``--model-family`` + ``--controls`` put the rates beside the verdict, in
    audit.json, audit.md and audit.html; without a family each verdict says none is known."""
    import onnx

    from harness.cli.app import main
    from tests.audit.test_audit import COLLAPSED, NC_SMALL
    from tests.foreign_models import cli_flags, foreign_corpus

    case = next(c for c in foreign_corpus() if c.channels == 1 and c.name not in COLLAPSED)
    model_path = tmp_path / "vendor" / f"{case.name}.onnx"
    model_path.parent.mkdir()
    onnx.save(case.model, str(model_path))
    params = tmp_path / "params.json"
    params.write_text(json.dumps(NC_SMALL))
    reference = _reference(model_family="toy", budget="paper").model_dump(by_alias=True)
    for model in reference["models"]:  # the corpus file's published precision is fp32
        model["artifacts"] = {
            "fp32": {
                "neural_cleanse": next(
                    iter(model["artifacts"].get("fp32", {"x": _entry("clean", [], 0.1)}).values())
                )
            }
        }
    controls = tmp_path / "toy.json"
    controls.write_text(json.dumps(reference))

    def audit(out, *extra):
        flags = [
            "--dataset",
            "digits",
            "--defenses",
            "neural_cleanse",
            "--defense-params",
            str(params),
            "--sample-size",
            "60",
            "--out",
            str(out),
            *extra,
        ]
        assert main(["audit", str(model_path), *flags, *cli_flags(case.overrides)]) == 0
        return json.loads((out / "audit.json").read_text())

    report = audit(tmp_path / "with", "--model-family", "toy", "--controls", str(controls))
    nc = report["cells"][0]["defenses"]["neural_cleanse"]
    fa = nc["clean_controls"]["false_alarm"]
    assert (fa["k"], fa["n"], fa["inconclusive"]) == (1, 3, 1)  # seed 3 now fp32 "clean" too
    assert report["clean_controls"]["reference"] == "digits/toy/paper"
    md = (tmp_path / "with" / "audit.md").read_text()
    assert "on the project's clean controls" in md and "false alarms 1/3 clean controls" in md
    assert "Clean controls: reference `digits/toy/paper` (6 models" in md
    assert "false alarms 1/3 clean controls" in (tmp_path / "with" / "audit.html").read_text()

    report = audit(tmp_path / "without")
    assert "--model-family" in report["clean_controls"]["none_known"]
    nc = report["cells"][0]["defenses"]["neural_cleanse"]
    assert "--model-family" in nc["clean_controls"]["none_known"]
    assert "Clean controls: none known" in (tmp_path / "without" / "audit.md").read_text()


def test_benchmarks_quotes_the_packaged_reference_as_the_tool_prints_it():
    """BENCHMARKS.md's table is the summary of the packaged file, not a hand-made copy."""
    from pathlib import Path

    from harness.audit.controls import summary_table

    root = Path(__file__).resolve().parents[2]
    reference = load_reference(root / "harness/audit/references/digits-small_cnn-quick.json")
    assert summary_table(reference) in (root / "BENCHMARKS.md").read_text()
    assert find_reference([reference], "digits", "small_cnn", "quick")[0] is reference
