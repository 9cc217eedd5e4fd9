"""Neural Cleanse's step content (docs/protocol.md §4.1) and its onnxruntime confirmation.

The authors' step is a pass over the sample in mini-batches of 32, and their patience and early
stop count steps; the pre-v1 16-image step survives as the ``fast`` profile, unchanged bit for
bit; a flag whose reversed trigger fails on the deployed session counts only when it cannot
change the verdict.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import defenses.neural_cleanse as nc
from defenses.base import DefenseData, Verdict, build_defense
from defenses.neural_cleanse import (
    PROFILES,
    Decision,
    NeuralCleanseParams,
    ReversedTriggers,
    TriggerSearch,
    confirm,
    reverse_engineer,
)


# ---------------------------------------------------------------------------- profiles
def test_the_paper_profile_is_the_default_and_the_fast_one_is_the_old_grid_budget():
    paper, fast = NeuralCleanseParams(), NeuralCleanseParams(profile="fast")
    assert (paper.profile, paper.n_samples, paper.batch_size) == ("paper", 1000, 32)
    assert (fast.n_samples, fast.batch_size) == (16, 16)
    assert PROFILES["fast"] == {"n_samples": 16, "batch_size": 16}
    assert not paper.custom_step and not fast.custom_step
    # explicit values override the profile's, and say so
    custom = NeuralCleanseParams(profile="fast", n_samples=64)
    assert (custom.n_samples, custom.batch_size, custom.custom_step) == (64, 16, True)
    assert NeuralCleanseParams(n_samples=16, batch_size=16).custom_step  # the pre-v1 configs
    for params in (paper, fast, custom):  # a recorded run's params rebuild the same params
        assert NeuralCleanseParams(**params.model_dump()) == params


class _Counting(torch.nn.Module):
    """Predicts class 0 for everything with a gradient of zero, and counts its calls.

    Label 0 therefore succeeds at every step and its mask never moves (Adam on a zero gradient
    takes no step while the cost is 0), which makes the schedule's counters easy to read.
    """

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.bias = torch.zeros(classes)
        self.bias[0] = 1.0
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(x))
        return (x.flatten(1) * 0.0).sum(dim=1, keepdim=True) + self.bias


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, 4, 4, 1)).astype(np.uint8)


@pytest.mark.parametrize(("n", "batch", "sizes"), [(70, 32, [32, 32, 6]), (64, 32, [32, 32])])
def test_a_step_makes_one_update_per_mini_batch(n, batch, sizes):
    forward = _Counting()
    params = NeuralCleanseParams(n_samples=n, batch_size=batch)
    search = TriggerSearch(forward, _images(n), 3, params, seed=0)
    search.step(np.array([1]))
    assert forward.batches == sizes  # a pass over the sample, the last mini-batch smaller
    assert search.state[1].adam.t == math.ceil(n / batch) == len(sizes)
    assert search.steps_run.tolist() == [0, 1, 0]


def test_the_paper_step_is_32_updates_over_1000_images():
    forward = _Counting()
    params = NeuralCleanseParams()
    search = TriggerSearch(forward, _images(params.n_samples), 3, params, seed=0)
    search.step(np.array([0]))
    assert forward.batches == [32] * 31 + [8]
    assert search.state[0].adam.t == 32


def test_patience_and_early_stop_count_steps_not_updates():
    # tiny lr and a lax improvement threshold: the mask stays put, so every step after the first
    # success is a step "without improvement"
    params = NeuralCleanseParams(n_samples=70, batch_size=32, lr=1e-9, early_stop_threshold=0.5)
    updates = math.ceil(70 / 32)
    search = TriggerSearch(_Counting(), _images(70), 3, params, seed=0)
    for step in range(1, params.patience + 1):
        assert search.schedule.cost[0] == 0  # the cost starts after `patience` successful steps
        search.step(np.array([0]))
        assert search.schedule.set_counter[0] == step
        assert search.schedule.es_counter[0] == step - 1
    assert search.schedule.cost[0] == params.init_cost
    assert search.state[0].adam.t == params.patience * updates
    # with the cost moved both ways, the label stops after 5·patience steps without a smaller
    # mask: 26 steps here (the first success sets the best), i.e. 78 updates, not 25 updates
    search.schedule.up_flag[0] = search.schedule.down_flag[0] = True
    while not search.done[0]:
        search.step(np.array([0]))
    assert search.stopped_early[0]
    assert search.steps_run[0] == 5 * params.patience + 1
    assert search.state[0].adam.t == (5 * params.patience + 1) * updates


FAST_DIGEST = "0a6f0fce20097a5fad559b64495ee0da2babb832a48965cb4983ec9c72e7ee41"
"""SHA-256 of masks, patterns, norms, steps and final costs of the scan below, recorded with the
code of commit 3f122c3 (before profiles existed) from ``NeuralCleanseParams(n_samples=16,
batch_size=16, steps=120, init_cost=1e-2)``, on AMD EPYC with the float-kernel pins of
``harness.core.determinism``."""


def test_the_fast_profile_computes_what_the_pre_v1_budget_computed_bit_for_bit():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(48, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    ).eval()
    images = np.random.default_rng(7).integers(0, 256, size=(40, 4, 4, 3)).astype(np.uint8)
    params = NeuralCleanseParams(profile="fast", steps=120, init_cost=1e-2)
    out = reverse_engineer(model, images[: params.n_samples], 4, params, seed=11)
    digest = hashlib.sha256()
    for array in (out.masks, out.patterns, out.norms, out.steps_run, out.final_cost):
        digest.update(np.ascontiguousarray(array).tobytes())
    assert out.steps_run.tolist() == [120, 120, 120, 107]
    assert digest.hexdigest() == FAST_DIGEST


def test_every_profile_confirms_on_the_same_held_out_images():
    data = _data(target=0)
    splits = {}
    for profile in PROFILES:
        params = NeuralCleanseParams(profile=profile, n_eval=30)
        opt, held_out, _ = nc._split(data, params, np.random.default_rng(5))
        assert not set(opt) & set(held_out) and len(held_out) == 30
        splits[profile] = (opt, held_out)
    assert len(splits["fast"][0]) == 16 and len(splits["paper"][0]) == 120 - 30
    np.testing.assert_array_equal(splits["fast"][1], splits["paper"][1])
    np.testing.assert_array_equal(splits["fast"][0], splits["paper"][0][:16])


# ---------------------------------------------------------------------------- confirmation
def _rates(**by_label: float) -> np.ndarray:
    rates = np.full(8, np.nan)
    for key, value in by_label.items():
        rates[int(key[1:])] = value
    return rates


def test_confirmed_flags_leave_the_decision_alone():
    decision = Decision(True, [0], [])
    assert confirm(decision, _rates(l0=0.95), 0, 0.9) is decision
    assert confirm(decision, _rates(l0=0.1), 0, None) is decision  # confirmation off


def test_an_unconfirmed_flag_that_cannot_change_the_verdict_is_only_listed():
    out = confirm(Decision(True, [0, 5], []), _rates(l0=0.97, l5=0.4), 0, 0.9)
    assert (out.detected, out.flagged, out.unconfirmed, out.inconclusive) == (True, [0], [5], None)
    # a clean control flagged twice, one of them confirmed: still a false alarm
    out = confirm(Decision(True, [2, 5], []), _rates(l2=0.93, l5=0.2), None, 0.9)
    assert (out.detected, out.flagged, out.unconfirmed) == (True, [2], [5])


@pytest.mark.parametrize(
    ("decision", "rates", "target"),
    [
        (Decision(True, [0], []), _rates(l0=0.6), 0),  # the target, unconfirmed
        (Decision(True, [0, 5], []), _rates(l0=0.5, l5=0.99), 0),  # only a non-target holds
        (Decision(True, [5], []), _rates(l5=0.3), None),  # a clean control's only flag
        (Decision(True, [5], []), _rates(), None),  # no rate measured confirms nothing
    ],
)
def test_an_unconfirmed_flag_that_could_change_the_verdict_makes_it_inconclusive(
    decision, rates, target
):
    out = confirm(decision, rates, target, 0.9)
    assert out.detected is None
    assert "not confirmed on the deployed session" in out.inconclusive
    assert "verdict depends on them" in out.inconclusive and "0.9" in out.inconclusive
    assert out.unconfirmed and set(out.unconfirmed) <= set(decision.flagged)


def test_an_undecided_verdict_stays_undecided_and_says_both_reasons():
    out = confirm(Decision(None, [0], [3], "labels [3] never reached"), _rates(l0=0.1), 0, 0.9)
    assert out.detected is None and out.flagged == [] and out.unconfirmed == [0]
    assert out.inconclusive.startswith("labels [3] never reached")
    assert "not confirmed" in out.inconclusive


# ---------------------------------------------------------------------------- the defense
LABELS, SIDE, TRIGGER_PIXEL = 8, 4, (3, 3)
NORMS = np.array([1.0, 10.0, 11.0, 9.5, 10.5, 12.0, 9.0, 11.5])  # label 0 an outlier (index > 2)


def _triggers() -> ReversedTriggers:
    """What the trigger search would return: a one-pixel white trigger for label 0 and large
    masks for the others (their patterns black, so they move nothing)."""
    masks = np.zeros((LABELS, SIDE, SIDE), np.float32)
    patterns = np.zeros((LABELS, SIDE, SIDE, 1), np.float32)
    masks[0][TRIGGER_PIXEL] = 1.0
    patterns[0][TRIGGER_PIXEL] = 255.0
    for k in range(1, LABELS):
        masks[k].flat[: int(NORMS[k])] = 1.0
        masks[k].flat[int(NORMS[k])] = NORMS[k] - int(NORMS[k])
    norms = masks.sum(axis=(1, 2)).astype(np.float64)
    return ReversedTriggers(
        masks=masks,
        patterns=patterns,
        norms=norms,
        lower=norms.copy(),
        upper=norms.copy(),
        reached=np.ones(LABELS, bool),
        status=["converged"] * LABELS,
        replica_success=np.ones(LABELS),
        steps_run=np.full(LABELS, 30),
        final_cost=np.full(LABELS, 1e-3),
        saturated=None,
        tail_ratio=0.5,
        observed_tail_ratio=None,
    )


@dataclass
class _Parity:
    passed: bool = True
    agreement: float = 1.0

    def summary(self) -> str:
        return "ok"


@dataclass
class _Oracle:
    output_quantizer: None = None

    def parity(self, images, threshold):
        return _Parity()

    def logits_with_pre_quantizer(self, pixels):  # never called: the search is replaced
        raise AssertionError


@dataclass
class _Counter:
    images: int = 0


@dataclass
class _Session:
    """The deployed model: label 0 when the trigger pixel is white (if it has the backdoor),
    otherwise the label its pixel sum says."""

    backdoor: bool
    counter: _Counter = field(default_factory=_Counter)

    def gradient_oracle(self) -> _Oracle:
        return _Oracle()

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        self.counter.images += len(pixels)
        labels = 1 + (pixels.reshape(len(pixels), -1).sum(axis=1).astype(np.int64) % 7)
        if self.backdoor:
            labels[pixels[:, TRIGGER_PIXEL[0], TRIGGER_PIXEL[1], 0] >= 250] = 0
        return labels


def _data(target: int | None) -> DefenseData:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 200, size=(120, SIDE, SIDE, 1)).astype(np.uint8)
    return DefenseData(
        num_classes=LABELS, clean_x=x, clean_y=rng.integers(0, LABELS, 120), target_label=target
    )


@pytest.mark.parametrize(
    ("backdoor", "threshold", "verdict"),
    [
        (True, 0.9, Verdict.DETECTED),  # the trigger works on the shipped file: confirmed
        (False, 0.9, Verdict.INCONCLUSIVE),  # the replica's trigger fails there: not a finding
        (False, None, Verdict.DETECTED),  # confirmation off: the pre-v1 verdict
    ],
)
def test_the_defense_confirms_its_flags_on_the_deployed_session(
    monkeypatch, backdoor, threshold, verdict
):
    monkeypatch.setattr(nc, "reverse_engineer", lambda *args, **kwargs: _triggers())
    params = {"profile": "fast", "n_eval": 50, "confirm_threshold": threshold}
    result = build_defense("neural_cleanse", params).run(
        _Session(backdoor), _data(target=0), np.random.default_rng(0)
    )
    assert result.verdict == verdict
    details = result.details
    assert details["flagged_before_confirmation"] == [0]
    assert details["ort_confirm_threshold"] == threshold
    assert details["profile"] == "fast" and details["updates_per_step"] == 1
    rate = details["ort_attack_success"][0]
    assert rate == (1.0 if backdoor else 0.0)  # measured on held-out images of other labels
    if verdict is Verdict.INCONCLUSIVE:
        assert details["unconfirmed_labels"] == [0] and result.flagged_labels == []
        assert "label" in result.verdict_reason and "0.000" in result.verdict_reason
    else:
        assert result.flagged_labels == [0] and result.target_hit


def test_the_side_by_side_bench_prints_one_row_per_scan():
    from bench.defenses.nc_profiles import table

    row = {
        "model": "poisoned",
        "precision": "fp32",
        "profile": "paper",
        "images_per_step": 350,
        "updates_per_step": 11,
        "verdict": "inconclusive",
        "flagged": [],
        "flagged_before_confirmation": [0],
        "ort_success_flagged": {0: 0.5},
        "smallest_mask_label": 0,
        "smallest_mask_ort_success": 0.5,
        "score": 2.5,
        "target_index": 2.5,
        "steps_total": 900,
        "wall_s": 10.0,
        "cpu_s": 9.0,
    }
    lines = table([row]).splitlines()
    assert len(lines) == 3 and lines[0].count("|") == lines[2].count("|")
    assert "| 350 / 11 | inconclusive | [] ([0]) | 0: 0.50 | 0, 0.50 | 2.50 |" in lines[2]
