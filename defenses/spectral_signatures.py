"""Spectral Signatures (Tran, Li & Madry, NeurIPS 2018): poison leaves a spectral trace.

Paper: https://arxiv.org/abs/1811.00636

Within the target class, the learned representations of poisoned samples differ from the clean
ones along one direction, so that direction dominates the class covariance. For every class
(grouped by training label) the defense centres the penultimate representations, takes the top
right singular vector ``v`` and scores each sample by its squared projection ``((r - mean)·v)²``.
As in the paper, the ``1.5·ε·n`` highest-scoring samples of each class are removed, where ``ε``
is the assumed fraction of poison in a class: ``epsilon`` if set, else
``DefenseData.poison_rate``, else 0.05. (An *overall* poison rate understates the target class's
contamination when poison concentrates in one class; set ``epsilon`` explicitly then.)

The paper removes samples but states no class-level alarm, so this verdict rule is ours and uses
no ground truth. A spectral signature is a top eigenvalue of the class covariance that stands out
(the poison's mean shift adds ``ε(1-ε)‖Δμ‖²`` along one direction), so each class gets its
*spectral gap* λ1/λ2 (ratio of the two largest squared singular values; scale free). The log
gaps are compared across classes with modified z-scores (median/MAD, Iglewicz & Hoaglin 1993);
a class is flagged when its z-score exceeds ``anomaly_threshold`` (3.5, their outlier cut-off).
Comparing across classes absorbs what is normal for this network's features; the MAD is floored
at ``LOG_MAD_FLOOR`` so that a gap within ~10% of the median is never an outlier however tightly
the other classes agree. ``detected`` is :func:`~defenses.base.label_verdict` over the flagged
classes. Why the gap and not the score tail: on planted 15% clusters in 32-D Gaussian classes
(10 classes, 30 seeds) the gap's z-score separated planted from clean classes by > 8 units,
while the tail ratio (mean removed score / class median score) overlapped. The tail ratio and
the removed-to-kept mean-score ratio are still reported as the score separation.

Limitation: the signature needs ε well below one half. At ~50% poison the two populations sit
symmetrically about the class mean and their squared projections coincide.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from sklearn.utils.extmath import randomized_svd

from defenses.base import (
    DEFENSES,
    Defense,
    DefenseData,
    Finding,
    Group,
    Need,
    NotApplicable,
    label_verdict,
)
from defenses.filtering import (
    class_features,
    robust_z,
    sample_filter_metrics,
    single_threaded,
    training_activations,
)

DEFAULT_EPSILON = 0.05
"""ε when neither the parameter nor ``DefenseData.poison_rate`` says (the paper's 5% setting)."""

LOG_MAD_FLOOR = 0.1
"""Smallest MAD of the per-class log spectral gaps (gaps within ~10% are indistinguishable)."""

EXACT_SVD_MAX_DIM = 2048
"""Feature widths up to this use an exact SVD; wider ones a seeded randomized SVD."""


class SpectralSignaturesParams(BaseModel):
    """``removal_factor`` 1.5 is the paper's; the verdict parameters are documented above."""

    model_config = ConfigDict(extra="forbid")

    layer: str = Field("penultimate", description="adapter layer whose activations are scored")
    epsilon: float | None = Field(
        None, gt=0, lt=1, description="assumed poison fraction per class (None: see module doc)"
    )
    removal_factor: float = Field(1.5, gt=0)
    anomaly_threshold: float = Field(3.5, gt=0, description="modified z-score cut-off")
    min_class_size: int = Field(10, ge=3, description="classes with fewer samples are skipped")


def top_direction_scores(features: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """Squared projections on the top singular vector of the centred features, and λ1/λ2."""
    centred = features - features.mean(axis=0)
    if min(centred.shape) > EXACT_SVD_MAX_DIM:
        _, sing, vt = randomized_svd(centred, n_components=2, random_state=seed)
    else:
        _, sing, vt = np.linalg.svd(centred, full_matrices=False)
    scores = (centred @ vt[0]) ** 2
    second = sing[1] ** 2 if len(sing) > 1 else 0.0
    gap = float(sing[0] ** 2 / max(second, 1e-12 * sing[0] ** 2))  # finite even at rank one
    return scores, gap


def resolve_epsilon(epsilon: float | None, poison_rate: float | None) -> tuple[float, str]:
    """The ε to use and where it came from (parameter, the data's poison rate, or the default)."""
    if epsilon is not None:
        return epsilon, "param"
    if poison_rate is not None and 0 < poison_rate < 1:
        return float(poison_rate), "poison_rate"
    return DEFAULT_EPSILON, "default"


@DEFENSES.register("spectral_signatures")
class SpectralSignatures(Defense):
    """Score samples along each class's top singular direction; flag outlying spectral gaps."""

    name = "spectral_signatures"
    group = Group.DATA_FILTERING
    needs = frozenset({Need.ACTIVATIONS, Need.TRAIN_DATA})
    Params = SpectralSignaturesParams
    paper = "Tran, Li & Madry, Spectral Signatures in Backdoor Attacks, NeurIPS 2018"

    def _run(self, adapter: Any, data: DefenseData, rng: np.random.Generator) -> Finding:
        p: SpectralSignaturesParams = self.params  # type: ignore[assignment]
        acts, labels = training_activations(adapter, data, p.layer)
        epsilon, epsilon_source = resolve_epsilon(p.epsilon, data.poison_rate)

        sample_scores = np.full(len(labels), np.nan)
        removed = np.zeros(len(labels), dtype=bool)
        per_class: dict[int, dict[str, Any]] = {}
        for label in range(data.num_classes):
            seed = int(rng.integers(2**31))
            members = np.flatnonzero(labels == label)
            record: dict[str, Any] = {"n": len(members)}
            per_class[label] = record
            if len(members) < p.min_class_size:
                record["skipped"] = f"{len(members)} samples < min_class_size {p.min_class_size}"
                continue
            with single_threaded():
                scores, gap = top_direction_scores(class_features(acts, labels, label), seed)
            if not scores.max() > 0:
                record["skipped"] = "representations identical across the class"
                continue
            n_remove = int(
                np.clip(round(p.removal_factor * epsilon * len(members)), 1, len(members) - 1)
            )
            top = np.argsort(scores, kind="stable")[::-1][:n_remove]
            kept = np.ones(len(members), dtype=bool)
            kept[top] = False
            floor = 1e-12 * scores.mean()
            sample_scores[members] = scores
            removed[members[top]] = True
            record.update(
                n_removed=n_remove,
                tail_ratio=float(scores[top].mean() / max(np.median(scores), floor)),
                removed_to_kept_mean_ratio=float(
                    scores[top].mean() / max(scores[kept].mean(), floor)
                ),
                spectral_gap=gap,
            )
        scored = [k for k, r in per_class.items() if "tail_ratio" in r]
        if len(scored) < 3:
            raise NotApplicable(
                f"the cross-class outlier test needs at least 3 scorable classes, got {len(scored)}"
            )
        gaps = np.log([per_class[k]["spectral_gap"] for k in scored])
        z = robust_z(gaps, mad_floor=LOG_MAD_FLOOR)
        for k, value in zip(scored, z, strict=True):
            per_class[k]["robust_z"] = float(value)
        flagged = [k for k in scored if per_class[k]["robust_z"] > p.anomaly_threshold]

        scores_out = {f"spectral_gap_label_{k}": per_class[k]["spectral_gap"] for k in scored}
        scores_out |= {f"tail_ratio_label_{k}": per_class[k]["tail_ratio"] for k in scored}
        scores_out |= {f"robust_z_label_{k}": per_class[k]["robust_z"] for k in scored}
        details: dict[str, Any] = {
            "epsilon": epsilon,
            "epsilon_source": epsilon_source,
            "per_class": {str(k): r for k, r in per_class.items()},
            "skipped_classes": [k for k, r in per_class.items() if "skipped" in r],
            "filtering": sample_filter_metrics(removed, data.poison_mask),
        }
        target_info = _target_diagnostics(data, labels, removed)
        if target_info is not None:
            details["target_class"] = target_info
        return Finding(
            detected=label_verdict(flagged, data.target_label),
            score=float(z.max()),
            score_name="max_spectral_gap_robust_z",
            scores=scores_out,
            flagged_labels=flagged,
            threshold=p.anomaly_threshold,
            details=details,
            per_sample_scores=sample_scores,
            arrays={"removed": removed},
        )


def _target_diagnostics(
    data: DefenseData, labels: np.ndarray, removed: np.ndarray
) -> dict[str, float] | None:
    """Ground truth only: is the target class's removed set mostly poison, and how much of it?"""
    target = data.target_label
    if target is None or data.poison_mask is None:
        return None
    poison = np.asarray(data.poison_mask, dtype=bool)
    in_class = labels == target
    taken = removed & in_class
    n_poison = int((poison & in_class).sum())
    return {
        "poison_fraction_of_class": float(n_poison / max(int(in_class.sum()), 1)),
        "removed_poison_fraction": float((taken & poison).sum() / max(int(taken.sum()), 1)),
        "removed_poison_recall": float((taken & poison).sum() / max(n_poison, 1)),
    }
