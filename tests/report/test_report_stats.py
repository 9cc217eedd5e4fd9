"""docs/protocol.md v2 §5's statistics pinned against hand-computed values (protocol §7).

Each expected number below is worked out in the comment beside it, not taken from the code under
test: the AUROC by counting pairs, McNemar from the binomial distribution, Holm by its step-down
rule, Wilson from its closed form, the exact Mann–Whitney p by counting splits (and against
explicit enumeration and scipy's full permutation test).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import binomtest, permutation_test, rankdata
from sklearn.metrics import roc_auc_score

from harness.core.metrics import wilson_interval
from harness.report.stats import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    auroc,
    bootstrap_auroc_ci,
    holm,
    mann_whitney_exact,
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


def test_auroc_refuses_empty_sides_and_nan_scores():
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


# ------------------------------------------------------------------- exact Mann–Whitney (v2 §5)
def _enumerated_p(positive, negative) -> float:
    """The definition, spelled out: midranks of the pooled scores, every split of them into
    groups of the observed sizes, the share whose first group's rank sum reaches the observed."""
    ranks = rankdata([*positive, *negative], method="average")
    observed = ranks[: len(positive)].sum()
    splits = list(itertools.combinations(range(len(ranks)), len(positive)))
    return sum(ranks[list(s)].sum() >= observed - 1e-9 for s in splits) / len(splits)


@pytest.mark.parametrize(
    "positive, negative, expected",
    [
        # perfect separation: only the split that puts the three highest first reaches the
        # observed rank sum, one of C(6, 3) = 20 — the protocol's "3 + 3: p = 1/20 = 0.05"
        ([4.0, 5.0, 6.0], [1.0, 2.0, 3.0], 1 / 20),
        # 5 + 5: one of C(10, 5) = 252 — the protocol's "5 + 5: p = 1/252"
        ([6.0, 7.0, 8.0, 9.0, 10.0], [1.0, 2.0, 3.0, 4.0, 5.0], 1 / 252),
        # ties: pooled 1, 2, 2, 2, 3 have midranks 1, 3, 3, 3, 5; the poisoned {3, 2, 2} sum to
        # 5 + 3 + 3 = 11. The C(5, 3) = 10 splits, by the two items left out (total 15):
        # {1, 3} ×3 → 11, {1, 5} ×1 → 9, {3, 3} ×3 → 9, {3, 5} ×3 → 7: 3 of 10 reach 11
        ([3.0, 2.0, 2.0], [1.0, 2.0], 3 / 10),
        # +inf ranks highest and two +inf tie: pooled 0, 1, 2, inf, inf, inf → 1, 2, 3, 5, 5, 5;
        # poisoned {inf, inf, 2} sum 13. Of C(6, 3) = 20 splits, by how many 5s they take:
        # three (15) ×1, two plus 3 (13) ×3 reach 13; two plus 1 or 2 (11, 12) and fewer 5s
        # do not: 4 of 20
        ([math.inf, math.inf, 2.0], [math.inf, 1.0, 0.0], 4 / 20),
        # everything tied: every split has the same rank sum, p = 1
        ([1.0, 1.0], [1.0, 1.0, 1.0], 1.0),
        # reversed perfect separation: every split reaches the lowest sum, p = 1
        ([1.0, 2.0], [3.0, 4.0], 1.0),
        # one against one: 2 splits, the higher one is the observed: ½
        ([2.0], [1.0], 1 / 2),
    ],
)
def test_exact_mann_whitney_against_hand_counts(positive, negative, expected):
    assert mann_whitney_exact(positive, negative) == pytest.approx(expected, rel=1e-12)
    assert _enumerated_p(positive, negative) == pytest.approx(expected, rel=1e-12)


def test_exact_mann_whitney_agrees_with_scipys_full_permutation_test_on_ties():
    """scipy's permutation test over every split (``n_resamples=inf``; exact, no +1), with the
    U statistic of midranks, on score sets full of ties and an infinity."""
    rng = np.random.default_rng(7)
    for _ in range(25):
        n_pos, n_neg = rng.integers(2, 7, size=2)  # scipy needs two per side
        pos = rng.integers(0, 4, size=n_pos).astype(float)
        neg = rng.integers(0, 4, size=n_neg).astype(float)
        pos[rng.random(n_pos) < 0.2] = math.inf
        pooled = rankdata(np.r_[pos, neg], method="average")
        exact = permutation_test(
            (pooled[:n_pos], pooled[n_pos:]),
            lambda x, y, axis: np.sum(x, axis=axis),
            permutation_type="independent",
            alternative="greater",
            n_resamples=np.inf,
            vectorized=True,
        )
        assert mann_whitney_exact(pos, neg) == pytest.approx(exact.pvalue, rel=1e-9)
        assert mann_whitney_exact(pos, neg) == pytest.approx(_enumerated_p(pos, neg), rel=1e-12)


def test_exact_mann_whitney_at_the_protocols_largest_design_is_quick_and_exact():
    # S1's 10 + 10, perfectly separated: 1 of C(20, 10) = 184,756 splits
    assert mann_whitney_exact(range(10, 20), range(10)) == 1 / 184_756


def test_exact_mann_whitney_refuses_nan_and_empty_sides():
    with pytest.raises(ValueError):
        mann_whitney_exact([math.nan, 1.0], [0.0])
    with pytest.raises(ValueError):
        mann_whitney_exact([], [0.0])


def test_infinite_scores_rank_highest_and_tie_with_each_other():
    # 2 poisoned +inf against clean +inf: ½ each; against 1 and 0: 1 each → 2·(½ + 1 + 1) = 5;
    # poisoned 2 loses to +inf, beats 1 and 0 → 2: AUROC (5 + 2) / 9
    assert auroc([math.inf, math.inf, 2.0], [math.inf, 1.0, 0.0]) == pytest.approx(7 / 9)
    assert auroc([math.inf], [math.inf]) == 0.5  # a tie, not NaN
    assert auroc([math.inf, 5.0], [1e300, 0.0]) == pytest.approx(3 / 4)
    # an infinite score separates like any top score: every resample is perfectly separated
    assert bootstrap_auroc_ci([math.inf, math.inf, 9.0], [1.0, 2.0, 3.0]) == (1.0, 1.0)
    assert bootstrap_auroc_ci([math.inf, math.inf], [math.inf, math.inf]) == (0.5, 0.5)
