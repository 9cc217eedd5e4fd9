"""Tallies over the stored run records: means over seeds and each defense's verdict counts.

Pure functions of the records (no files, no figures): :func:`summarize` aggregates runs over
seeds per (dataset, model, attack, precision, poisoned) and :func:`tally_defense` counts one
defense's decided, detected, inconclusive and failed runs with their Wilson intervals. The QCB
pipeline tallies its own cells with the same function, so its table means what the report's does.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from harness.core.metrics import wilson_interval
from harness.core.verdicts import record_verdict
from harness.report.figures.evidence import seed_order

GroupKey = tuple[Any, Any, Any]
"""(dataset, model, attack) of a run; any of them ``None`` in records that lack it."""


def group_key(run: dict[str, Any]) -> GroupKey:
    """(dataset, model, attack) of a run record or a summary row (both carry the three)."""
    return (run.get("dataset"), run.get("model"), run.get("attack"))


def group_label(key: GroupKey) -> str:
    """``dataset · model · attack`` for headings (``results`` when a store names none)."""
    return " · ".join(str(v) for v in key if v is not None) or "results"


def ordered(values: set[Any] | list[Any], listed: list[Any]) -> list[Any]:
    """``values`` in the config's order, then any others sorted by name (deterministic)."""
    present = set(values)
    first = [v for v in listed if v in present]
    return first + sorted((v for v in present if v not in listed), key=str)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1) over seeds; ``None`` for a single seed.

    Seeds are a sample of training runs, so the spread is the sample's (ddof=0 would understate
    it, most of all for the two or three seeds a grid runs); one seed has no spread at all, which
    ``None`` says and ``0.0`` would hide.
    """
    mean = float(np.mean(values))
    return mean, (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Aggregate runs over seeds per (dataset, model, attack, precision, poisoned), in order.

    Within a row the seeds are taken in seed order, so the numbers do not depend on the order in
    which a parallel sweep appended its cells.
    """
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(*group_key(run), run["precision"], run["poisoned"])].append(run)
    rows = []
    for (dataset, model, attack, precision, poisoned), unordered in groups.items():
        members = sorted(unordered, key=lambda r: seed_order(r.get("seed")))
        names = list(dict.fromkeys(name for run in members for name in run.get("defenses", {})))
        stats: dict[str, float | None] = {}
        for key in ("clean_acc", "asr", "agreement_fp32"):
            mean, std = mean_std([r[key] for r in members])
            stats |= {f"{key}_mean": mean, f"{key}_std": std}
        defenses = {
            name: tally_defense(
                [run["defenses"][name] for run in members if name in run["defenses"]]
            )
            for name in names
        }
        rows.append(
            {
                "dataset": dataset,
                "model": model,
                "attack": attack,
                "precision": precision,
                "poisoned": poisoned,
                "n_seeds": len(members),
                **stats,
                "defenses": defenses,
            }
        )
    return rows


def label_order(label: Any) -> tuple[int, Any]:
    """Sort key for class labels stored as text ("3", "10"): numerically, others after."""
    try:
        return (0, int(label))
    except (TypeError, ValueError):
        return (1, str(label))


def tally_defense(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One defense's results over seeds: verdict counts, what was flagged, and the rate.

    ``detection_rate``/``detection_ci`` (Wilson 95%) count detections over *decided* cells
    only: an inconclusive cell is neither a hit nor a miss. ``target_hit``/``exact_target_hit``
    are counted where the defense names labels and the target is known (``target_known``
    cells); ``other_flagged`` and ``false_alarm_labels`` count the labels flagged beside the
    target over every decided cell (on a clean control, every flagged label).
    ``inconclusive_reasons`` is ordered by reason and ``false_alarm_labels`` by label, whatever
    the order of ``results``.
    """
    tally: dict[str, Any] = {
        "group": next((r.get("group") for r in results if r.get("group")), None),
        "ok": 0,
        "errors": 0,
        "not_applicable": 0,
        "decided": 0,
        "detected": 0,
        "inconclusive": 0,
        "inconclusive_reasons": {},
        "target_known": 0,
        "target_hit": 0,
        "exact_target_hit": 0,
        "other_flagged": 0,
        "false_alarm_labels": {},
    }
    for res in results:
        verdict = record_verdict(res)
        if verdict is None:
            tally["errors" if res.get("status") == "error" else "not_applicable"] += 1
            continue
        tally["ok"] += 1
        if verdict == "inconclusive":
            tally["inconclusive"] += 1
            reason = str(res.get("verdict_reason") or "no reason recorded")
            tally["inconclusive_reasons"][reason] = tally["inconclusive_reasons"].get(reason, 0) + 1
            continue
        tally["decided"] += 1
        tally["detected"] += verdict == "detected"
        _count_flagged(tally, res)
    tally["inconclusive_reasons"] = dict(sorted(tally["inconclusive_reasons"].items()))
    tally["false_alarm_labels"] = dict(
        sorted(tally["false_alarm_labels"].items(), key=lambda kv: label_order(kv[0]))
    )
    rate = tally["detected"] / tally["decided"] if tally["decided"] else None
    tally["detection_rate"] = rate
    tally["detection_ci"] = list(wilson_interval(tally["detected"], tally["decided"]))
    return tally


def _count_flagged(tally: dict[str, Any], res: dict[str, Any]) -> None:
    """Add one decided cell's flagged labels (target hit, exact hit, false alarms) to a tally."""
    if res.get("target_hit") is not None:
        tally["target_known"] += 1
        tally["target_hit"] += bool(res["target_hit"])
        tally["exact_target_hit"] += bool(res.get("exact_target_hit"))
    others = [str(label) for label in res.get("false_alarm_labels") or []]
    tally["other_flagged"] += len(others)
    for label in others:
        tally["false_alarm_labels"][label] = tally["false_alarm_labels"].get(label, 0) + 1
