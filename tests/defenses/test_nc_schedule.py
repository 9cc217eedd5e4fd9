"""Neural Cleanse's label scheduling and three-valued verdict.

The interval MAD rule is the paper's rule on exact norms and sound on intervals; a label's
trajectory does not depend on the labels optimised beside it; a label that never reached the
attack-success threshold makes the verdict inconclusive exactly when it could change it; the
replica says which logits its output quantizer clamps (where the deployed gradient is zero).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from defenses.neural_cleanse import (
    NeuralCleanseParams,
    ReversedTriggers,
    TriggerSearch,
    _KerasAdam,
    decide,
    flag_bounds,
    flag_small_norm_outliers,
    mad_anomaly_index,
)
from harness.runtime.adapter import RuntimeAdapter


def _norm_sets(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """Norm vectors like a scan's: a bulk, sometimes a small outlier, ties, odd and even sizes."""
    sets = []
    for i in range(count):
        n = int(rng.integers(3, 44))
        norms = rng.normal(50.0, 8.0, size=n).round(1 if i % 3 == 0 else 6)  # rounding: ties
        if i % 2:
            norms[rng.integers(n)] = rng.uniform(5.0, 30.0)
        sets.append(np.abs(norms))
    return sets


# ---------------------------------------------------------------------------- interval MAD rule
def test_flag_bounds_on_exact_norms_is_the_papers_rule():
    rng = np.random.default_rng(0)
    for norms in [*_norm_sets(rng, 300), np.array([5.0, 5.0, 5.0, 5.0, 1.0])]:
        bounds = flag_bounds(norms, norms)
        expected = flag_small_norm_outliers(norms)
        assert bounds.sure == bounds.possible == expected
        assert bounds.median[0] == bounds.median[1] == np.median(norms)


def test_flag_bounds_hold_for_every_norm_within_the_intervals():
    rng = np.random.default_rng(1)
    for norms in _norm_sets(rng, 120):
        n = len(norms)
        width = rng.uniform(0, 0.6, size=n) * (rng.random(n) < 0.5)
        lower, upper = norms * (1 - width), norms.copy()
        upper[rng.random(n) < 0.05] = np.inf  # a label that never reached the threshold
        lower[~np.isfinite(upper)] = 0.0
        bounds = flag_bounds(lower, upper)
        assert set(bounds.sure) <= set(bounds.possible)
        for _ in range(40):
            finite_top = np.where(np.isfinite(upper), upper, 200.0)
            sample = rng.uniform(lower, finite_top)
            corners = rng.random(n) < 0.3  # the extremes are where a loose bound would break
            sample[corners] = np.where(rng.random(n) < 0.5, lower, finite_top)[corners]
            flagged = set(flag_small_norm_outliers(sample))
            assert set(bounds.sure) <= flagged <= set(bounds.possible), (lower, upper, sample)


def test_irrelevant_labels_cannot_move_the_median_the_mad_or_any_flag():
    rng = np.random.default_rng(2)
    checked = 0
    for norms in _norm_sets(rng, 300):
        n = len(norms)
        lower = norms * rng.uniform(0.6, 1.0, size=n)
        bounds = flag_bounds(lower, norms)
        irrelevant = bounds.irrelevant(lower)
        if not irrelevant.any():
            continue
        for _ in range(20):
            base = rng.uniform(lower, norms)
            moved = base.copy()
            moved[irrelevant] = lower[irrelevant] + rng.exponential(50.0, irrelevant.sum())
            _, median, mad = mad_anomaly_index(base)
            _, median_moved, mad_moved = mad_anomaly_index(moved)
            assert (median, mad) == (median_moved, mad_moved)
            assert flag_small_norm_outliers(base) == flag_small_norm_outliers(moved)
            checked += 1
    assert checked >= 300  # the property was exercised, not skipped


# ---------------------------------------------------------------------------- non-convergence
def _triggers(norms: list[float], reached: list[bool]) -> ReversedTriggers:
    norms_a = np.array(norms, dtype=np.float64)
    hit = np.array(reached)
    labels = len(norms)
    return ReversedTriggers(
        masks=np.zeros((labels, 2, 2), np.float32),
        patterns=np.zeros((labels, 2, 2, 1), np.float32),
        norms=norms_a,
        lower=np.where(hit, norms_a, 0.0),
        upper=np.where(hit, norms_a, np.inf),
        reached=hit,
        status=["converged" if r else "budget" for r in reached],
        replica_success=np.where(hit, 1.0, 0.5),
        steps_run=np.full(labels, 10),
        final_cost=np.zeros(labels),
        saturated=np.where(hit, 0.0, 0.8),
        tail_ratio=0.5,
        observed_tail_ratio=None,
    )


BULK = [40.0, 42.0, 44.0, 45.0, 47.0, 50.0, 52.0, 55.0]


def test_a_label_that_never_converged_makes_a_clean_verdict_inconclusive():
    triggers = _triggers([*BULK, 48.0], [True] * 8 + [False])
    decision = decide(triggers, target_label=None, threshold=2.0, output_gradient="deployed")
    # with a tiny norm label 8 would be an outlier, with a large one nothing is flagged
    assert decision.detected is None
    assert decision.undetermined == [8]
    assert "labels [8] never reached the attack-success threshold" in decision.inconclusive
    assert "labels [8] had their target logit clamped by the output" in decision.inconclusive
    straight = decide(triggers, None, 2.0, output_gradient="straight_through")
    assert "clamped" not in straight.inconclusive


def test_a_label_that_never_converged_cannot_hide_a_clear_target():
    # label 0 is flagged whatever norm the unconverged label 8 would have had
    triggers = _triggers([3.0, *BULK[1:], 48.0], [True] * 8 + [False])
    decision = decide(triggers, target_label=0, threshold=2.0, output_gradient="deployed")
    assert decision.detected is True and decision.inconclusive is None
    assert decision.flagged == [0] and decision.undetermined == [8]
    # on a clean model the same norms are an alarm whatever label 8 does
    assert decide(triggers, None, 2.0, "deployed").detected is True
    # and a target in the bulk is not flagged whatever label 8 does
    triggers = _triggers([*BULK, 48.0], [True] * 8 + [False])
    assert decide(triggers, 3, 2.0, "deployed").detected is False


def test_converged_labels_give_the_papers_verdict():
    norms = [3.0, *BULK]
    decision = decide(_triggers(norms, [True] * 9), 0, 2.0, "deployed")
    assert decision.detected is True and decision.inconclusive is None
    assert decision.flagged == flag_small_norm_outliers(np.array(norms)) == [0]


# ---------------------------------------------------------------------------- optimiser state
def test_keras_adam_is_the_authors_update():
    weight = torch.zeros((2, 2), requires_grad=True)
    adam = _KerasAdam([weight], NeuralCleanseParams())
    grads = [torch.tensor([[1.0, -2.0], [0.5, 0.25]]), torch.tensor([[-1.0, 3.0], [0.5, 0.0]])]
    m = v = torch.zeros((2, 2), dtype=torch.float64)
    expected = torch.zeros((2, 2), dtype=torch.float64)
    for t, grad in enumerate(grads, start=1):
        weight.grad = grad.clone()
        adam.step()
        # Keras 2: lr_t = lr·√(1-β2ᵗ)/(1-β1ᵗ); p -= lr_t·m/(√v + ε)
        m = 0.5 * m + 0.5 * grad.double()
        v = 0.9 * v + 0.1 * grad.double() ** 2
        expected -= 0.1 * np.sqrt(1 - 0.9**t) / (1 - 0.5**t) * m / (v.sqrt() + 1e-7)
        np.testing.assert_allclose(weight.detach().numpy(), expected.numpy(), rtol=1e-5)
    assert weight.grad is None  # consumed: the next mini-batch starts from zero


def _tiny_forward() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    ).eval()


def test_a_labels_trajectory_does_not_depend_on_the_labels_beside_it():
    model = _tiny_forward()
    images = np.random.default_rng(3).integers(0, 256, size=(24, 4, 4, 1)).astype(np.uint8)
    params = NeuralCleanseParams(n_samples=24, batch_size=8)
    alone = TriggerSearch(model, images, 3, params, seed=5)
    together = TriggerSearch(model, images, 3, params, seed=5)
    threaded = TriggerSearch(model, images, 3, params, seed=5)
    with ThreadPoolExecutor(2) as pool:
        for _ in range(12):
            alone.step(np.array([1]))
            together.step(np.array([0, 1, 2]))
            threaded.step(np.array([0, 1, 2]), pool)
    assert torch.equal(alone.state[1].mask_param, together.state[1].mask_param)
    assert torch.equal(alone.state[1].pattern_param, together.state[1].pattern_param)
    assert alone.schedule.cost[1] == together.schedule.cost[1]
    for k in range(3):  # labels in worker threads compute exactly what they compute in turn
        assert torch.equal(threaded.state[k].mask_param, together.state[k].mask_param)
    np.testing.assert_array_equal(threaded.norms(), together.norms())
    assert alone.steps_run.tolist() == [0, 12, 0]
    assert not torch.equal(alone.state[0].mask_param, together.state[0].mask_param)


@pytest.mark.parametrize("threshold", [0.3, 1.0])
def test_bounds_are_exact_once_labels_finish_and_open_before(threshold):
    model = _tiny_forward()
    images = np.random.default_rng(4).integers(0, 256, size=(16, 4, 4, 1)).astype(np.uint8)
    params = NeuralCleanseParams(
        n_samples=16, batch_size=8, steps=6, attack_success_threshold=threshold
    )
    search = TriggerSearch(model, images, 3, params, seed=1)
    for _ in range(6):
        search.step(np.arange(3))
    lower, upper = search.bounds()
    assert search.done.all()
    reached = search.reached
    np.testing.assert_array_equal(lower[reached], search.norms()[reached])
    np.testing.assert_array_equal(upper[reached], search.norms()[reached])
    assert (lower[~reached] == 0).all() and np.isinf(upper[~reached]).all()


# ---------------------------------------------------------------------------- output quantizer
def test_the_output_quantizer_marks_the_clamped_logits_whose_gradient_is_zero(digits_world):
    adapter = RuntimeAdapter.from_path(digits_world.poisoned["int8-static"])
    oracle = adapter.gradient_oracle()
    quantizer = oracle.output_quantizer
    assert quantizer is not None  # the QDQ graph ends in a logits quantizer
    fp32 = RuntimeAdapter.from_path(digits_world.poisoned["fp32"]).gradient_oracle()
    assert fp32.output_quantizer is None
    images = digits_world.triggered_x[:64].astype(np.float32)
    pixels = torch.from_numpy(images).requires_grad_(True)
    logits, pre = oracle.logits_with_pre_quantizer(pixels)
    np.testing.assert_array_equal(logits.detach().numpy(), oracle.logits(images).detach().numpy())
    target = digits_world.target
    clamped = quantizer.saturated_high(pre[:, target])
    assert clamped.any() and not clamped.all()  # the trigger pushes some past the range
    top = (quantizer.qrange[1] - quantizer.zero_point) * quantizer.scale
    assert torch.equal(logits[clamped, target], torch.full((int(clamped.sum()),), np.float32(top)))
    logits[:, target].sum().backward()
    per_image = pixels.grad.abs().sum(dim=(1, 2, 3))
    assert (per_image[clamped] == 0).all()  # the deployed STE gradient: nothing to follow
    assert (per_image[~clamped] > 0).all()
