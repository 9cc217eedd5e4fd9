"""End-to-end runner: report schema, determinism, resume after a crash, plug-in defenses."""

from __future__ import annotations

import json
import shutil
from typing import ClassVar

import numpy as np
import pytest
from pydantic import BaseModel

from defenses.base import DEFENSES, Defense, DefenseData, Finding, Group, Need
from harness.pipeline.config import build_config
from harness.pipeline.runner import run_experiment
from harness.pipeline.store import ResultStore
from harness.report.document import write_report

CONFIG = {
    "dataset": "digits",
    "model": "small_cnn",
    "attack_params": {"patch_size": 3, "poison_rate": 0.1, "target_label": 0},
    "training": {"epochs": 10, "batch_size": 64},
    "precisions": ["fp32", "int8-static"],
    "defenses": ["probe_mean"],
    "threads": 1,
}


class ProbeParams(BaseModel):
    fail_on_precision: str | None = None


@DEFENSES.register("probe_mean")
class ProbeMean(Defense):
    """Test plug-in: mean penultimate activation; proves registration is the only step needed."""

    name = "probe_mean"
    group = Group.MODEL_INSPECTION
    needs: ClassVar[frozenset[Need]] = frozenset({Need.ACTIVATIONS})
    Params = ProbeParams
    paper = "n/a"
    interrupt_after: ClassVar[int | None] = None
    calls: ClassVar[int] = 0

    def _run(self, adapter, data: DefenseData, rng: np.random.Generator) -> Finding:
        # Count only the cell's own run: on a host whose INT8 kernels differ from the exact ones
        # the runner reruns each quantized cell under the host profile too (kernel drift), and
        # the interrupt must land at the same cell whatever CPU runs the test.
        if adapter.kernel_profile == "exact":
            ProbeMean.calls += 1
        if ProbeMean.interrupt_after is not None and ProbeMean.calls > ProbeMean.interrupt_after:
            raise KeyboardInterrupt  # a kill mid-run, not a defense failure
        if adapter.precision == self.params.fail_on_precision:
            raise RuntimeError("planted failure")
        mean = float(adapter.activations(data.clean_x[:32], ["penultimate"])["penultimate"].mean())
        return Finding(detected=False, score=mean, score_name="mean activation")


@DEFENSES.register("capture_data")
class CaptureData(Defense):
    """Test plug-in: records the DefenseData the runner hands to defenses."""

    name = "capture_data"
    group = Group.REPAIR
    needs: ClassVar[frozenset[Need]] = frozenset()
    Params = ProbeParams
    paper = "n/a"
    seen: ClassVar[list[DefenseData]] = []

    def _run(self, adapter, data: DefenseData, rng: np.random.Generator) -> Finding:
        CaptureData.seen.append(data)
        return Finding(detected=False)


def _table(folder) -> list[tuple]:
    report = json.loads((folder / "report.json").read_text())
    return [
        (
            r["seed"],
            r["poisoned"],
            r["precision"],
            r["clean_acc"],
            r["asr"],
            r["agreement_fp32"],
            r["defenses"]["probe_mean"]["score"],
        )
        for r in report["runs"]
    ]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run_a")
    run_experiment(build_config(CONFIG), out, log=lambda _: None)
    write_report(out)
    return out


def test_report_has_every_cell_and_the_documented_fields(first_run):
    report = json.loads((first_run / "report.json").read_text())
    assert report["schema_version"] == 1
    cells = {(r["poisoned"], r["precision"]) for r in report["runs"]}
    assert cells == {(True, "fp32"), (True, "int8-static"), (False, "fp32"), (False, "int8-static")}
    for run in report["runs"]:
        for key in (
            "dataset",
            "model",
            "attack",
            "seed",
            "clean_acc",
            "asr",
            "agreement_fp32",
            "artifacts",
            "timings",
        ):
            assert key in run
        assert run["defenses"]["probe_mean"]["status"] == "ok"
    by_cell = {(r["poisoned"], r["precision"]): r for r in report["runs"]}
    assert by_cell[(True, "fp32")]["asr"] > 0.9
    assert by_cell[(False, "fp32")]["asr"] < 0.2
    assert by_cell[(True, "fp32")]["clean_acc"] > 0.9
    assert by_cell[(True, "fp32")]["agreement_fp32"] == 1.0
    assert report["environment"]["onnxruntime"]
    assert "cpu_isa" in report["environment"]
    markdown = (first_run / "report.md").read_text()
    assert "| int8-static | poisoned |" in markdown
    assert (first_run / "plots" / "accuracy_asr.png").stat().st_size > 1000


def test_same_config_and_seed_give_the_same_table(first_run, tmp_path):
    run_experiment(build_config(CONFIG), tmp_path, log=lambda _: None)
    write_report(tmp_path)
    assert _table(tmp_path) == _table(first_run)


def test_a_crash_mid_run_loses_no_finished_cell_and_resume_completes(first_run, tmp_path):
    shutil.copytree(first_run / "artifacts", tmp_path / "artifacts")  # skip retraining
    ProbeMean.calls, ProbeMean.interrupt_after = 0, 2
    try:
        with pytest.raises(KeyboardInterrupt):
            run_experiment(build_config(CONFIG), tmp_path, log=lambda _: None)
    finally:
        ProbeMean.interrupt_after = None
    assert len(ResultStore(tmp_path).records()) == 2
    logs: list[str] = []
    run_experiment(build_config(CONFIG), tmp_path, log=logs.append)
    assert sum("already in the store" in line for line in logs) == 2
    write_report(tmp_path)
    assert sorted(_table(tmp_path)) == sorted(_table(first_run))


def test_a_failing_defense_is_reported_as_error_not_as_not_detected(first_run, tmp_path):
    shutil.copytree(first_run / "artifacts", tmp_path / "artifacts")
    config = build_config(
        {**CONFIG, "defense_params": {"probe_mean": {"fail_on_precision": "int8-static"}}}
    )
    run_experiment(config, tmp_path, log=lambda _: None)
    write_report(tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    for run in report["runs"]:
        result = run["defenses"]["probe_mean"]
        if run["precision"] == "int8-static":
            assert result["status"] == "error"
            assert result["detected"] is None
            assert "planted failure" in result["reason"]
        else:
            assert result["status"] == "ok"
    assert "1 error" in (tmp_path / "report.md").read_text()


def test_resuming_with_a_different_config_is_refused(first_run):
    from harness.core.errors import BlindspotsError

    changed = build_config({**CONFIG, "precisions": ["fp32"]})
    with pytest.raises(BlindspotsError, match="holds results of a different config"):
        run_experiment(changed, first_run, log=lambda _: None)


def test_torn_last_line_is_ignored(tmp_path):
    store = ResultStore(tmp_path)
    record = {
        "dataset": "d",
        "model": "m",
        "attack": "a",
        "seed": 0,
        "poisoned": True,
        "precision": "fp32",
    }
    store.append(record)
    with store.path.open("a") as fh:
        fh.write('{"dataset": "d", "mod')  # killed while writing
    assert store.records() == [record]


def test_fine_pruning_tunes_on_clean_training_images_not_on_the_measured_ones(first_run, tmp_path):
    shutil.copytree(first_run / "artifacts", tmp_path / "artifacts")
    CaptureData.seen.clear()
    config = build_config({**CONFIG, "precisions": ["fp32"], "defenses": ["capture_data"]})
    run_experiment(config, tmp_path, log=lambda _: None)
    poisoned_cell = next(d for d in CaptureData.seen if d.target_label is not None)
    tune_x = poisoned_cell.retrainer.clean_x
    measured = {row.tobytes() for row in poisoned_cell.clean_x}
    assert len(tune_x) == len(poisoned_cell.clean_x)
    assert not any(row.tobytes() in measured for row in tune_x)
    # every fine-tuning image is an unpoisoned training sample (none carries the trigger)
    # digits' 450 test images cannot spare 225 held-out ones beyond the two pools, so the
    # fine-tuning set falls back to training images, and says so (protocol v1 §4.5)
    assert poisoned_cell.retrainer.data_source == "training"
    tune_idx = poisoned_cell.retrainer.source_indices
    assert tune_idx is not None and len(tune_idx) == len(tune_x)
    from harness.pipeline.runner import prepare_seed

    models = prepare_seed(build_config(CONFIG), 0, tmp_path, lambda _: None)
    assert not models.poison_mask[tune_idx].any()
    np.testing.assert_array_equal(tune_x, models.dataset.x_train[tune_idx])
