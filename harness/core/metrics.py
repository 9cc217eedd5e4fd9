"""Model-level metrics, computed through the runtime adapter on the deployed artifact.

- clean accuracy: top-1 on the untouched test set;
- attack success rate (ASR): fraction of *non-target* test images, stamped with the trigger,
  that the model assigns to the target label (target-class images are excluded, as in BadNet);
- agreement with FP32: fraction of test images whose top-1 equals the FP32 artifact's top-1;
- batch dependence: how much a sample's output depends on its batch-mates (dynamic INT8);
- Wilson score intervals for rates over seeds (detections out of decided runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest, norm


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy; an empty set has no accuracy, so it is an error, not 0 or 1."""
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float(np.mean(predictions == labels))


def attack_success_rate(triggered_predictions: np.ndarray, target_label: int) -> float:
    """Fraction of triggered non-target inputs classified as the target."""
    if len(triggered_predictions) == 0:
        raise ValueError("no triggered inputs to measure attack success on")
    return float(np.mean(triggered_predictions == target_label))


def agreement(predictions: np.ndarray, reference: np.ndarray) -> float:
    """Top-1 agreement between two models' predictions on the same inputs."""
    return float(np.mean(predictions == reference))


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` trials (95% for z = 1.96).

    Chosen over the normal approximation because grids have few seeds and rates at 0 or 1,
    where ``p ± z·sqrt(p(1-p)/n)`` collapses to a zero-width interval; Wilson's stays inside
    [0, 1] and is wide when n is small (0/5 gives [0, 0.43]). ``n = 0`` has no rate: (0, 1).
    """
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= successes <= trials, got {k} of {n}")
    if n == 0:
        return 0.0, 1.0
    confidence = float(2 * norm.cdf(z) - 1)
    interval = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


@dataclass(frozen=True)
class BatchDependence:
    """Difference between batched and one-at-a-time outputs on the same images."""

    batch_size: int
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    top1_flip_rate: float


def batch_dependence(adapter, pixels: np.ndarray, batch_size: int = 256) -> BatchDependence:
    """Compare ``adapter`` run in batches of ``batch_size`` against batch-1 runs.

    onnxruntime's ``DynamicQuantizeLinear`` picks activation scales from the whole input tensor,
    so in a batched call an outlier image changes its batch-mates' quantization grid.
    """
    saved = adapter.batch_size
    adapter.batch_size = batch_size
    try:
        batched = adapter.logits(pixels, per_sample=False)
    finally:
        adapter.batch_size = saved
    single = adapter.logits(pixels, per_sample=True)
    diff = np.abs(batched - single)
    return BatchDependence(
        batch_size=batch_size,
        max_abs_logit_diff=float(diff.max()),
        mean_abs_logit_diff=float(diff.mean()),
        top1_flip_rate=float(np.mean(batched.argmax(1) != single.argmax(1))),
    )
