"""Activation Clustering, Spectral Signatures and STRIP: known answers, contracts, real models.

Known-answer cases use small fake adapters whose "activations" are planted features (the pixel
array *is* the feature vector) or whose logits react to a trigger patch, so the right answer is
known by construction. The integration tests run the real digits world at fp32 and int8-static.

Nothing the defenses decide with was tuned on these data: AC's thresholds are the published
ones, SS's MAD floor was set on another generator (see ``LOG_GAP_MAD_FLOOR``), STRIP's are the
paper's. The rates stated below (false alarms on structureless classes, planted clusters found)
were first measured on seeds 100-129 of the same generator, which no test here uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

import defenses.strip as strip_module
from defenses.base import DefenseData, DefenseResult, Status, Verdict, build_defense
from defenses.filtering import auroc, input_filter_rates, robust_z, sample_filter_metrics
from defenses.strip import (
    StripParams,
    empirical_threshold,
    entropy_bits,
    normal_threshold,
    split_sizes,
    superimpose,
)
from harness.runtime.adapter import RuntimeAdapter

TARGET_CLASS = 2
PATCH_VALUE = 250  # the fake backdoor fires when the bottom-right 2x2 patch is at least this


@dataclass
class Counter:
    images: int = 0


@dataclass
class FakeAdapter:
    """Implements the adapter surface the filtering defenses use.

    Activations: the (N, 1, 1, F) pixel array flattened, so tests plant features directly.
    Logits: a patch-triggered backdoor when ``backdoor`` is on (huge target logit, so the
    softmax has exact zeros), otherwise weak content-dependent logits (high entropy).
    """

    backdoor: bool = True
    fail: bool = False
    layers: list[str] = field(default_factory=lambda: ["penultimate"])
    counter: Counter = field(default_factory=Counter)

    def activations(self, pixels: np.ndarray, layers: list[str] | None = None):
        if self.fail:
            raise RuntimeError("probe tensor vanished")
        self.counter.images += len(pixels)
        return {"penultimate": np.asarray(pixels, np.float32).reshape(len(pixels), -1)}

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        if self.fail:
            raise RuntimeError("session crashed")
        self.counter.images += len(pixels)
        flat = np.asarray(pixels, np.float32).reshape(len(pixels), -1)
        out = flat[:, :10] / 255.0
        if self.backdoor:
            fired = pixels[:, -3:-1, -3:-1, :].reshape(len(pixels), -1).min(axis=1) >= PATCH_VALUE
            out[fired] = 0.0
            out[fired, 0] = 1e4
        return out


ASSUMED_POISON_RATE = 0.03
"""The auditor's overall poison rate for :func:`planted_data` (30 of 1000 images when planted)."""


def planted_data(seed: int, planted: bool, n: int = 200, dim: int = 32, classes: int = 5):
    """Gaussian classes; optionally 15% of class 2 shifted 8σ along one random direction.

    The poison rate handed to the defenses is the overall one (3% of the set), as the runner
    hands the attack's rate to every cell, poisoned or clean.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(classes * n, dim)) + np.repeat(rng.normal(0, 5, (classes, dim)), n, 0)
    y = np.repeat(np.arange(classes), n)
    mask = np.zeros(len(y), dtype=bool)
    if planted:
        chosen = rng.choice(np.flatnonzero(y == TARGET_CLASS), int(0.15 * n), replace=False)
        direction = rng.normal(size=dim)
        x[chosen] += 8.0 * direction / np.linalg.norm(direction)
        mask[chosen] = True
    return DefenseData(
        num_classes=classes,
        clean_x=np.zeros((1, 1, 1, dim), np.float32),
        clean_y=np.zeros(1, np.int64),
        train_x=x[:, None, None, :].astype(np.float32),
        train_y=y,
        poison_mask=mask if planted else None,
        target_label=TARGET_CLASS if planted else None,
        poison_rate=ASSUMED_POISON_RATE,
    )


def stamp(x: np.ndarray) -> np.ndarray:
    out = x.copy()
    out[:, -3:-1, -3:-1, :] = 255
    return out


def strip_data(seed: int = 0) -> DefenseData:
    """Dark 8x8 images (≤ 99, so a saturated sum of two stays below the patch level)."""
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, 100, size=(500, 8, 8, 1), dtype=np.uint8)
    triggered = stamp(rng.integers(0, 100, size=(80, 8, 8, 1), dtype=np.uint8))
    return DefenseData(
        num_classes=10, clean_x=clean, clean_y=np.zeros(500, np.int64), triggered_x=triggered
    )


SMALL_STRIP = {"n_overlays": 20, "n_test": 60, "n_clean_fit": 200}
"""Fewer overlays and a 200-input threshold set (the paper's is 2000): a named deviation."""


@dataclass
class ConfidentAdapter(FakeAdapter):
    """No backdoor; sure of 90% of (blended) images and uniform on the rest, by pixel sum.

    Clean STRIP entropies then pile up near 0 bits with a tail, the GTSRB-like shape where a
    normal fit's 1% quantile falls below zero.
    """

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        self.counter.images += len(pixels)
        flat = np.asarray(pixels, np.float64).reshape(len(pixels), -1)
        unsure = flat.sum(axis=1).astype(np.int64) % 10 == 0
        out = np.zeros((len(pixels), 10))
        out[~unsure, 3] = 1e4
        return out


# --------------------------------------------------------------------------- Activation Clustering
@pytest.mark.parametrize("reduction", ["ica", "pca"])
def test_ac_flags_exactly_the_planted_class(reduction):
    data = planted_data(seed=1, planted=True)
    result = build_defense("activation_clustering", {"reduction": reduction}).run(
        FakeAdapter(), data, np.random.default_rng(0)
    )
    assert result.status == Status.OK
    assert result.verdict == Verdict.DETECTED and result.detected is True
    assert result.flagged_labels == [TARGET_CLASS]
    assert result.target_hit is True and result.exact_target_hit is True
    assert result.false_alarm_labels == []
    assert result.scores[f"relative_size_label_{TARGET_CLASS}"] == pytest.approx(0.15, abs=0.02)
    filtering = result.details["filtering"]
    assert filtering["poison_recall"] >= 0.9 and filtering["poison_precision"] >= 0.9
    flagged = result.per_sample_scores > 0
    assert np.array_equal(flagged, result.arrays["flagged"])
    assert result.queries == len(data.train_x)


def _rates(name: str, seeds: range) -> tuple[int, int, int, list[float]]:
    """(clean classes flagged, clean classes, planted runs with exactly the target flagged,
    poison recall of each planted run) of ``name`` at its default parameters."""
    false_alarms, exact, recalls = 0, 0, []
    for seed in seeds:
        clean = build_defense(name).run(
            FakeAdapter(), planted_data(seed, planted=False), np.random.default_rng(seed)
        )
        assert clean.verdict != Verdict.INCONCLUSIVE and clean.target_hit is None
        assert clean.false_alarm_labels == clean.flagged_labels  # no target: all false alarms
        false_alarms += len(clean.flagged_labels)
        planted = build_defense(name).run(
            FakeAdapter(), planted_data(seed, planted=True), np.random.default_rng(seed)
        )
        exact += bool(planted.exact_target_hit)
        recalls.append(planted.details["filtering"]["poison_recall"])
    return false_alarms, 5 * len(seeds), exact, recalls


def test_ac_published_rule_finds_planted_clusters_and_rarely_flags_structureless_classes():
    # Seeds 100-129: 0 of 150 structureless classes flagged, 30/30 planted classes flagged alone.
    false_alarms, classes, exact, recalls = _rates("activation_clustering", range(5))
    assert false_alarms <= 1, f"{false_alarms} of {classes} structureless classes flagged"
    assert exact >= 4, f"planted class flagged alone in only {exact} of 5 draws"
    assert np.median(recalls) >= 0.9


def test_ac_skips_a_class_too_small_to_cluster():
    data = planted_data(seed=1, planted=True)
    keep = (data.train_y != 4) | (np.cumsum(data.train_y == 4) <= 6)  # class 4 keeps 6 samples
    data.train_x, data.train_y, data.poison_mask = (
        data.train_x[keep],
        data.train_y[keep],
        data.poison_mask[keep],
    )
    result = build_defense("activation_clustering").run(
        FakeAdapter(), data, np.random.default_rng(0)
    )
    assert result.status == Status.OK
    assert result.details["skipped_classes"] == [4]
    assert "6 samples" in result.details["per_class"]["4"]["skipped"]
    assert result.flagged_labels == [TARGET_CLASS]
    assert result.verdict == Verdict.DETECTED  # an alarm elsewhere stands


@pytest.mark.parametrize("name", ["activation_clustering", "spectral_signatures"])
def test_nothing_flagged_with_an_unjudged_class_is_inconclusive_not_clean(name):
    data = planted_data(seed=2, planted=False)
    keep = (data.train_y != 4) | (np.cumsum(data.train_y == 4) <= 6)  # class 4 keeps 6 samples
    data.train_x, data.train_y = data.train_x[keep], data.train_y[keep]
    result = build_defense(name).run(FakeAdapter(), data, np.random.default_rng(0))
    assert result.status == Status.OK and result.flagged_labels == []
    assert result.verdict == Verdict.INCONCLUSIVE and result.detected is None
    assert "[4]" in result.verdict_reason


# --------------------------------------------------------------------------- Spectral Signatures
def test_ss_removes_the_planted_outliers_and_flags_their_class():
    data = planted_data(seed=4, planted=True)
    result = build_defense("spectral_signatures").run(FakeAdapter(), data, np.random.default_rng(0))
    assert result.status == Status.OK
    assert result.flagged_labels == [TARGET_CLASS] and result.exact_target_hit is True
    assert result.verdict == Verdict.DETECTED
    # ε bounds each class by the whole poison budget: 30 images of a 200-image class = 15%
    assert result.details["epsilon_source"] == "poison_budget"
    assert result.details["epsilon_per_class"][str(TARGET_CLASS)] == pytest.approx(0.15)
    target = result.details["target_class"]
    assert target["removed_poison_recall"] >= 0.9
    assert target["removed_poison_fraction"] >= 0.6  # 1.5·ε·n removed: at most 2/3 can be poison
    removed = result.arrays["removed"]
    in_target = data.train_y == TARGET_CLASS
    assert removed[in_target].sum() == round(1.5 * 0.15 * in_target.sum())
    others = [result.scores[f"tail_ratio_label_{k}"] for k in range(5) if k != TARGET_CLASS]
    assert result.scores[f"tail_ratio_label_{TARGET_CLASS}"] > max(others)


def test_ss_finds_planted_signatures_and_rarely_flags_structureless_classes():
    # Seeds 100-129: 0 of 150 structureless classes flagged, 30/30 planted classes flagged alone.
    false_alarms, classes, exact, recalls = _rates("spectral_signatures", range(20))
    assert false_alarms <= 1, f"{false_alarms} of {classes} structureless classes flagged"
    assert exact >= 19, f"planted class flagged alone in only {exact} of 20 draws"
    assert min(recalls) >= 0.9


def test_ss_epsilon_is_an_upper_bound_on_each_class_from_the_poison_budget():
    data = planted_data(seed=7, planted=False)
    keep = (data.train_y != 0) | (np.cumsum(data.train_y == 0) <= 100)  # class 0: 100 images
    data.train_x, data.train_y = data.train_x[keep], data.train_y[keep]
    data.poison_rate = 0.05  # 45 of 900 images may be poison, all of them in any one class
    result = build_defense("spectral_signatures").run(FakeAdapter(), data, np.random.default_rng(0))
    eps, per_class = result.details["epsilon_per_class"], result.details["per_class"]
    assert result.details["epsilon_source"] == "poison_budget"
    assert eps["0"] == pytest.approx(45 / 100) and eps["1"] == pytest.approx(45 / 200)
    # 1.5·ε_k·n_k = 1.5 × the budget from every class: the paper's rule with ε as a count
    assert per_class["0"]["n_removed"] == per_class["1"]["n_removed"] == round(1.5 * 45)
    assert result.details["removed_fraction"] == pytest.approx(5 * 68 / 900)


@pytest.mark.parametrize(
    ("params", "poison_rate", "source", "expected_eps"),
    [({"epsilon": 0.1}, 0.3, "param", 0.1), ({}, None, "default", 0.05)],
)
def test_ss_epsilon_from_the_parameter_or_the_papers_default(
    params, poison_rate, source, expected_eps
):
    data = planted_data(seed=7, planted=False)
    data.poison_rate = poison_rate
    result = build_defense("spectral_signatures", params).run(
        FakeAdapter(), data, np.random.default_rng(0)
    )
    assert result.details["epsilon_source"] == source
    assert set(result.details["epsilon_per_class"].values()) == {expected_eps}
    assert result.details["per_class"]["0"]["n_removed"] == round(1.5 * expected_eps * 200)


# --------------------------------------------------------------------------- STRIP
def test_strip_catches_every_triggered_input_of_a_backdoored_model():
    params = SMALL_STRIP | {"n_test": 200, "n_clean_fit": 300}
    result = build_defense("strip", params).run(
        FakeAdapter(), strip_data(), np.random.default_rng(0)
    )
    assert result.status == Status.OK
    assert result.verdict == Verdict.DETECTED and result.verdict_reason is None
    assert result.target_hit is None and result.false_alarm_labels == []  # flags inputs only
    assert result.scores["tpr"] == 1.0
    assert result.scores["auroc"] == 1.0
    assert result.scores["frr"] <= 0.05  # nominal 1%, measured out of sample on 125 inputs
    # 500 clean images: 125 measure the FRR, 300 fit the threshold, 75 are the overlay pool
    details = result.details
    assert (details["n_clean_eval"], details["n_clean_fit"], details["n_overlay_pool"]) == (
        125,
        300,
        75,
    )
    triggered_h = result.arrays["triggered_entropy"]
    assert np.all(np.isfinite(triggered_h)) and triggered_h.max() == pytest.approx(0.0, abs=1e-9)
    assert result.threshold > triggered_h.max()
    n_tested = len(result.arrays["clean_entropy"]) + len(triggered_h)
    assert result.queries == SMALL_STRIP["n_overlays"] * n_tested


def test_strip_stays_quiet_on_a_model_without_backdoor():
    result = build_defense("strip", SMALL_STRIP).run(
        FakeAdapter(backdoor=False), strip_data(), np.random.default_rng(0)
    )
    assert result.status == Status.OK
    assert result.verdict == Verdict.NOT_DETECTED
    assert result.scores["tpr"] < 0.5
    # stamped inputs are as unsure as clean ones: entropy does not tell them apart
    assert abs(result.scores["auroc"] - 0.5) < 0.15


def test_strip_with_fewer_clean_inputs_than_the_paper_is_inconclusive():
    result = build_defense("strip", {"n_overlays": 20}).run(  # n_clean_fit: the paper's 2000
        FakeAdapter(), strip_data(), np.random.default_rng(0)
    )
    assert result.status == Status.OK
    assert result.verdict == Verdict.INCONCLUSIVE and result.detected is None
    assert "too few clean samples" in result.verdict_reason and "2000" in result.verdict_reason
    assert result.scores["tpr"] == 1.0  # the numbers are still reported


@pytest.mark.parametrize("fit", ["normal", "empirical"])
def test_strip_threshold_at_or_below_zero_bits_is_inconclusive_not_a_miss(fit):
    result = build_defense("strip", SMALL_STRIP | {"threshold_fit": fit}).run(
        ConfidentAdapter(backdoor=False), strip_data(), np.random.default_rng(0)
    )
    assert result.status == Status.OK
    assert result.threshold <= 0
    assert result.verdict == Verdict.INCONCLUSIVE and result.detected is None
    assert "threshold unusable" in result.verdict_reason


def test_strip_split_gives_the_threshold_the_papers_clean_set_when_there_is_one():
    params = StripParams()
    assert split_sizes(3000, params) == (2000, 200, 800)
    assert split_sizes(2300, params) == (2000, 200, 100)
    assert split_sizes(500, params) == (275, 125, 100)  # too few: inconclusive


def test_strip_average_blend_dilutes_a_saturating_trigger():
    # Averaging halves the 255 patch below the fake trigger's firing level: the overlay
    # really is averaged, not added, so STRIP sees no confident inputs.
    params = SMALL_STRIP | {"blend": "average"}
    result = build_defense("strip", params).run(
        FakeAdapter(), strip_data(), np.random.default_rng(0)
    )
    assert result.scores["tpr"] < 0.5


def test_superimpose_float_sum_clipped_sum_and_average():
    # The authors' notebook adds float images without saturation (the default); the clipped
    # sum is what the same OpenCV call gives on uint8 images (the option).
    x = np.full((1, 2, 2, 1), 200, np.uint8)
    overlays = np.full((1, 3, 2, 2, 1), 100, np.uint8)
    added = superimpose(x, overlays, "add_float")
    assert added.shape == (3, 2, 2, 1) and added.dtype == np.float32 and np.all(added == 300.0)
    assert np.all(superimpose(x, overlays, "add_clipped") == 255.0)
    assert np.all(superimpose(x, overlays, "average") == 150.0)
    dark = np.full((1, 3, 2, 2, 1), 40, np.uint8)  # below saturation the two sums agree
    np.testing.assert_array_equal(
        superimpose(x, dark, "add_float"), superimpose(x, dark, "add_clipped")
    )


@dataclass
class RecordingAdapter(FakeAdapter):
    """Remembers the brightest pixel value the model was asked about."""

    brightest: float = 0.0

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        self.brightest = max(self.brightest, float(np.max(pixels)))
        return super().logits(pixels)


@pytest.mark.parametrize(("blend", "over_255"), [("add_float", True), ("add_clipped", False)])
def test_strip_hands_the_model_the_blend_it_names(blend, over_255):
    assert StripParams().blend == "add_float"  # the authors' blend is the default
    adapter = RecordingAdapter()
    build_defense("strip", SMALL_STRIP | {"blend": blend}).run(
        adapter, strip_data(), np.random.default_rng(0)
    )
    assert (adapter.brightest > 255) is over_255


def test_entropy_is_finite_with_exact_zero_probabilities():
    probs = np.array([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.25] * 4])
    np.testing.assert_allclose(entropy_bits(probs), [0.0, 1.0, 2.0])


# --------------------------------------------------------------------------- shared metrics
def test_filter_metrics_match_hand_counts():
    flagged = np.array([1, 1, 1, 0, 0, 0], bool)
    truth = np.array([1, 1, 0, 1, 0, 0], bool)
    metrics = sample_filter_metrics(flagged, truth)
    assert metrics["poison_precision"] == pytest.approx(2 / 3)
    assert metrics["poison_recall"] == pytest.approx(2 / 3)
    assert sample_filter_metrics(flagged, None) == {"n_flagged": 3.0}
    rates = input_filter_rates(np.array([0.1, 2.0, 3.0, 4.0]), np.array([0.0, 0.2, 5.0]), 1.0, True)
    assert rates == {"tpr": pytest.approx(2 / 3), "frr": 0.25}
    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 0.0
    z = robust_z(np.array([1.0, 1.0, 1.0, 2.0]), mad_floor=0.5)
    assert z[-1] == pytest.approx(1.0 / (1.4826 * 0.5))


# --------------------------------------------------------------------------- contracts
CASES = {
    "activation_clustering": (lambda: planted_data(1, planted=True), {}),
    "spectral_signatures": (lambda: planted_data(4, planted=True), {}),
    "strip": (strip_data, SMALL_STRIP),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_seed_gives_identical_results(name):
    make_data, params = CASES[name]

    def run(seed: int) -> DefenseResult:
        return build_defense(name, params).run(
            FakeAdapter(), make_data(), np.random.default_rng(seed)
        )

    first, second = run(11), run(11)
    assert first.status == Status.OK
    assert first.model_dump(exclude={"wall_time_s"}) == second.model_dump(exclude={"wall_time_s"})
    np.testing.assert_array_equal(first.per_sample_scores, second.per_sample_scores)


@pytest.mark.parametrize("name", sorted(CASES))
def test_failure_inside_the_method_is_an_error_not_a_verdict(name):
    make_data, params = CASES[name]
    result = build_defense(name, params).run(
        FakeAdapter(fail=True), make_data(), np.random.default_rng(0)
    )
    assert result.status == Status.ERROR
    assert result.detected is None and result.verdict is None
    assert "RuntimeError" in result.reason
    assert "vanished" in result.reason or "crashed" in result.reason


@pytest.mark.parametrize("name", ["activation_clustering", "spectral_signatures"])
def test_data_filters_need_training_data_and_the_layer(name):
    data = planted_data(1, planted=True)
    data.train_x = None
    result = build_defense(name).run(FakeAdapter(), data, np.random.default_rng(0))
    assert result.status == Status.NOT_APPLICABLE
    assert "training set" in result.reason
    no_layer = FakeAdapter(layers=["last_conv"])
    result = build_defense(name).run(no_layer, planted_data(1, True), np.random.default_rng(0))
    assert result.status == Status.NOT_APPLICABLE
    assert "penultimate" in result.reason


def test_strip_needs_triggered_inputs_and_enough_clean_images():
    data = strip_data()
    data.triggered_x = None
    result = build_defense("strip").run(FakeAdapter(), data, np.random.default_rng(0))
    assert result.status == Status.NOT_APPLICABLE
    assert "triggered" in result.reason
    data = strip_data()
    data.clean_x = data.clean_x[:5]
    result = build_defense("strip").run(FakeAdapter(), data, np.random.default_rng(0))
    assert result.status == Status.NOT_APPLICABLE
    assert "clean images" in result.reason


# --------------------------------------------------------------------------- real models
def _world_data(world, poisoned: bool) -> DefenseData:
    train_y = world.y_train.copy()
    train_x = world.x_train.copy()
    if not poisoned:  # the clean control was trained on the unpoisoned images and labels
        train_x, train_y = world.clean_x_train, world.clean_y_train
    return DefenseData(
        num_classes=10,
        clean_x=world.x_test,
        clean_y=world.y_test,
        train_x=train_x,
        train_y=train_y,
        poison_mask=world.poison_mask if poisoned else None,
        triggered_x=world.triggered_x,
        target_label=world.target if poisoned else None,
        poison_rate=0.1,
    )


WORLD_STRIP = {"n_overlays": 30, "n_test": 100, "n_clean_fit": 100}
"""The digits test set has 450 images: a 100-input threshold set, a named deviation."""


@pytest.mark.parametrize("precision", ["fp32", "int8-static"])
def test_filtering_defenses_on_the_digits_world(digits_world, precision):
    results = {}
    for kind in ("poisoned", "clean"):
        adapter = RuntimeAdapter.from_path(getattr(digits_world, kind)[precision])
        data = _world_data(digits_world, kind == "poisoned")
        for name, params in (
            ("activation_clustering", {}),
            ("spectral_signatures", {}),
            ("strip", WORLD_STRIP),
        ):
            result = build_defense(name, params).run(adapter, data, np.random.default_rng(0))
            assert result.status == Status.OK, (kind, name, result.reason)
            results[kind, name] = result

    for kind in ("poisoned", "clean"):
        for name in ("activation_clustering", "spectral_signatures"):
            assert results[kind, name].queries == len(digits_world.x_train)
        assert results[kind, "strip"].queries == 30 * (100 + 100 + 100)
    # STRIP: trigger-dominated predictions survive superimposition; a clean model's stamped
    # inputs are as unsure as clean ones (TPR near the 1% FRR, no separation).
    strip, strip_clean = results["poisoned", "strip"], results["clean", "strip"]
    assert strip.verdict == Verdict.DETECTED and strip.scores["auroc"] > 0.9
    assert strip_clean.verdict == Verdict.NOT_DETECTED
    assert strip_clean.scores["tpr"] <= 0.1 and abs(strip_clean.scores["auroc"] - 0.5) < 0.15
    # AC: the target class's smaller activation cluster is the poison (measured 0.94-1.00 at
    # every precision). Whether the target is flagged is the published size rule's call: the
    # target class is ~50% poison, outside the minority-poison regime that rule assumes, so the
    # smaller cluster sits near the 0.35 bound and the flag follows the model (this seed's FP32
    # model is not flagged, its INT8 copies are). The test checks the rule is applied as
    # published; whatever else it flags is reported as false alarms, never folded into the hit.
    ac = results["poisoned", "activation_clustering"]
    assert ac.details["target_class"]["smaller_cluster_poison_fraction"] >= 0.9
    target_record = ac.details["per_class"][str(digits_world.target)]
    published_rule = target_record["relative_size"] < 0.35 and target_record["silhouette"] > 0.10
    assert target_record["flagged"] is published_rule
    assert ac.target_hit is published_rule
    assert ac.verdict == (Verdict.DETECTED if published_rule else Verdict.NOT_DETECTED)
    assert ac.false_alarm_labels == [k for k in ac.flagged_labels if k != digits_world.target]
    assert ac.exact_target_hit is (ac.flagged_labels == [digits_world.target])
    ac_clean = results["clean", "activation_clustering"]
    assert ac_clean.target_hit is None and ac_clean.false_alarm_labels == ac_clean.flagged_labels
    # SS with ε bounded by the 10% poison budget removes most of the planted poison (the
    # target class is ~50% poison, so its spectral gap does not stand out). Its label flag is
    # the project's spectral-gap z-score, which raises false alarms on some clean models (on
    # GTSRB 2-3 of 5; here label 4 on the FP32 clean control since float kernels became
    # vendor-independent): on a clean control every flag is a false alarm and the verdict an
    # alarm exactly when something is flagged.
    ss = results["poisoned", "spectral_signatures"]
    assert ss.details["epsilon_source"] == "poison_budget"
    assert ss.details["target_class"]["removed_poison_recall"] >= 0.8
    ss_clean = results["clean", "spectral_signatures"]
    assert ss_clean.target_hit is None
    assert ss_clean.false_alarm_labels == ss_clean.flagged_labels
    assert ss_clean.verdict == (
        Verdict.DETECTED if ss_clean.flagged_labels else Verdict.NOT_DETECTED
    )


def test_strip_normal_threshold_falls_below_zero_on_skewed_entropies_and_empirical_does_not():
    # most clean inputs confidently classified (entropy ~0), a tail of uncertain ones
    rng = np.random.default_rng(0)
    clean = np.r_[np.abs(rng.normal(0, 0.02, 90)), rng.uniform(1.0, 3.0, 30)]
    normal_thr, _, _ = normal_threshold(clean, 0.01)
    empirical_thr = empirical_threshold(clean, 0.01)
    assert normal_thr < 0  # no entropy can fall below it: TPR is 0 by construction
    assert 0 <= empirical_thr <= np.sort(clean)[2]
    assert np.mean(clean < empirical_thr) <= 0.01 + 1 / len(clean)


def test_strip_threshold_fit_selects_the_threshold_and_reports_the_other():
    params = SMALL_STRIP | {"n_test": 200}
    normal = build_defense("strip", params).run(
        FakeAdapter(), strip_data(), np.random.default_rng(0)
    )
    empirical = build_defense("strip", params | {"threshold_fit": "empirical"}).run(
        FakeAdapter(), strip_data(), np.random.default_rng(0)
    )
    thresholds = normal.details["thresholds"]
    assert normal.threshold == thresholds["normal"]
    assert (
        empirical.threshold
        == thresholds["empirical"]
        == empirical.details["thresholds"]["empirical"]
    )
    assert normal.scores["tpr_empirical_threshold"] == empirical.scores["tpr"]
    assert empirical.scores["tpr_normal_threshold"] == normal.scores["tpr"]


def test_strips_auroc_is_the_probability_a_triggered_input_is_less_entropic(monkeypatch):
    """Protocol v2 §4.4: ``scores.auroc`` = P(triggered entropy < clean entropy) + ½ P(tie),
    over the clean inputs the run measured (threshold and evaluation sets) and the triggered
    ones. Planted entropies: clean alternate 1 and 3 bits; triggered: the first half 0.5 bits
    (below every clean one: 1), the rest 3 bits (above the 1s: 0; tied with the 3s: ½), so
    ½ · 1 + ½ · (½ · 0 + ½ · ½) = 0.625; the opposite orientation would give 0.375."""
    sizes: list[int] = []

    def planted(adapter, x, pool, p, rng):
        sizes.append(n := len(x))
        if len(sizes) < 3:  # the threshold set, then the evaluation set
            return np.where(np.arange(n) % 2 == 0, 1.0, 3.0)
        return np.where(np.arange(n) < n // 2, 0.5, 3.0)  # the triggered inputs

    monkeypatch.setattr(strip_module, "strip_entropies", planted)
    result = build_defense("strip", SMALL_STRIP).run(
        FakeAdapter(), strip_data(), np.random.default_rng(0)
    )
    assert result.status == "ok" and len(sizes) == 3
    assert all(n % 2 == 0 for n in sizes)  # exact halves, as the hand count assumes
    assert result.scores["auroc"] == pytest.approx(0.625)
