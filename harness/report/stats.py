"""The statistics docs/protocol.md v2 §5 pre-registers, as small pure functions.

Kept apart from the report's tables so each can be pinned against hand-computed values
(``tests/report/test_report_stats.py``), as protocol §7 asks, and so nothing about how a number is
computed hides in formatting code. Every constant the protocol fixes lives here, named:
:data:`BOOTSTRAP_RESAMPLES`, :data:`BOOTSTRAP_SEED`, :data:`CI_LEVEL`, :data:`ALPHA`.

- :func:`auroc`: the Mann–Whitney AUROC, ties counted one half (§5.1);
- :func:`mann_whitney_exact`: the exact one-sided Mann–Whitney test, "poisoned scores higher",
  over every split of the pooled scores into groups of the observed sizes, midranks for ties
  (§5, "How the claims are decided", v2);
- :func:`bootstrap_auroc_ci`: the percentile bootstrap, resampled separately within the
  poisoned and the clean group (stratified), from a generator seeded with the protocol's seed;
- :func:`mcnemar_exact`: the exact McNemar test, a two-sided binomial test on the discordant
  pairs (§5.3);
- :func:`holm`: Holm–Bonferroni adjusted p-values (§5, "How the claims are decided");
- :func:`min_discordant_to_reject`: the power statement the protocol asks beside every test.

Wilson intervals are :func:`harness.core.metrics.wilson_interval`, shared with the tallies.

Scores may be ``+inf`` (v2 §4.1: Neural Cleanse's anomaly index when the MAD of the norms is 0):
every function here compares scores rather than subtracting them, so ``+inf`` ranks above every
finite score and two ``+inf`` tie. NaN is refused (it has no rank; the report counts such a
score as missing before it gets here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest, rankdata

BOOTSTRAP_RESAMPLES = 10_000
"""Protocol v2 §5.1: resamples of the AUROC bootstrap."""
BOOTSTRAP_SEED = 20261207
"""Protocol v2 §5.1: the bootstrap generator's seed (``numpy.random.default_rng``)."""
CI_LEVEL = 0.95
ALPHA = 0.05
"""Protocol v2 §5: the level every claim is decided at (after Holm where it applies)."""


def _scores(values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    if np.any(np.isnan(array)):
        raise ValueError("scores must be numbers (±inf ranks; NaN has no rank)")
    return array


def _wins(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """``W[i, j]`` = 1 when positive ``i`` outscores negative ``j``, ½ on a tie, else 0.

    Compared, not subtracted: ``inf − inf`` is NaN, but ``inf == inf`` is a tie."""
    pos, neg = positive[:, None], negative[None, :]
    return (pos > neg) + 0.5 * (pos == neg)


def auroc(positive: Sequence[float] | np.ndarray, negative: Sequence[float] | np.ndarray) -> float:
    """P(a positive's score > a negative's) + ½ P(tie): the Mann–Whitney U over n⁺·n⁻.

    Counted pair by pair rather than through a ROC curve so the tie rule is the protocol's
    exactly and visibly (a model-level score such as AC's −1 for "no small cluster" ties often).
    """
    pos, neg = _scores(positive), _scores(negative)
    if not len(pos) or not len(neg):
        raise ValueError("AUROC needs at least one score on each side")
    return float(_wins(pos, neg).mean())


def mann_whitney_exact(
    positive: Sequence[float] | np.ndarray, negative: Sequence[float] | np.ndarray
) -> float:
    """Exact one-sided Mann–Whitney p-value, alternative "positive (poisoned) scores higher".

    The pooled scores get midranks (tied scores share the mean of the ranks they span; two
    ``+inf`` tie at the top). Under the null every split of the pooled scores into a group of
    ``n⁺`` and one of ``n⁻`` is equally likely; the p-value is the fraction of the
    ``C(n⁺ + n⁻, n⁺)`` splits whose positive-group rank sum is at least the observed one — the
    rank sum is ``U + n⁺(n⁺ + 1)/2``, so this is the test of :func:`auroc` ``= U / (n⁺ n⁻)``.

    The splits are counted, not listed: midranks are multiples of ½, so twice each is an
    integer, and a subset-sum recursion over the pooled items counts, for every size ``k`` and
    doubled rank sum ``s``, how many ``k``-subsets reach ``s`` — exactly the enumeration's
    tally, in Python integers (no rounding), in ``O(N² · n⁺)`` steps instead of ``C(N, n⁺)``.
    ``tests/report/test_report_stats.py`` checks it against explicit enumeration and against
    ``scipy.stats.permutation_test`` with every permutation (``n_resamples=inf``).
    (``scipy.stats.mannwhitneyu(method="exact")`` is not used: its exact null distribution
    assumes no ties.)

    Perfect separation gives the smallest p that ``n⁺ + n⁻`` allows, ``1 / C(N, n⁺)``:
    3 + 3 → 1/20 = 0.05, 5 + 5 → 1/252.
    """
    pos, neg = _scores(positive), _scores(negative)
    if not len(pos) or not len(neg):
        raise ValueError("the Mann–Whitney test needs at least one score on each side")
    doubled = np.rint(2 * rankdata(np.concatenate([pos, neg]), method="average")).astype(int)
    observed = int(doubled[: len(pos)].sum())
    size, top = len(pos), int(doubled.sum())
    # ways[k][s]: k-subsets of the items seen so far with doubled rank sum s
    ways = [[0] * (top + 1) for _ in range(size + 1)]
    ways[0][0] = 1
    for rank in doubled.tolist():
        for k in range(size, 0, -1):
            below, row = ways[k - 1], ways[k]
            for s in range(top - rank, -1, -1):
                if below[s]:
                    row[s + rank] += below[s]
    extreme = sum(ways[size][observed:])
    total = math.comb(len(doubled), size)
    assert sum(ways[size]) == total  # every split counted once
    return extreme / total


def bootstrap_auroc_ci(
    positive: Sequence[float] | np.ndarray,
    negative: Sequence[float] | np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = CI_LEVEL,
) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`auroc`, stratified by group.

    Each resample draws ``n⁺`` positives with replacement from the positives and ``n⁻``
    negatives from the negatives, so every resample keeps the design's group sizes (a pooled
    draw could leave a side empty). The draws come from ``numpy.random.default_rng(seed)``, a
    fresh generator per interval — so an interval does not depend on which other cells the
    store holds — positives first (a ``resamples × n⁺`` index matrix), then negatives. Each
    resample's AUROC is ``c⁺ᵀ W c⁻ / (n⁺ n⁻)`` with ``c`` the draw counts and ``W`` the pairwise
    win matrix, which is exactly the AUROC of the resampled scores. The interval is the
    ``(1 − level)/2`` and ``(1 + level)/2`` quantiles (numpy's default linear interpolation).
    """
    pos, neg = _scores(positive), _scores(negative)
    if not len(pos) or not len(neg):
        raise ValueError("a bootstrap interval needs at least one score on each side")
    rng = np.random.default_rng(seed)
    draws_pos = rng.integers(0, len(pos), size=(resamples, len(pos)))
    draws_neg = rng.integers(0, len(neg), size=(resamples, len(neg)))
    counts_pos, counts_neg = _draw_counts(draws_pos), _draw_counts(draws_neg)
    wins = _wins(pos, neg)
    values = np.einsum("bi,ij,bj->b", counts_pos, wins, counts_neg) / (len(pos) * len(neg))
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def _draw_counts(draws: np.ndarray) -> np.ndarray:
    """How often each item was drawn, per resample (row): one ``bincount`` over offset rows."""
    rows, n = draws.shape
    flat = (draws + n * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n)


def mcnemar_exact(reference_only: int, other_only: int) -> float:
    """Two-sided exact McNemar p-value from the two discordant counts.

    Under "no change" each discordant pair falls either way with probability ½, so the test is
    a binomial test of ``reference_only`` out of the discordant pairs (scipy's two-sided
    ``binomtest``). No discordant pair is no evidence of a change: p = 1.
    """
    if reference_only < 0 or other_only < 0:
        raise ValueError("discordant counts must be non-negative")
    n = reference_only + other_only
    if n == 0:
        return 1.0
    return float(binomtest(reference_only, n, 0.5, alternative="two-sided").pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the order given.

    Step-down: the ``i``-th smallest of ``m`` p-values is multiplied by ``m − i`` (``i`` from
    0), each adjusted value is at least the one before it (monotone), and none exceeds 1. The
    report rejects when the adjusted value is below α (``p_holm < ALPHA``), the protocol's
    "reaches p < 0.05".
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.size and (np.any(p < 0) or np.any(p > 1) or not np.all(np.isfinite(p))):
        raise ValueError("p-values must lie in [0, 1]")
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return [float(v) for v in out]


def min_discordant_to_reject(alpha: float = ALPHA) -> int:
    """The fewest discordant pairs, all in one direction, whose exact McNemar p is below
    ``alpha`` (6 at 0.05: p = 2·½⁶ = 0.031; 5 give 0.063). Fewer usable pairs than this cannot
    reject whatever they show — the power statement protocol §5 asks beside each test."""
    n = 1
    while mcnemar_exact(n, 0) >= alpha:
        n += 1
    return n
