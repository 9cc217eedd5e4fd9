"""docs/protocol.md v1 §5's statistics pinned against hand-computed values (protocol §7).

Each expected number below is worked out in the comment beside it, not taken from the code under
test: the AUROC by counting pairs, McNemar from the binomial distribution, Holm by its step-down
rule, Wilson from its closed form.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score

from harness.core.metrics import wilson_interval
from harness.report.stats import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    auroc,
    bootstrap_auroc_ci,
    holm,
    mcnemar_exact,
    min_discordant_to_reject,
)


def test_the_protocol_constants():
    assert (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED) == (10_000, 20261207)


def test_auroc_counts_pairs_with_ties_as_one_half():
    # 0.9 and 0.8 beat all three clean scores (3 + 3); 0.4 loses to 0.5, ties 0.4 (½) and
    # beats 0.1 (1): 7.5 of 9 pairs
    assert auroc([0.9, 0.8, 0.4], [0.5, 0.4, 0.1]) == pytest.approx(7.5 / 9)
    assert auroc([0.9, 0.8, 0.4], [0.5, 0.4, 0.1]) == pytest.approx(
        roc_auc_score([1, 1, 1, 0, 0, 0], [0.9, 0.8, 0.4, 0.5, 0.4, 0.1])
    )
    assert auroc([1.0, 1.0], [1.0]) == 0.5  # every pair a tie
    assert auroc([0.0], [1.0, 2.0]) == 0.0  # clean always higher
    assert auroc([-1.0, 0.3], [-1.0, -1.0]) == pytest.approx(0.75)  # AC's −1 ties: (½+½+1+1)/4


def test_auroc_refuses_empty_sides_and_non_finite_scores():
    with pytest.raises(ValueError):
        auroc([], [1.0])
    with pytest.raises(ValueError):
        auroc([math.nan], [1.0])


def test_bootstrap_resamples_within_each_group_from_the_protocol_seed():
    """The interval is the percentile interval of the AUROCs of explicitly resampled scores,
    poisoned indices drawn first, then clean, from ``default_rng(20261207)``."""
    pos = np.array([2.0, 0.5, 1.5, 3.0, 0.2])
    neg = np.array([0.1, 1.0, 0.4, 0.6])
    resamples = 2000
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    draw_pos = rng.integers(0, len(pos), size=(resamples, len(pos)))
    draw_neg = rng.integers(0, len(neg), size=(resamples, len(neg)))
    values = [auroc(pos[a], neg[b]) for a, b in zip(draw_pos, draw_neg, strict=True)]
    expected = np.quantile(values, [0.025, 0.975])
    got = bootstrap_auroc_ci(pos, neg, resamples=resamples)
    assert got == pytest.approx(tuple(expected), abs=1e-12)
    assert got == bootstrap_auroc_ci(pos, neg, resamples=resamples)  # deterministic


def test_bootstrap_interval_of_a_perfect_and_of_a_null_separation():
    # every resample of perfectly separated groups is still perfectly separated: [1, 1]
    assert bootstrap_auroc_ci([5, 6, 7], [1, 2, 3]) == (1.0, 1.0)
    # identical scores tie in every resample: [0.5, 0.5]
    assert bootstrap_auroc_ci([1, 1, 1], [1, 1]) == (0.5, 0.5)
    # one poisoned score between two clean ones: a resample's AUROC is 1 (both clean draws
    # low, p = ¼), 0 (both high, ¼) or ½: the 2.5% and 97.5% quantiles are 0 and 1
    assert bootstrap_auroc_ci([1.0], [0.0, 2.0]) == (0.0, 1.0)


@pytest.mark.parametrize(
    "fp32_only, other_only, expected",
    [
        (6, 0, 2 * 0.5**6),  # 0.03125: the protocol's "6: p = 0.031"
        (0, 6, 2 * 0.5**6),  # two-sided: the direction does not matter
        (5, 0, 2 * 0.5**5),  # 0.0625: the protocol's "5: p = 0.063"
        (3, 1, 2 * (1 + 4) / 16),  # 2 · P(X ≤ 1), X ~ Bin(4, ½) = 0.625
        (10, 2, 2 * (1 + 12 + 66) / 4096),  # 2 · P(X ≤ 2), X ~ Bin(12, ½) = 0.0386
        (2, 2, 1.0),
        (0, 0, 1.0),  # no discordant pair: no evidence of a change
    ],
)
def test_exact_mcnemar_is_the_two_sided_binomial_test_on_discordant_pairs(
    fp32_only, other_only, expected
):
    p = mcnemar_exact(fp32_only, other_only)
    assert p == pytest.approx(expected)
    if fp32_only + other_only:
        assert p == pytest.approx(binomtest(fp32_only, fp32_only + other_only, 0.5).pvalue)


def test_fewer_than_six_discordant_pairs_cannot_reject_at_5_percent():
    assert min_discordant_to_reject() == 6
    assert min_discordant_to_reject(0.01) == 8  # 2·½⁸ = 0.0078; 2·½⁷ = 0.0156


@pytest.mark.parametrize(
    "pvalues, expected",
    [
        # sorted 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → monotone: 0.03, 0.06, 0.06
        ([0.01, 0.04, 0.03], [0.03, 0.06, 0.06]),
        # 0.001·4, 0.02·3, 0.04·2, 0.5·1
        ([0.5, 0.001, 0.02, 0.04], [0.5, 0.004, 0.06, 0.08]),
        ([0.6, 0.7], [1.0, 1.0]),  # 1.2 capped at 1, and monotone
        ([0.03125], [0.03125]),  # one test: unadjusted
        ([], []),
    ],
)
def test_holm_adjusts_step_down_in_the_given_order(pvalues, expected):
    assert holm(pvalues) == pytest.approx(expected)


def test_holm_refuses_what_is_not_a_p_value():
    with pytest.raises(ValueError):
        holm([0.2, 1.5])


@pytest.mark.parametrize(
    "k, n, low, high",
    [
        # z = 1.96, z² = 3.8416: centre (k + z²/2)/(n + z²), half-width
        # z/(n + z²) · sqrt(k(n − k)/n + z²/4)
        (0, 5, 0.0, 0.43448),  # centre = half = 1.9208/8.8416
        (3, 5, 0.23072, 0.88236),  # centre 0.55655, half 0.32583
        (1, 1, 0.20655, 1.0),  # the one-seed interval: wide, not meaningless
    ],
)
def test_wilson_interval_matches_its_closed_form(k, n, low, high):
    assert wilson_interval(k, n) == pytest.approx((low, high), abs=1e-4)
