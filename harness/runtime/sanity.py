"""Sanity before numbers: checks that run before any metric is computed.

A broken model or mislabelled data does not crash a metric, it produces a plausible number. A
model with NaN weights outputs NaN logits, whose argmax is class 0; a model that collapsed to one
class predicts the backdoor target everywhere. Either way the report would read "clean accuracy
0.1, attack success rate 1.0" — a confident, wrong finding about a backdoor. Labels reaching 99
on a 10-class model silently count as errors. These checks look at the arrays themselves, and
:func:`raise_on_errors` turns anything that would make the numbers meaningless into one line.

Every check is pure numpy, reads its input once and allocates nothing input-sized beyond
boolean masks (labels as absurd as 2**40 are compared, never used as indices). Each returns a
list of :class:`Finding`; an empty list means "nothing wrong found".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from harness.core.errors import BlindspotsError, DataError, ModelError

Severity = Literal["error", "warning"]
Source = Literal["model", "data"]

DOMINANT_FRACTION = 0.95
"""Warn when one class takes at least this share of predictions on inputs of several classes."""

MIN_ROWS_FOR_DOMINANCE = 20
"""Below this many inputs a dominant class is too likely to be chance to warn about."""


class Finding(BaseModel):
    """One problem found in model outputs, labels or preprocessing.

    ``source`` says who is at fault, and so which error :func:`raise_on_errors` raises: the
    model (:class:`ModelError`) or the data (:class:`DataError`).
    """

    model_config = ConfigDict(frozen=True)

    code: str
    message: str
    severity: Severity
    source: Source


def _error(code: str, message: str, source: Source) -> Finding:
    return Finding(code=code, message=message, severity="error", source=source)


# --------------------------------------------------------------------------- model outputs


def check_outputs(logits: np.ndarray, labels: np.ndarray | None = None) -> list[Finding]:
    """Findings about a model's outputs on a batch of *different* inputs (e.g. the test set).

    Errors: not a numeric N×C array, NaN/Inf values, identical outputs for every input, or one
    predicted class for every input (unless ``labels`` show the inputs all share that class).
    Warning: one class takes at least :data:`DOMINANT_FRACTION` of the predictions although
    ``labels`` span several classes. Pass the inputs' labels when known, so a test set that
    genuinely holds one class is not mistaken for a collapsed model.
    """
    logits = np.asarray(logits)
    problem = _shape_problem(logits)
    if problem:
        return [_error("logits_shape", problem, "model")]
    rows_bad = int(np.count_nonzero(~np.isfinite(logits).all(axis=1)))
    if rows_bad:
        return [
            _error(
                "non_finite",
                f"model outputs NaN/Inf for {rows_bad} of {len(logits)} inputs (broken weights "
                "or overflow); metrics on these outputs would be meaningless",
                "model",
            )
        ]
    return _degenerate(logits, labels)


def _shape_problem(logits: np.ndarray) -> str | None:
    """Why ``logits`` is not an N×C numeric array of at least one row and two classes."""
    if logits.dtype.kind not in "fiu":
        return f"model outputs {logits.dtype} values; expected numeric logits"
    if logits.ndim != 2:
        return f"model outputs shape {logits.shape}; expected N×C logits (one row per input)"
    if logits.shape[0] == 0:
        return "model produced no outputs (0 rows); nothing to measure"
    if logits.shape[1] < 2:
        return f"model outputs {logits.shape[1]} class score(s) per input; a classifier needs >= 2"
    return None


def _degenerate(logits: np.ndarray, labels: np.ndarray | None) -> list[Finding]:
    """Constant outputs or a single predicted class, which no working classifier shows."""
    count = len(logits)
    if count < 2:
        return []
    if (logits == logits[0]).all():
        return [
            _error(
                "degenerate",
                f"model outputs identical logits for all {count} inputs; it ignores its input",
                "model",
            )
        ]
    predictions = logits.argmax(axis=1)
    top, top_count = _most_common(predictions)
    label_classes = _distinct_labels(labels)
    if top_count == count and label_classes != 1:
        return [
            _error(
                "degenerate",
                f"model predicts class {top} for all {count} inputs; a collapsed model would "
                f"read as a perfect attack",
                "model",
            )
        ]
    if (
        label_classes is not None
        and label_classes > 1
        and count >= MIN_ROWS_FOR_DOMINANCE
        and top_count >= DOMINANT_FRACTION * count
    ):
        return [
            Finding(
                code="dominant_class",
                message=f"model predicts class {top} for {top_count} of {count} inputs spanning "
                f"{label_classes} labelled classes",
                severity="warning",
                source="model",
            )
        ]
    return []


def _most_common(values: np.ndarray) -> tuple[int, int]:
    """The most frequent value and its count (values are class indices below C)."""
    counts = np.bincount(values)
    top = int(counts.argmax())
    return top, int(counts[top])


def _distinct_labels(labels: np.ndarray | None) -> int | None:
    """Number of distinct labels, or None when unknown (``np.unique`` sorts; no bincount)."""
    if labels is None:
        return None
    return len(np.unique(np.asarray(labels)))


# --------------------------------------------------------------------------- labels


def check_labels(labels: np.ndarray, num_classes: int) -> list[Finding]:
    """Findings about labels for a ``num_classes``-way model: integer, 1-D, within 0..C-1.

    Only the minimum and maximum are computed, so an absurd value such as 2**40 is reported,
    never used to size an allocation.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        return [
            _error(
                "num_classes", f"number of classes must be an integer, got {num_classes!r}", "model"
            )
        ]
    if num_classes < 2:
        return [
            _error(
                "num_classes",
                f"model has {num_classes} class(es); a classifier needs >= 2",
                "model",
            )
        ]
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        return [_error("label_dtype", f"labels must be integers, got dtype {labels.dtype}", "data")]
    if labels.ndim != 1:
        return [_error("label_shape", f"labels must be 1-D, got shape {labels.shape}", "data")]
    if labels.size == 0:
        return [_error("no_labels", "there are no labels (0 samples)", "data")]
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        return [
            _error(
                "label_range",
                f"labels range over {low}..{high}, but the model has "
                f"{num_classes} classes (0..{num_classes - 1})",
                "data",
            )
        ]
    return []


# --------------------------------------------------------------------------- preprocessing


def check_preprocessing(
    mean: Sequence[float], std: Sequence[float], scale: float = 1.0 / 255.0
) -> list[Finding]:
    """Findings about ``(pixels * scale - mean) / std``: finite values, positive std and scale.

    A zero std divides by zero and a NaN anywhere turns every input into NaN, so each is an
    error before a single image is fed to the model.
    """
    try:
        means, stds, scales = (
            np.asarray(v, dtype=np.float64).ravel() for v in (mean, std, [scale])
        )
    except (TypeError, ValueError):
        return [
            _error(
                "preprocessing_type",
                f"preprocessing mean {mean!r}, std {std!r} and scale {scale!r} must be numbers",
                "model",
            )
        ]
    findings: list[Finding] = []
    if means.size == 0 or means.size != stds.size:
        findings.append(
            _error(
                "preprocessing_shape",
                f"preprocessing mean {means.tolist()} and std {stds.tolist()} must be non-empty "
                "and the same length",
                "model",
            )
        )
    for name, values in (("mean", means), ("std", stds), ("scale", scales)):
        if not np.isfinite(values).all():
            findings.append(
                _error(
                    "preprocessing_non_finite",
                    f"preprocessing {name} {values.tolist()} is not finite",
                    "model",
                )
            )
    for name, values in (("std", stds), ("scale", scales)):
        if (values <= 0).any():
            findings.append(
                _error(
                    f"preprocessing_{name}",
                    f"preprocessing {name} {values.tolist()} must be positive",
                    "model",
                )
            )
    return findings


# --------------------------------------------------------------------------- enforcing


def raise_on_errors(findings: Iterable[Finding]) -> list[Finding]:
    """Raise on the first error-severity finding; return the warnings for the report.

    The error is :class:`ModelError` or :class:`DataError` by the finding's source, with one
    line; further errors are counted in it, so a user fixes the first and sees the rest next.
    """
    findings = list(findings)
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        first = errors[0]
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        error_type: type[BlindspotsError] = ModelError if first.source == "model" else DataError
        raise error_type(" ".join(f"{first.message}{more}".split()))
    return [f for f in findings if f.severity == "warning"]
