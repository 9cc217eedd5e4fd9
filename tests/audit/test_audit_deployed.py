"""The audit's deployment-differential check, STRIP on reversed triggers, budgets and CI output.

The differential check's scenario is a shipped file that is not the published float model: here
the vendor publishes the *clean* digits model and ships the *poisoned* one's INT8 file. Every
check of either file alone sees a plain model; only comparing them shows that the shipped file
answers a patch the float file does not.
"""

from __future__ import annotations

import json
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from defenses.base import DefenseData, DefenseResult, Group, Status
from harness.attacks.base import build_attack
from harness.audit.ci import exit_status, junit_xml
from harness.audit.run import (
    Artifact,
    AuditRequest,
    AuditVerdict,
    agreeing_signals,
    budget_params,
    overall_verdict,
)
from harness.cli.app import build_parser, main
from harness.data.base import load_dataset
from harness.runtime.adapter import RuntimeAdapter

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "examples" / "ci" / "github-audit.yml"
BUILT_IN_AUDIT_CHECKS = [
    "neural_cleanse",
    "activation_clustering",
    "spectral_signatures",
    "strip",
    "deployment_diff",
]


def _audit(model: Path, out: Path, *extra: str) -> int:
    return main(["audit", str(model), "--dataset", "digits", "--out", str(out), *extra])


def test_a_shipped_file_that_is_not_the_float_model_fails_the_job(digits_world, tmp_path, capsys):
    out = tmp_path / "audit"
    junit = tmp_path / "ci" / "junit.xml"
    code = _audit(
        digits_world.clean["fp32"],
        out,
        "--deployed",
        str(digits_world.poisoned["int8-static"]),
        "--defenses",
        "deployment_diff",
        "--fail-on",
        "suspicious",
        "--junit",
        str(junit),
    )
    assert code == 1, capsys.readouterr().err
    report = json.loads((out / "audit.json").read_text())
    published, shipped = report["cells"]
    assert published["defenses"]["deployment_diff"]["verdict"] == "not applicable"
    assert shipped["artifact"] == "deployed:int8-static.onnx"
    diff = shipped["defenses"]["deployment_diff"]
    assert diff["verdict"] == "suspicious" and diff["suspected_labels"] == [digits_world.target]
    assert diff["trigger_images"] and Path(diff["trigger_images"][0]).is_file()
    assert shipped["signals"] == {str(digits_world.target): ["deployment_diff"]}
    assert report["overall"]["verdict"] == "suspicious"
    assert report["deployed"][0]["precision"] == "int8-static"
    suite = ET.parse(junit).getroot()
    assert suite.get("failures") == "1" and suite.get("skipped") == "1"
    page = (out / "audit.html").read_text()
    assert "data:image/png;base64," in page and "deployed:int8-static.onnx" in page


def test_the_float_models_own_int8_file_passes(digits_world, tmp_path, capsys):
    code = _audit(
        digits_world.clean["fp32"],
        tmp_path / "audit",
        "--deployed",
        str(digits_world.clean["int8-static"]),
        "--precisions",
        "published,int4",
        "--defenses",
        "deployment_diff",
        "--fail-on",
        "suspicious",
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    verdicts = [c["defenses"]["deployment_diff"]["verdict"] for c in report["cells"]]
    assert verdicts == ["not applicable", "clean", "clean"]


def test_a_missing_deployed_file_is_one_line(digits_world, tmp_path, capsys):
    code = _audit(digits_world.clean["fp32"], tmp_path / "o", "--deployed", "missing.onnx")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--deployed file not found" in err and "\n" not in err


def test_two_deployed_files_of_one_name_are_refused(digits_world, tmp_path, capsys):
    shipped = str(digits_world.clean["int8-static"])
    code = _audit(
        digits_world.clean["fp32"], tmp_path / "o", "--deployed", shipped, "--deployed", shipped
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "two --deployed files" in err and "\n" not in err


def test_a_quantized_model_cannot_be_the_float_reference(digits_world, tmp_path, capsys):
    code = _audit(
        digits_world.clean["int8-static"],
        tmp_path / "o",
        "--deployed",
        str(digits_world.clean["int4"]),
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "already quantized" in err and "\n" not in err


def _trigger(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The conftest model's BadNet trigger as a Neural Cleanse mask and pattern."""
    attack = build_attack("badnet", {"patch_size": 2, "margin": 0, "target_label": 0})
    stamped = attack.apply_for_test(np.zeros((1, *shape), dtype=np.uint8))[0].astype(np.float32)
    return (stamped.max(axis=-1) > 0).astype(np.float32), stamped


def _nc_result(masks: np.ndarray, patterns: np.ndarray, flagged: list[int]) -> DefenseResult:
    result = DefenseResult(
        defense="neural_cleanse",
        group=Group.MODEL_INSPECTION,
        status=Status.OK,
        detected=bool(flagged),
        flagged_labels=flagged,
        details={
            "flagged_before_confirmation": flagged,
            "l1_norms": masks.sum(axis=(1, 2)).tolist(),
        },
    )
    result.arrays = {"masks": masks, "patterns": patterns}
    return result


def test_strip_judges_a_reversed_trigger_that_is_the_real_one(digits_world, tmp_path):
    """STRIP on a "reversed trigger" equal to the planted one fires; on an empty mask it
    does not: the wiring hands STRIP the stamped held-out images and the clean sample. When the
    control label's trigger fires too, STRIP cannot tell them apart: inconclusive."""
    from harness.audit.run import _strip_on_reversed_triggers

    dataset = load_dataset("digits")
    mask, pattern = _trigger(dataset.image_shape)
    masks = np.zeros((10, *mask.shape), dtype=np.float32)
    patterns = np.zeros((10, *pattern.shape), dtype=np.float32)
    masks[0], patterns[0] = mask, pattern
    sample = np.arange(0, len(dataset.y_test), 2)
    data = DefenseData(10, dataset.x_test[sample], dataset.y_test[sample])
    adapter = RuntimeAdapter.from_path(digits_world.poisoned["fp32"])
    request = AuditRequest(model=digits_world.poisoned["fp32"], dataset="digits", out=tmp_path)
    params = budget_params("quick", {})
    artifact = Artifact("published", "fp32", adapter)
    entry = _strip_on_reversed_triggers(
        request,
        params,
        artifact,
        dataset,
        sample,
        data,
        {"neural_cleanse": _nc_result(masks, patterns, [0, 3])},
        lambda _: None,
    )
    assert entry["per_label"]["0"]["verdict"] == "suspicious", entry
    assert entry["per_label"]["3"]["verdict"] == "clean", entry  # an empty mask is no trigger
    assert entry["verdict"] == "suspicious" and entry["suspected_labels"] == [0]
    strip = entry["per_label"]["0"]["result"]
    assert 150 < strip["details"]["n_triggered"] <= 200  # held-out images outside the sample
    assert entry["control"]["verdict"] == "clean" and entry["control"]["label"] not in (0, 3)
    everywhere = _nc_result(np.repeat(mask[None], 10, 0), np.repeat(pattern[None], 10, 0), [0])
    both = _strip_on_reversed_triggers(
        request, params, artifact, dataset, sample, data, {"neural_cleanse": everywhere}, print
    )
    assert both["control"]["verdict"] == "suspicious"
    assert both["verdict"] == "inconclusive" and "cannot tell" in both["reason"]
    unconfirmed = _nc_result(masks, patterns, [0])
    unconfirmed.flagged_labels = []  # flagged, then not confirmed on onnxruntime
    alone = _strip_on_reversed_triggers(
        request, params, artifact, dataset, sample, data, {"neural_cleanse": unconfirmed}, print
    )
    assert alone["verdict"] == "inconclusive" and "only corroborates" in alone["reason"]
    none = _strip_on_reversed_triggers(
        request, params, artifact, dataset, sample, data, {}, lambda _: None
    )
    assert none["verdict"] == "not applicable" and "neural_cleanse" in none["reason"]


def test_budgets_merge_under_explicit_parameters():
    assert budget_params("paper", {}) == {"neural_cleanse": {"torch_threads": 1}}
    quick = budget_params("quick", {"neural_cleanse": {"steps": 50, "torch_threads": 2}})
    assert quick["neural_cleanse"] == {"profile": "fast", "steps": 50, "torch_threads": 2}
    assert quick["strip"]["n_clean_fit"] == 100


def _report(*verdicts: str) -> dict:
    defenses = {f"d{i}": {"verdict": v, "rests_on": "x"} for i, v in enumerate(verdicts)}
    return {"model": {"path": "m.onnx"}, "cells": [{"artifact": "published", "defenses": defenses}]}


@pytest.mark.parametrize(
    ("verdicts", "fail_on", "code"),
    [
        (("clean", "suspicious"), "suspicious", 1),
        (("clean", "suspicious"), "never", 0),
        (("clean", "inconclusive"), "suspicious", 0),
        (("clean", "inconclusive"), "inconclusive", 3),
        (("error", "not applicable"), "inconclusive", 3),
        (("inconclusive", "suspicious"), "inconclusive", 1),
        (("clean", "not applicable"), "inconclusive", 0),
    ],
)
def test_exit_status(verdicts, fail_on, code):
    assert exit_status(_report(*verdicts), fail_on) == code


def test_junit_tells_the_same_story_as_the_exit_status():
    report = _report("clean", "suspicious", "inconclusive", "not applicable", "error")
    strict = ET.fromstring(junit_xml(report, "inconclusive").split("\n", 1)[1])
    assert (strict.get("tests"), strict.get("failures"), strict.get("errors")) == ("5", "2", "1")
    lenient = ET.fromstring(junit_xml(report, "suspicious").split("\n", 1)[1])
    assert (lenient.get("failures"), lenient.get("skipped")) == ("1", "2")


def test_signals_show_nc_confirmation_and_overall_verdict():
    entries = {
        "neural_cleanse": {
            "verdict": AuditVerdict.SUSPICIOUS,
            "suspected_labels": [0],
            "confirmation": {"threshold": 0.9, "confirmed": [0], "unconfirmed": [4]},
        },
        "strip": {"verdict": AuditVerdict.SUSPICIOUS, "suspected_labels": [0]},
        "deployment_diff": {"verdict": AuditVerdict.CLEAN},
    }
    assert agreeing_signals(entries) == {
        "0": ["neural_cleanse (confirmed on onnxruntime)", "strip"],
        "4": ["neural_cleanse (not confirmed on onnxruntime)"],
    }
    cells = [{"artifact": "int4", "defenses": entries}]
    assert overall_verdict(cells) == {
        "verdict": "suspicious",
        "from": ["int4 neural_cleanse", "int4 strip"],
    }


def _workflow_commands() -> list[list[str]]:
    """The ``blindspots`` command lines of the example job (backslash continuations joined)."""
    text = WORKFLOW.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("blindspots ")]


def test_the_ci_example_uses_flags_the_cli_has():
    commands = _workflow_commands()
    audit = next(c for c in commands if c[0] == "audit")
    parser = build_parser()
    for command in commands:
        parser.parse_args([arg.replace("$DATASET", "digits") for arg in command])
    args = parser.parse_args(audit)
    assert (args.fail_on, args.budget, args.junit) == ("suspicious", "quick", "audit-junit.xml")
    yaml = pytest.importorskip("yaml")
    job = yaml.safe_load(WORKFLOW.read_text())["jobs"]["audit"]
    assert job["runs-on"] == "ubuntu-latest"


def test_default_checks_end_to_end_record_confirmation_strip_and_signals(
    digits_world, tmp_path, capsys
):
    params = tmp_path / "params.json"
    small = {"steps": 30, "n_samples": 32, "batch_size": 16, "parity_samples": 32}
    params.write_text(json.dumps({"neural_cleanse": small}))
    out = tmp_path / "audit"
    code = _audit(
        digits_world.poisoned["fp32"],
        out,
        "--deployed",
        str(digits_world.poisoned["int8-static"]),
        "--budget",
        "quick",
        "--defense-params",
        str(params),
        "--fail-on",
        "never",
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "audit.json").read_text())
    assert report["budget"]["defense_params"]["neural_cleanse"]["profile"] == "fast"
    assert report["budget"]["defense_params"]["neural_cleanse"]["steps"] == 30
    for cell in report["cells"]:
        checks = cell["defenses"]
        built_in = [name for name in checks if name in BUILT_IN_AUDIT_CHECKS]
        assert built_in == BUILT_IN_AUDIT_CHECKS  # (a plugin test may register more)
        nc = checks["neural_cleanse"]
        assert nc["verdict"] in {"suspicious", "clean", "inconclusive"}, nc
        confirmation = nc["confirmation"]
        assert confirmation["threshold"] == 0.9
        assert set(confirmation["confirmed"]) <= set(confirmation["flagged"])
        strip = checks["strip"]
        if confirmation["flagged"]:
            assert set(strip["per_label"]) == {str(k) for k in confirmation["flagged"]}
        else:
            assert strip["verdict"] == "not applicable" and "no suspect" in strip["reason"]
        assert isinstance(cell["signals"], dict)
    assert report["cells"][1]["defenses"]["deployment_diff"]["verdict"] == "clean"
    text = (out / "audit.md").read_text()
    assert "Which signals agree" in text and "budget `quick`" in text
    assert "Neural Cleanse mask L1 norms" in (out / "audit.html").read_text()
