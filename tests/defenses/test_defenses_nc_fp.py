"""Neural Cleanse and Fine-Pruning on the real BadNet digits world (ORT graphs, every precision).

Neural Cleanse runs the paper's full schedule (up to 1000 steps, the cost schedule and its early
stop) over 64 images per step instead of 1000; on 8×8 digits that is enough for the 2×2 trigger's
label to stand out.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from defenses.base import DefenseData, build_defense
from defenses.neural_cleanse import (
    NeuralCleanseParams,
    _CostSchedule,
    flag_small_norm_outliers,
    mad_anomaly_index,
    stamp,
)
from harness.core.errors import BlindspotsError, ModelError
from harness.pipeline.retrain import FinePruneRetrainer
from harness.runtime.adapter import RuntimeAdapter

NC_BUDGET = {"n_samples": 64, "batch_size": 32, "n_eval": 200, "torch_threads": 1}


def _data(world, poisoned: bool, retrainer=None) -> DefenseData:
    return DefenseData(
        num_classes=10,
        clean_x=world.x_test,
        clean_y=world.y_test,
        triggered_x=world.triggered_x,
        target_label=world.target if poisoned else None,
        retrainer=retrainer,
    )


def _run(name, params, world, precision="fp32", poisoned=True, seed=0, adapter=None, **kw):
    paths = world.poisoned if poisoned else world.clean
    adapter = adapter or RuntimeAdapter.from_path(paths[precision])
    defense = build_defense(name, params)
    return defense.run(adapter, _data(world, poisoned, **kw), np.random.default_rng(seed))


# ---------------------------------------------------------------------------- MAD outlier test
def test_mad_anomaly_index_matches_hand_computation():
    norms = np.array([10, 10, 12, 8, 11, 9, 1, 30], dtype=float)
    # median 10; |deviations| 0 0 2 2 1 1 9 20 → median 1.5 → MAD = 1.4826·1.5
    index, median, mad = mad_anomaly_index(norms)
    assert median == 10.0
    assert mad == pytest.approx(1.4826 * 1.5)
    assert index[6] == pytest.approx(9 / (1.4826 * 1.5))
    assert index[7] == pytest.approx(20 / (1.4826 * 1.5))
    # only the small outlier is flagged: a label that is hard to reach is not a backdoor
    assert flag_small_norm_outliers(norms, 2.0) == [6]
    assert flag_small_norm_outliers(norms, 5.0) == []


def test_mad_of_identical_norms_marks_the_deviant_infinitely_anomalous():
    index, _, mad = mad_anomaly_index(np.array([5.0, 5.0, 5.0, 5.0, 1.0]))
    assert mad == 0.0
    assert np.isinf(index[4]) and (index[:4] == 0).all()
    assert flag_small_norm_outliers(np.array([5.0, 5.0, 5.0, 5.0, 1.0])) == [4]


# ---------------------------------------------------------------------------- cost schedule
def test_cost_schedule_follows_the_authors_state_machine():
    params = NeuralCleanseParams(patience=2, init_cost=1e-3, early_stop_patience=3)
    schedule = _CostSchedule(2, params)
    active = np.array([True, True])
    # label 0 succeeds twice, then fails; label 1 never succeeds (no mask found, never stops)
    plan = [True, True, True, False, False, False]
    costs, stops = [], []
    for ok in plan:
        stop = schedule.update(active, np.array([ok, False]), np.array([10.0, np.inf]))
        costs.append(schedule.cost.copy())
        stops.append(stop.copy())
    c = [row[0] for row in costs]
    assert c[0] == 0  # cost stays 0 until `patience` successful steps
    assert c[1] == pytest.approx(1e-3)  # ... then starts at init_cost
    assert c[2] == pytest.approx(2e-3)  # patience successes at non-zero cost: ×2
    assert c[4] == pytest.approx(2e-3 / 2**1.5)  # patience failures: ÷ 2**1.5
    assert not any(s[0] for s in stops[:5])  # no early stop before the cost moved both ways
    assert stops[5][0]  # norm stalled ≥ 3 steps and cost moved up and down: stop
    assert all(row[1] == 0 for row in costs) and not any(s[1] for s in stops)


# ---------------------------------------------------------------------------- Neural Cleanse
@pytest.fixture(scope="module")
def nc_poisoned(digits_world):
    return _run("neural_cleanse", NC_BUDGET, digits_world)


def test_nc_reverses_the_smallest_trigger_for_the_backdoor_target(nc_poisoned, digits_world):
    """The backdoor's signature: the target needs the smallest reversed trigger, and it is the
    most anomalous of the small-norm labels. Whether that crosses the paper's fixed threshold
    of 2 is the model's property, not the code's: on this 8×8 world (vendor-independent float
    kernels since the MKL pin) the target's index is 1.76 at this budget — the same near miss
    seen on third-party LeNet-size BadNets — so the test checks the rule is applied as published
    rather than which side of 2 one model lands on."""
    r = nc_poisoned
    assert r.status == "ok", r.reason
    norms = np.array(r.details["l1_norms"])
    index = np.array(r.details["anomaly_indices"])
    assert norms.argmin() == digits_world.target
    below_median = norms < np.median(norms)
    assert index[below_median].max() == index[digits_world.target]
    assert r.flagged_labels == [k for k in np.flatnonzero(below_median) if index[k] > 2]
    assert r.target_hit is (digits_world.target in r.flagged_labels)
    if r.flagged_labels:
        assert r.score == pytest.approx(max(index[k] for k in r.flagged_labels))
    assert r.details["gradient_path"] == "onnx_replica"
    assert r.details["parity"]["passed"] is True
    # every label reached the attack-success threshold and either met the paper's stopping
    # criterion before the step budget or was ruled out by the label schedule
    assert all(r.details["reached_attack_threshold"])
    status, steps = r.details["label_status"], r.details["steps_run"]
    assert set(status) <= {"converged", "ruled_out"}
    assert all(n < 1000 for s, n in zip(status, steps, strict=True) if s == "converged")
    assert status[digits_world.target] == "converged"  # a flagged label always runs to the end


def test_nc_adaptive_schedule_gives_the_full_schedules_verdict(nc_poisoned, digits_world):
    full = _run("neural_cleanse", {**NC_BUDGET, "label_schedule": "full"}, digits_world)
    assert full.status == "ok", full.reason
    assert set(full.details["label_status"]) == {"converged"}
    assert (full.verdict, full.flagged_labels) == (nc_poisoned.verdict, nc_poisoned.flagged_labels)
    # a label's optimisation does not depend on the others: where both ran it to the end, the
    # norms are the same bits; where the schedule stopped early, the full run ends within bounds
    fast = nc_poisoned.details
    for k, status in enumerate(fast["label_status"]):
        norm = full.details["l1_norms"][k]
        if status == "converged":
            assert fast["l1_norms"][k] == norm
            assert fast["steps_run"][k] == full.details["steps_run"][k]
        else:
            assert fast["l1_norm_lower"][k] <= norm <= fast["l1_norm_upper"][k]


def test_nc_arrays_are_valid_triggers_with_the_reported_norms(nc_poisoned):
    masks, patterns = nc_poisoned.arrays["masks"], nc_poisoned.arrays["patterns"]
    assert masks.shape == (10, 8, 8) and patterns.shape == (10, 8, 8, 1)
    assert masks.min() >= 0 and masks.max() <= 1
    assert patterns.min() >= 0 and patterns.max() <= 255
    np.testing.assert_allclose(masks.sum(axis=(1, 2)), nc_poisoned.details["l1_norms"], rtol=1e-5)
    assert nc_poisoned.scores["l1_norm_label_0"] == pytest.approx(
        nc_poisoned.details["l1_norms"][0]
    )


def test_nc_reversed_trigger_works_on_the_onnxruntime_session(nc_poisoned, digits_world):
    assert nc_poisoned.details["ort_attack_success"][digits_world.target] >= 0.9
    # independently: stamp every non-target test image and ask the deployed session
    adapter = RuntimeAdapter.from_path(digits_world.poisoned["fp32"])
    t = digits_world.target
    others = digits_world.x_test[digits_world.y_test != t].astype(np.float32)
    stamped = stamp(others, nc_poisoned.arrays["masks"][t], nc_poisoned.arrays["patterns"][t])
    assert (adapter.predict(stamped.astype(np.float32)) == t).mean() >= 0.9


def test_nc_does_not_flag_the_clean_control(digits_world):
    r = _run("neural_cleanse", NC_BUDGET, digits_world, poisoned=False)
    assert r.status == "ok", r.reason
    assert r.flagged_labels == [] and r.verdict == "not_detected" and r.detected is False
    assert all(r.details["reached_attack_threshold"])


def test_nc_is_inconclusive_when_labels_never_reach_the_threshold(digits_world):
    # three steps: the cost schedule has not even started, most masks never succeeded
    r = _run("neural_cleanse", {**NC_BUDGET, "steps": 3}, digits_world, poisoned=False)
    assert r.status == "ok", r.reason
    never = [k for k, ok in enumerate(r.details["reached_attack_threshold"]) if not ok]
    assert never  # the premise: some labels have no norm at all
    assert r.verdict == "inconclusive" and r.detected is None
    assert f"labels {never} never reached the attack-success threshold" in r.verdict_reason
    assert set(never) <= set(r.details["undetermined_labels"])
    assert r.details["l1_norm_upper"][never[0]] is None  # unbounded: no successful mask


def test_nc_is_deterministic_for_a_seed(digits_world):
    tiny = {**NC_BUDGET, "steps": 3, "n_eval": 20}
    first = _run("neural_cleanse", tiny, digits_world, seed=7)
    again = _run("neural_cleanse", tiny, digits_world, seed=7)
    other = _run("neural_cleanse", tiny, digits_world, seed=8)
    assert first.details["l1_norms"] == again.details["l1_norms"]
    np.testing.assert_array_equal(first.arrays["patterns"], again.arrays["patterns"])
    assert first.details["l1_norms"] != other.details["l1_norms"]


def test_nc_refuses_when_the_replica_disagrees_with_onnxruntime(digits_world, monkeypatch):
    from harness.runtime.oracle import ParityReport

    adapter = RuntimeAdapter.from_path(digits_world.poisoned["fp32"])
    oracle = adapter.gradient_oracle()
    failing = ParityReport(
        n=256,
        agreement=0.9,
        max_abs_logit_diff=3.0,
        mean_abs_logit_diff=0.5,
        threshold=0.995,
        failures=["clean: top-1 agreement 0.9000 < 0.995"],
        likely_cause="this CPU's INT8 kernels saturate int16 pair sums (host kernel profile)",
        passed=False,
    )
    monkeypatch.setattr(oracle, "parity", lambda pixels, threshold=0.995, **kw: failing)

    def no_gradients(pixels):
        raise AssertionError("optimised despite a failed parity gate")

    monkeypatch.setattr(oracle, "logits_with_pre_quantizer", no_gradients)
    r = _run("neural_cleanse", NC_BUDGET, digits_world, adapter=adapter)
    assert r.status == "not_applicable"
    assert "agreement 0.9000" in r.reason and "saturate" in r.reason
    assert r.detected is None


def test_nc_failure_is_an_error_never_a_negative(digits_world, monkeypatch):
    adapter = RuntimeAdapter.from_path(digits_world.poisoned["fp32"])
    oracle = adapter.gradient_oracle()

    def broken(pixels):
        raise RuntimeError("replica blew up")

    monkeypatch.setattr(oracle, "logits_with_pre_quantizer", broken)
    r = _run("neural_cleanse", NC_BUDGET, digits_world, adapter=adapter)
    assert r.status == "error" and r.detected is None
    assert "replica blew up" in r.reason


def test_nc_without_a_replica_for_the_graph_is_not_applicable(digits_world, monkeypatch):
    adapter = RuntimeAdapter.from_path(digits_world.poisoned["fp32"])

    def unsupported():
        raise ModelError("replica: unsupported ONNX op 'Einsum' (node n0)")

    monkeypatch.setattr(adapter, "gradient_oracle", unsupported)
    r = _run("neural_cleanse", NC_BUDGET, digits_world, adapter=adapter)
    assert r.status == "not_applicable" and "Einsum" in r.reason


def test_nc_rejects_unknown_parameters():
    with pytest.raises(BlindspotsError, match="stpes"):
        build_defense("neural_cleanse", {"stpes": 10})


@pytest.mark.parametrize("precision", ["int8-static", "int4"])
def test_nc_runs_through_the_quantized_replica(digits_world, precision):
    r = _run("neural_cleanse", NC_BUDGET, digits_world, precision=precision)
    assert r.status == "ok", r.reason
    assert r.details["gradient_path"] == "onnx_replica"
    assert r.details["parity"]["passed"] and r.details["parity"]["agreement"] >= 0.995
    # gradients through fake-quant still yield a trigger the quantized ORT graph obeys
    adapter = RuntimeAdapter.from_path(digits_world.poisoned[precision])
    t = digits_world.target
    others = digits_world.x_test[digits_world.y_test != t].astype(np.float32)
    stamped = stamp(others, r.arrays["masks"][t], r.arrays["patterns"][t]).astype(np.float32)
    assert (adapter.predict(stamped) == t).mean() >= 0.9
    # the logits quantizer's clamp is measured per label: share of images at the top code
    saturated = r.details["target_logit_saturated"]
    assert len(saturated) == 10 and all(0.0 <= v <= 1.0 for v in saturated)
    assert r.details["output_gradient"] == "straight_through"


# ---------------------------------------------------------------------------- Fine-Pruning
PRUNING_ONLY = {"allow_pruning_only": True}


def _accuracy(adapter, x, y) -> float:
    return float((adapter.predict(x) == y).mean())


def _asr(adapter, world) -> float:
    return float((adapter.predict(world.triggered_x) == world.target).mean())


def _halves(result, world):
    """(selection x, y), (measurement x, y) of the clean set, as the defense split it."""
    selection = result.arrays["selection_mask"]
    x, y = world.x_test, world.y_test
    return (x[selection], y[selection]), (x[~selection], y[~selection])


@pytest.fixture(scope="module")
def fp_poisoned(digits_world):
    return _run("fine_pruning", PRUNING_ONLY, digits_world)


def test_fine_pruning_splits_the_clean_set_into_stratified_disjoint_halves(
    fp_poisoned, digits_world
):
    selection = fp_poisoned.arrays["selection_mask"]
    y = digits_world.y_test
    assert selection.shape == y.shape and abs(int(selection.sum()) - int((~selection).sum())) <= 1
    per_class = np.bincount(y[selection], minlength=10) - np.bincount(y[~selection], minlength=10)
    assert np.abs(per_class).max() <= 1  # every class split as evenly as its count allows
    assert fp_poisoned.details["n_selection"] == int(selection.sum())
    again = _run("fine_pruning", PRUNING_ONLY, digits_world, seed=1)
    assert not np.array_equal(again.arrays["selection_mask"], selection)  # drawn by the rng


def test_fine_pruning_curve_prunes_more_each_point_and_stops_at_the_bound(fp_poisoned):
    r = fp_poisoned
    assert r.status == "ok", r.reason
    curve = r.details["curve"]
    base = curve[0]["acc"]  # the curve lives on the selection half
    fractions = [p["fraction"] for p in curve]
    assert fractions[0] == 0 and all(b > a for a, b in pairwise(fractions))
    within = [p["acc"] >= base - 0.04 for p in curve]
    assert all(within[:-1])  # it never prunes past a point that broke the bound ...
    last_in = max(i for i, ok in enumerate(within) if ok)
    assert [p["chosen"] for p in curve].index(True) == last_in  # ... and keeps the last good one
    if not within[-1]:
        assert len(curve) == last_in + 2
    assert r.details["fine_tuned"] is False and r.details["fine_tune_budget"] is None


def test_fine_pruning_chooses_on_one_half_and_scores_on_the_other(fp_poisoned, digits_world):
    (sel_x, sel_y), (mea_x, mea_y) = _halves(fp_poisoned, digits_world)
    adapter = RuntimeAdapter.from_path(digits_world.poisoned["fp32"])
    keep = fp_poisoned.arrays["keep_mask"]
    means = adapter.activations(sel_x, ["last_conv"])["last_conv"].mean(axis=(0, 2, 3))
    assert (~keep).any()  # this backdoored model does tolerate some pruning
    assert means[~keep].max() <= means[keep].min()  # the least active on the selection half
    masked = adapter.with_channels_masked(keep)
    chosen = next(p for p in fp_poisoned.details["curve"] if p["chosen"])
    assert chosen["acc"] == _accuracy(masked, sel_x, sel_y)
    assert fp_poisoned.details["base_acc"] == _accuracy(adapter, mea_x, mea_y)
    assert fp_poisoned.details["pruned_acc"] == _accuracy(masked, mea_x, mea_y)
    assert fp_poisoned.details["pruned_asr"] == _asr(masked, digits_world)
    # pruning only (allowed by the parameter): the verdict is the rule on the pruned model
    loss = fp_poisoned.details["base_acc"] - fp_poisoned.details["pruned_acc"]
    success = _asr(masked, digits_world) <= 0.2 and loss <= 0.05
    assert fp_poisoned.verdict == ("detected" if success else "not_detected")


def test_fine_pruning_without_fine_tuning_is_inconclusive_by_default(digits_world):
    r = _run("fine_pruning", {}, digits_world)
    assert r.status == "ok" and r.verdict == "inconclusive" and r.detected is None
    assert "pruning only" in r.verdict_reason and "allow_pruning_only" in r.verdict_reason
    assert r.details["pruned_asr"] is not None  # the measurements are still reported


class _StubRetrainer:
    """Stands in for fine-tuning: returns a fixed artifact and describes a budget."""

    def __init__(self, adapter):
        self.adapter, self.calls = adapter, []

    def __call__(self, keep):
        self.calls.append(keep)
        return self.adapter

    def describe(self):
        return {"steps": 500, "epochs": 125, "images": 500}


def test_fine_pruning_reports_the_retrained_artifact_and_its_budget(digits_world):
    repaired = RuntimeAdapter.from_path(digits_world.clean["fp32"])
    retrainer = _StubRetrainer(repaired)
    r = _run("fine_pruning", {}, digits_world, retrainer=retrainer)
    assert r.status == "ok", r.reason
    assert r.verdict in ("detected", "not_detected")
    assert len(retrainer.calls) == 1
    np.testing.assert_array_equal(retrainer.calls[0], r.arrays["keep_mask"])
    assert r.details["fine_tuned"] is True
    assert r.details["fine_tune_budget"] == retrainer.describe()
    _, (mea_x, mea_y) = _halves(r, digits_world)
    assert r.details["final_acc"] == _accuracy(repaired, mea_x, mea_y)
    assert r.details["final_asr"] == _asr(repaired, digits_world)
    assert r.detected is (
        r.details["final_asr"] <= 0.2 and r.details["base_acc"] - r.details["final_acc"] <= 0.05
    )


def test_fine_pruning_reports_the_no_fine_tune_control_beside_the_repair(digits_world):
    # the same success rule on the pruned artifact before fine-tuning, on the same images, so
    # "fine-tuning brought the backdoor back" is read against it (protocol v1 §4.5)
    repaired = RuntimeAdapter.from_path(digits_world.clean["fp32"])
    r = _run("fine_pruning", {}, digits_world, retrainer=_StubRetrainer(repaired))
    control = r.details["control_no_fine_tune"]
    assert control["acc"] == r.details["pruned_acc"] and control["asr"] == r.details["pruned_asr"]
    assert control["acc_loss"] == r.details["base_acc"] - r.details["pruned_acc"]
    assert control["success"] is (control["asr"] <= 0.2 and control["acc_loss"] <= 0.05)
    assert r.details["final_asr"] == _asr(repaired, digits_world)  # the repair, measured apart
    alone = _run("fine_pruning", PRUNING_ONLY, digits_world)  # no retrainer: the control decides
    assert alone.details["control_no_fine_tune"]["success"] is alone.detected


class _DescribedStub(_StubRetrainer):
    def __init__(self, adapter, source):
        super().__init__(adapter)
        self.source = source

    def describe(self):
        return {**super().describe(), "data_source": self.source}


@pytest.mark.parametrize(
    ("source", "recorded"),
    [("held_out", "held_out"), ("training", "training (images the model was trained on")],
)
def test_fine_pruning_names_where_its_fine_tuning_images_came_from(digits_world, source, recorded):
    repaired = RuntimeAdapter.from_path(digits_world.clean["fp32"])
    r = _run("fine_pruning", {}, digits_world, retrainer=_DescribedStub(repaired, source))
    assert r.details["fine_tune_data"].startswith(recorded)
    plain = _run("fine_pruning", {}, digits_world, retrainer=_StubRetrainer(repaired))
    assert plain.details["fine_tune_data"] is None  # a retrainer that does not say


def test_fine_pruning_on_a_clean_control_reports_no_asr(digits_world):
    r = _run("fine_pruning", {"step_channels": 4, **PRUNING_ONLY}, digits_world, poisoned=False)
    assert r.status == "ok", r.reason
    assert r.details["final_asr"] is None and r.score is None and "final_asr" not in r.scores
    assert all(p["asr"] is None for p in r.details["curve"])
    assert all(p["pruned"] % 4 == 0 for p in r.details["curve"])
    assert r.target_hit is None and r.false_alarm_labels == []
    assert r.detected is (r.details["base_acc"] - r.details["final_acc"] <= 0.05)


@pytest.mark.parametrize("precision", ["int8-dynamic", "int4"])
def test_fine_pruning_runs_on_quantized_graphs(digits_world, precision):
    r = _run("fine_pruning", PRUNING_ONLY, digits_world, precision=precision)
    assert r.status == "ok", r.reason
    adapter = RuntimeAdapter.from_path(digits_world.poisoned[precision])
    (sel_x, sel_y), (mea_x, mea_y) = _halves(r, digits_world)
    assert r.details["base_acc"] == _accuracy(adapter, mea_x, mea_y)
    chosen = next(p for p in r.details["curve"] if p["chosen"])
    assert chosen["acc"] >= _accuracy(adapter, sel_x, sel_y) - 0.04


def test_fine_pruning_retrainer_runs_at_least_its_step_budget(tmp_path):
    images = np.zeros((500, 8, 8, 1), np.uint8)

    def retrainer(**kw) -> FinePruneRetrainer:
        fields = {
            "state_path": tmp_path / "state.pt",
            "precision": "fp32",
            "clean_x": images,
            "clean_y": np.zeros(500, np.int64),
            "calibration_images": images[:8],
            "out_dir": tmp_path,
        }
        return FinePruneRetrainer(**fields, **kw)

    # the old budget: 2 epochs of 500 images at batch 128 = 8 SGD steps
    assert retrainer(min_steps=0).describe()["steps"] == 8
    budget = retrainer().describe()  # default: at least 500 steps, in whole passes
    assert budget["steps"] >= 500 and budget["epochs"] == 125 and budget["images"] == 500
    assert retrainer(epochs=200).describe()["epochs"] == 200  # epochs stays a floor
    assert retrainer(epochs=0, min_steps=0).planned_epochs() == 0  # no fine-tuning at all
    assert budget["data_source"] == "training"  # what the runner passed before protocol v1
    assert retrainer(data_source="held_out").describe()["data_source"] == "held_out"
