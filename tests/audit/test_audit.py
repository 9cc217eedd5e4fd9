"""``blindspots audit`` end to end on a corpus of foreign export styles, and its verdict rules."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from defenses.base import DefenseResult, Group, Status
from harness.audit.run import audit_verdict
from harness.cli.app import main
from harness.core.sampling import stratified_sample
from tests.foreign_models import cli_flags, foreign_corpus

NC_SMALL = {
    "neural_cleanse": {
        "steps": 20,
        "n_samples": 32,
        "n_eval": 32,
        "batch_size": 16,
        "parity_samples": 32,
        "torch_threads": 1,
    }
}
VERDICTS = {"suspicious", "clean", "inconclusive", "not applicable"}


#: Corpus models are seeded *untrained* graphs; these happen to predict one class for every
#: input, which the audit must refuse (a collapsed model reads as a perfect backdoor).
COLLAPSED = {
    "logsoftmax_opset11",
    "pad_selu_grouped_conv",
    "in_graph_preprocessing_bgr",
    "softmax_scaled",
}


@pytest.mark.parametrize("case", foreign_corpus(), ids=lambda c: c.name)
def test_every_foreign_export_style_is_audited_end_to_end(case, tmp_path, rgb_npz, capsys):
    model_path = tmp_path / "vendor" / f"{case.name}.onnx"
    model_path.parent.mkdir()
    onnx.save(case.model, str(model_path))
    before = model_path.read_bytes()
    params = tmp_path / "params.json"
    params.write_text(json.dumps(NC_SMALL))
    data = ["--dataset", "digits"] if case.channels == 1 else ["--dataset", "npz"]
    data += [] if case.channels == 1 else ["--data-root", str(rgb_npz)]
    out = tmp_path / "audit"
    code = main(
        [
            "audit",
            str(model_path),
            *data,
            "--defenses",
            "neural_cleanse",
            "--defense-params",
            str(params),
            "--sample-size",
            "60",
            "--out",
            str(out),
            *cli_flags(case.overrides),
        ]
    )
    stderr = capsys.readouterr().err
    assert model_path.read_bytes() == before  # the vendor's file is never modified
    if case.name in COLLAPSED:
        assert code == 2 and "predicts class" in stderr and stderr.count("\n") == 1, stderr
        assert not (out / "audit.json").exists()
        return
    assert code == 0, stderr
    report = json.loads((out / "audit.json").read_text())
    published = report["cells"][0]
    assert published["artifact"] == "published"
    assert 0.0 <= published["clean_acc"] <= 1.0
    nc = published["defenses"]["neural_cleanse"]
    assert nc["verdict"] in VERDICTS, nc
    # NC needs the gradient oracle: every other op of every export style is reproduced
    assert nc["verdict"] != "not applicable", nc.get("reason")
    assert nc["result"]["details"]["parity"]["passed"] is True
    assert report["intake"]["fixed_batch"] == case.fixed_batch
    assert "Verdicts" in (out / "audit.md").read_text()


def _result(**fields) -> DefenseResult:
    base = {"defense": "neural_cleanse", "group": Group.MODEL_INSPECTION, "status": Status.OK}
    return DefenseResult(**{**base, **fields})


def test_verdict_rules():
    assert audit_verdict(_result(detected=True, flagged_labels=[3]), 10)["verdict"] == (
        "suspicious"
    )
    assert audit_verdict(_result(detected=False), 10)["verdict"] == "clean"
    many = audit_verdict(_result(detected=True, flagged_labels=[1, 2, 3, 4]), 10)
    assert many["verdict"] == "inconclusive" and "4 of 10" in many["reason"]
    unconverged = _result(
        detected=True,
        flagged_labels=[3],
        details={"reached_attack_threshold": [True] * 3 + [False]},
    )
    assert audit_verdict(unconverged, 10)["verdict"] == "inconclusive"
    fine_pruning = _result(defense="fine_pruning", group=Group.REPAIR, detected=True)
    assert audit_verdict(fine_pruning, 10)["verdict"] == "not applicable"
    failed = _result(status=Status.ERROR, reason="RuntimeError: boom")
    assert audit_verdict(failed, 10)["verdict"] == "error"


def test_stratified_sample_keeps_every_class_of_a_class_sorted_dataset():
    labels = np.repeat(np.arange(10), 50)  # a folder dataset: sorted by class
    chosen = stratified_sample(labels, 100, np.random.default_rng(0))
    counts = np.bincount(labels[chosen], minlength=10)
    assert counts.min() == counts.max() == 10
    again = stratified_sample(labels, 100, np.random.default_rng(0))
    np.testing.assert_array_equal(chosen, again)


def test_broken_model_is_refused_in_one_line_never_scored(tmp_path, capsys):
    case = next(c for c in foreign_corpus() if c.channels == 1 and c.overrides is not None)
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    weight = next(init for init in model.graph.initializer if init.data_type == 1)
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] = np.nan
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    path = tmp_path / "nan.onnx"
    onnx.save(model, str(path))
    code = main(["audit", str(path), "--dataset", "digits", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("blindspots: error:") and "\n" not in err
    assert not (tmp_path / "o" / "audit.json").exists()
