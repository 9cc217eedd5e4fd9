"""Metrics shared by the data-filtering (AC, SS) and input-filtering (STRIP) defenses.

Data filters flag training samples, so they are judged like a retrieval task against the poison
ground truth (precision/recall of the flagged set). Input filters flag test-time inputs, so they
are judged by the true-positive rate on triggered inputs, the false-rejection rate on clean ones
and the threshold-free AUROC. Both groups also need a few helpers on per-class features. All
rates come from ``sklearn.metrics`` so that they mean exactly what the literature reports.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
from sklearn.metrics import precision_score, recall_score, roc_auc_score
from threadpoolctl import ThreadpoolController

from defenses.base import NotApplicable
from harness.core.errors import DataError

MAD_CONSISTENCY = 1.4826
"""Scales the median absolute deviation to the standard deviation of a normal distribution
(Neural Cleanse's anomaly index uses the same constant, the paper's; one definition for both)."""


@functools.cache
def _threadpools() -> ThreadpoolController:
    """Scanning the loaded BLAS/OpenMP libraries costs ~3 ms: do it once per process."""
    return ThreadpoolController()


def single_threaded() -> AbstractContextManager[Any]:
    """Run BLAS/OpenMP single-threaded inside the block.

    Per-class ICA, k-means and SVD problems are tiny (hundreds of rows, ≤ a few hundred
    columns); thread start-up and spin-waiting cost more than they save, and on a shared or
    busy CPU measured 4-5× slower than one thread.
    """
    return _threadpools().limit(limits=1)


def class_features(activations: np.ndarray, labels: np.ndarray, label: int) -> np.ndarray:
    """Rows of ``activations`` whose training label is ``label``, flattened to 2-D float64.

    float64 because SVD/ICA on float32 features of near-constant ReLU units loses precision.
    """
    rows = activations[labels == label]
    return rows.reshape(len(rows), -1).astype(np.float64)


def check_labels(labels: np.ndarray, num_samples: int, num_classes: int) -> np.ndarray:
    """Validate training labels against the sample count and class count (one-line errors)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != num_samples:
        raise DataError(
            f"training labels must be a 1-D array with one label per image ({num_samples}), "
            f"got shape {labels.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"training labels must lie in [0, {num_classes - 1}], "
            f"found {int(labels.min())}..{int(labels.max())}"
        )
    return labels.astype(np.int64)


def sample_filter_metrics(flagged: np.ndarray, poison_mask: np.ndarray | None) -> dict[str, float]:
    """Precision/recall/F1 of the flagged training samples against the poison ground truth.

    Returns only ``n_flagged`` when the ground truth is unknown (a real audit).
    """
    flagged = np.asarray(flagged, dtype=bool)
    out: dict[str, float] = {"n_flagged": float(flagged.sum())}
    if poison_mask is None:
        return out
    truth = np.asarray(poison_mask, dtype=bool)
    if truth.shape != flagged.shape:
        raise DataError(
            f"poison_mask has shape {truth.shape} but the training set has {flagged.shape[0]} images"
        )
    precision = precision_score(truth, flagged, zero_division=0.0)
    recall = recall_score(truth, flagged, zero_division=0.0)
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    out.update(
        n_poison=float(truth.sum()),
        poison_precision=float(precision),
        poison_recall=float(recall),
        poison_f1=float(f1),
    )
    return out


def auroc(negative_scores: np.ndarray, positive_scores: np.ndarray) -> float:
    """Area under the ROC curve for "higher score ⇒ positive"; NaN when a side is empty."""
    negative_scores = np.asarray(negative_scores, dtype=np.float64).ravel()
    positive_scores = np.asarray(positive_scores, dtype=np.float64).ravel()
    if len(negative_scores) == 0 or len(positive_scores) == 0:
        return float("nan")
    truth = np.r_[np.zeros(len(negative_scores)), np.ones(len(positive_scores))]
    return float(roc_auc_score(truth, np.r_[negative_scores, positive_scores]))


def input_filter_rates(
    clean_scores: np.ndarray, triggered_scores: np.ndarray, threshold: float, flag_below: bool
) -> dict[str, float]:
    """TPR on triggered inputs and FRR on clean inputs at ``threshold``.

    ``flag_below``: an input is flagged when its score is *below* the threshold (STRIP's
    entropy), otherwise when it is above.
    """
    clean_scores = np.asarray(clean_scores, dtype=np.float64)
    triggered_scores = np.asarray(triggered_scores, dtype=np.float64)

    def flag(scores: np.ndarray) -> np.ndarray:
        return scores < threshold if flag_below else scores > threshold

    return {
        "tpr": float(flag(triggered_scores).mean()) if len(triggered_scores) else float("nan"),
        "frr": float(flag(clean_scores).mean()) if len(clean_scores) else float("nan"),
    }


def robust_z(values: np.ndarray, mad_floor: float = 0.0) -> np.ndarray:
    """Modified z-scores ``(v - median) / (1.4826·MAD)`` (Iglewicz & Hoaglin, 1993).

    ``mad_floor`` bounds the MAD from below: with few classes the MAD of near-identical values
    can be tiny by chance, which would turn a negligible difference into a huge z-score. A tiny
    floor relative to the values' scale always applies, so identical values give z = 0.
    """
    values = np.asarray(values, dtype=np.float64)
    median = np.median(values)
    mad = max(float(np.median(np.abs(values - median))), mad_floor)
    floor = 1e-12 * max(1.0, float(np.max(np.abs(values))) if len(values) else 1.0)
    return (values - median) / max(MAD_CONSISTENCY * mad, floor)


def training_activations(adapter: Any, data: Any, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """Activations of ``layer`` over the training set the model saw, and its checked labels.

    The shared first step of the training-data filters (AC, SS): both analyse per-class
    representations of exactly the data the (possibly poisoned) model was trained on.
    """
    if layer not in adapter.layers:
        raise NotApplicable(f"the model exposes no '{layer}' layer (has {adapter.layers})")
    if data.train_x is None or data.train_y is None:
        raise NotApplicable("needs the training set the model was trained on")
    labels = check_labels(data.train_y, len(data.train_x), data.num_classes)
    return adapter.activations(data.train_x, [layer])[layer], labels


def unjudged(flagged: list[int], skipped: list[int], why: str) -> str | None:
    """Inconclusive when nothing was flagged but some class ``could not be <why>`` at all.

    A data filter that skipped a class (too few samples to cluster or score) has not looked
    everywhere, so "no class flagged" is not a clean verdict.
    """
    if flagged or not skipped:
        return None
    return f"no class flagged, but classes {skipped} could not be {why}"


def target_selection(
    data: Any, labels: np.ndarray, selected: np.ndarray, name: str
) -> dict[str, float] | None:
    """How well what a data filter ``selected`` in the target class matches its poison.

    Ground truth only (an evaluation aid, None without a target or poison mask): the poison
    share of the target class, and the poison fraction (``<name>_poison_fraction``) and recall
    (``<name>_poison_recall``) of the selection restricted to that class. It separates "the
    filter found the poison but its rule did not fire" from "the activations do not separate
    poison at all".
    """
    target = data.target_label
    if target is None or data.poison_mask is None:
        return None
    poison = np.asarray(data.poison_mask, dtype=bool)
    in_class = labels == target
    taken = selected & in_class
    n_poison = int((poison & in_class).sum())
    return {
        "poison_fraction_of_class": float(n_poison / max(int(in_class.sum()), 1)),
        f"{name}_poison_fraction": float((taken & poison).sum() / max(int(taken.sum()), 1)),
        f"{name}_poison_recall": float((taken & poison).sum() / max(n_poison, 1)),
    }
