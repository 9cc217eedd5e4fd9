"""Reports: ``report.json`` (stable schema), ``report.md`` and ``report.html`` with plots.

Everything here is recomputed from the result store's records and per-cell arrays — never by
rerunning a model or a defense — so a report can be rebuilt at any time, including after a
crashed run. Six modules split the work: this one reads the store and builds the tables (the
data); :mod:`harness.report.figures.evidence` gathers what each defense's figure shows;
:mod:`harness.report.figures.model` holds the figures' types and shared look,
:mod:`harness.report.figures.panels` draws one defense's panel and
:mod:`harness.report.figures.plots`
composes the figures; :mod:`harness.report.html` holds the document model both renderers share
and writes the self-contained HTML page. The only thing the
report rebuilds from outside the store is the attack's true trigger for Neural Cleanse's
side-by-side figure: it is a pure function of the stored attack name and parameters, computed
through the attacks registry (:mod:`harness.attacks`).

:func:`write_report` writes ``report.json``, ``report.md``, ``report.html`` and ``plots/*.png``,
each atomically (a crash mid-report leaves the previous file or the new one, never a torn one),
and the report itself is deterministic: the same store gives the same ``report.md`` byte for
byte (no timestamps, no absolute paths).

``report.json`` schema (version 1)::

    {
      "schema_version": 1,
      "config": {...},            # the ExperimentConfig that produced the runs
      "environment": {...},       # versions, CPU INT8 instruction sets, the measured host INT8
                                  # kernel class (int8_kernels) and float kernel settings
      "runs": [                   # one per (dataset, model, attack, seed, poisoned, precision)
        {"dataset", "model", "attack", "attack_params", "seed", "poisoned": bool,
         "precision", "cell" (the cell's content id, ExperimentConfig.cell_key),
         "clean_acc", "asr", "agreement_fp32", "n_test", "n_triggered",
         "per_sample_inference", "artifacts": {"onnx", "sidecar", "state"},
         "kernels": {"profile", "host_kernel_class", "profiles_differ_on_host",
                     "exact_profile_verified", "session_config_entries"},
         "kernel_drift": {...}    # only where host != exact: the cell under the other profile:
                                  # kernels, clean_acc, asr, agreement_fp32,
                                  # defenses{name: {status, detected, score, score_name,
                                  #                 flagged_labels, reason}}
         "timings": {...seconds},
         "defenses": {name: {"defense", "group", "status", "verdict", "verdict_reason",
                             "detected", "target_hit", "exact_target_hit",
                             "false_alarm_labels", "score", "score_name", "scores",
                             "flagged_labels", "threshold", "queries", "wall_time_s",
                             "params", "details", "reason"}},
         "arrays": "arrays/<cell>.npz"}   # per-sample scores, reversed triggers (optional)
      ],
      "summary": [                # aggregated over seeds, one per (dataset, model, attack,
                                  # precision, poisoned); *_std is the sample standard
                                  # deviation (ddof=1), null where only one seed ran
        {"dataset", "model", "attack", "precision", "poisoned", "n_seeds", "clean_acc_mean",
         "clean_acc_std", "asr_mean", "asr_std", "agreement_fp32_mean", "agreement_fp32_std",
         "defenses": {name: {"group", "ok", "errors", "not_applicable",
                             "decided", "detected", "inconclusive", "inconclusive_reasons",
                             "detection_rate", "detection_ci" (Wilson 95%, decided runs only),
                             "target_known", "target_hit", "exact_target_hit",
                             "other_flagged", "false_alarm_labels": {label: runs}}}}
      ]
    }

JSON has no NaN or infinity: a non-finite number (a defense score that came out NaN) is written
as ``null``, so ``report.json`` stays a document any strict JSON reader accepts.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from harness.core.atomic import atomic_write_bytes, atomic_write_text
from harness.core.errors import BlindspotsError, one_line
from harness.core.metrics import wilson_interval
from harness.core.verdicts import record_verdict
from harness.pipeline.store import FinishedCell, ResultStore, read_json
from harness.report.figures.evidence import CellArrays, defense_evidence, seed_order
from harness.report.figures.model import GroupSummary, Plot
from harness.report.figures.plots import DEFENSE_FIGURES, defense_plots, overview_plots
from harness.report.html import Bullets, FigureRef, Section, Table, render_html

SCHEMA_VERSION = 1
TITLE = "quant-blindspots report"
logger = logging.getLogger(__name__)

GroupKey = tuple[Any, Any, Any]
"""(dataset, model, attack) of a run; any of them ``None`` in records that lack it."""


# ----------------------------------------------------------------------------- data
def group_key(run: dict[str, Any]) -> GroupKey:
    """(dataset, model, attack) of a run record or a summary row (both carry the three)."""
    return (run.get("dataset"), run.get("model"), run.get("attack"))


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


def _label_order(label: Any) -> tuple[int, Any]:
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
        sorted(tally["false_alarm_labels"].items(), key=lambda kv: _label_order(kv[0]))
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


def build_report(folder: str | Path) -> dict[str, Any]:
    """The report.json document for the results stored in ``folder``.

    A damaged store line or metadata file is left out with a one-line warning (logged), never a
    traceback: whatever is intact is still worth reporting.
    """
    folder = Path(folder)
    store = ResultStore(folder)
    runs = store.records(FinishedCell)
    config = _read_json(folder / "config.json")
    env = _read_json(folder / "environment.json")
    return {
        "schema_version": SCHEMA_VERSION,
        "config": config,
        "environment": env,
        "runs": runs,
        "summary": summarize(runs),
    }


def _read_json(path: Path) -> dict[str, Any]:
    """A metadata file as a dict; ``{}`` (with a warning if damaged) when it cannot be one."""
    if not path.is_file():
        return {}
    try:
        document = read_json(path)
    except BlindspotsError as exc:
        logger.warning(f"{exc}; the report is built without it")
        return {}
    if not isinstance(document, dict):
        logger.warning(f"{path} is not a JSON object; the report is built without it")
        return {}
    return document


def _listed(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _ordered(values: set[Any] | list[Any], listed: list[Any]) -> list[Any]:
    """``values`` in the config's order, then any others sorted by name (deterministic)."""
    present = set(values)
    first = [v for v in listed if v in present]
    return first + sorted((v for v in present if v not in listed), key=str)


def report_groups(report: dict[str, Any]) -> list[GroupKey]:
    """The (dataset, model, attack) groups of the runs, in the config's order."""
    config = report.get("config", {})
    rows = report.get("summary") or []
    keys = {group_key(run) for run in report["runs"]} | {group_key(r) for r in rows}
    ranks = [_listed(config.get(axis)) for axis in ("dataset", "model", "attack")]

    def rank(key: GroupKey) -> tuple[Any, ...]:
        return tuple(
            (order.index(v) if v in order else len(order), str(v))
            for v, order in zip(key, ranks, strict=True)
        )

    return sorted(keys, key=rank)


def group_label(key: GroupKey) -> str:
    return " · ".join(str(v) for v in key if v is not None) or "results"


def group_slug(key: GroupKey) -> str:
    """File-name-safe ``dataset-model-attack``."""
    parts = [re.sub(r"[^A-Za-z0-9_.]+", "_", str(v)) for v in key if v is not None]
    return "-".join(parts) or "results"


def report_precisions(report: dict[str, Any], key: GroupKey | None = None) -> list[str]:
    """Precisions present (in ``key``'s group, or anywhere), in the config's order."""
    rows = [*(report.get("summary") or []), *report["runs"]]
    return _ordered(
        {r["precision"] for r in rows if key is None or group_key(r) == key},
        _listed(report.get("config", {}).get("precisions")),
    )


def report_defenses(report: dict[str, Any]) -> list[str]:
    """The configured defenses, then any others the runs carry (so a column never goes missing)."""
    listed = _listed(report.get("config", {}).get("defenses"))
    seen = {name for row in report.get("summary") or [] for name in row["defenses"]}
    return listed + sorted(seen - set(listed))


def group_summary(report: dict[str, Any], key: GroupKey) -> GroupSummary:
    """One group's summary rows in the shape :mod:`harness.report.figures.plots` draws."""
    rows = [r for r in report["summary"] if group_key(r) == key]
    present = {name for row in rows for name in row["defenses"]}
    return GroupSummary(
        label=group_label(key),
        slug=group_slug(key),
        precisions=report_precisions(report, key),
        rows=rows,
        defenses=[name for name in report_defenses(report) if name in present],
        n_seeds=len(group_seeds(report, key)) or None,
    )


def group_seeds(report: dict[str, Any], key: GroupKey) -> list[Any]:
    """The seeds any finished cell of the group ran, in order."""
    seeds = {run.get("seed") for run in report["runs"] if group_key(run) == key}
    return sorted(seeds, key=seed_order)


def build_plots(report: dict[str, Any], folder: str | Path) -> list[Plot]:
    """Every figure of the report; ``folder`` is the run folder the per-cell arrays live in."""
    keys = report_groups(report)
    if not report["runs"]:
        return []
    groups = {key: group_summary(report, key) for key in keys}
    plots = overview_plots([groups[key] for key in keys])
    arrays = CellArrays(Path(folder))
    for name in report_defenses(report):
        if name not in DEFENSE_FIGURES:
            continue
        for key in keys:
            runs = [r for r in report["runs"] if group_key(r) == key]
            if not any(name in r.get("defenses", {}) for r in runs):
                continue
            plots += defense_plots(name, groups[key], defense_evidence(runs, name, arrays))
    return plots


# ----------------------------------------------------------------------------- tables
def _rate(k: int, n: int) -> str:
    """``k/n [lo–hi]``: a rate over decided cells with its Wilson 95% interval."""
    if n == 0:
        return "0 decided"
    low, high = wilson_interval(k, n)
    return f"{k}/{n} [{low:.2f}–{high:.2f}]"


def _cell(tally: dict[str, Any] | None, poisoned: bool = True) -> str:
    """One paper-table cell: the rate over decided cells, what else was flagged, inconclusive,
    errors and n/a — each shown as such, never folded into 'not detected'."""
    if tally is None:
        return "—"
    decided = tally.get("decided", tally["ok"])
    parts = []
    if tally["ok"]:
        repair = tally.get("group") == "repair"
        word = ("removed " if poisoned else "acc kept ") if repair else ("" if poisoned else "FA ")
        parts.append(word + _rate(tally["detected"], decided))
    if poisoned and tally.get("target_known"):
        mean_other = tally["other_flagged"] / tally["target_known"]
        parts.append(f"exact {tally['exact_target_hit']}/{tally['target_known']}")
        parts.append(f"+{mean_other:.1f} other")
    if tally.get("inconclusive"):
        parts.append(f"{tally['inconclusive']} inconclusive")
    if tally["errors"]:
        parts.append(f"{tally['errors']} error")
    if tally["not_applicable"]:
        parts.append(f"{tally['not_applicable']} n/a")
    return "; ".join(parts) or "—"


def _mean_std(mean: float, std: float | None) -> str:
    """``mean ± std``; the mean alone where there is no spread (one seed), never ``± 0``."""
    if std is None or not math.isfinite(std):
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {std:.3f}"


def _variant(row: dict[str, Any], group_n_seeds: int | None) -> str:
    """The row's variant (poisoned or clean), marked ``(n=k)`` where the row ran fewer (or more)
    seeds than its group — a failed or unfinished cell — so its mean is not read as the group's."""
    words = "poisoned" if row["poisoned"] else "clean"
    n = row.get("n_seeds")
    return words if group_n_seeds is None or n == group_n_seeds else f"{words} (n={n})"


PAPER_TABLE_LEGEND = [
    "Poisoned rows: *target flagged / decided runs* [Wilson 95% interval over seeds]; for "
    "label-flagging defenses also *exact* (the target and nothing else flagged) and the mean "
    "number of *other* labels flagged per run (each one a false alarm). Clean rows: *FA* = "
    "false alarms / decided runs (any alarm on a clean model is false). Fine-Pruning is a repair: "
    "*removed* = backdoor removed within the accuracy bound; on clean models *acc kept* only "
    "says the repair did not cost accuracy. *Inconclusive* runs (reasons below) are neither hits "
    "nor misses and are left out of every rate; errors and not-applicable runs are shown as such.",
    "Clean accuracy and ASR: mean ± sample standard deviation over seeds (the mean alone where "
    "one seed ran: one seed has no spread); *(n=k)* marks a row over k seeds where its group ran "
    "a different number.",
]


def _sorted_rows(rows: list[dict[str, Any]], precisions: list[str]) -> list[dict[str, Any]]:
    order = {p: i for i, p in enumerate(precisions)}
    return sorted(rows, key=lambda r: (order.get(r["precision"], len(order)), not r["poisoned"]))


def paper_table(
    rows: list[dict[str, Any]], defenses: list[str], n_seeds: int | None = None
) -> Table:
    """Accuracy, ASR, FP32 agreement and every defense's rate, per precision and variant
    (poisoned model or clean control); ``n_seeds`` is the group's seed count (default: the
    largest row's), a row over another count is marked."""
    if n_seeds is None:
        n_seeds = max((row.get("n_seeds") or 0 for row in rows), default=0) or None
    header = ("precision", "variant", "clean acc", "ASR", "agree FP32", *defenses)
    body = tuple(
        (
            row["precision"],
            _variant(row, n_seeds),
            _mean_std(row["clean_acc_mean"], row["clean_acc_std"]),
            _mean_std(row["asr_mean"], row["asr_std"]),
            f"{row['agreement_fp32_mean']:.4f}",
            *[_cell(row["defenses"].get(d), row["poisoned"]) for d in defenses],
        )
        for row in rows
    )
    return Table(header, body)


def false_alarm_blocks(rows: list[dict[str, Any]], defenses: list[str]) -> list[Any]:
    """Clean controls: how often each detection defense alarmed, and on which labels."""
    clean = [row for row in rows if not row["poisoned"]]
    if not clean:
        return ["No clean control was run."]
    body = []
    for name in defenses:
        for row in clean:
            tally = row["defenses"].get(name)
            if tally is None or tally.get("group") == "repair":
                continue
            labels = ", ".join(
                f"{label} ({count})"
                for label, count in sorted(
                    tally.get("false_alarm_labels", {}).items(),
                    key=lambda kv: (-kv[1], _label_order(kv[0])),
                )
            )
            body.append(
                (
                    name,
                    row["precision"],
                    _rate(tally["detected"], tally.get("decided", tally["ok"])),
                    str(tally.get("inconclusive", 0)),
                    labels or "—",
                )
            )
    header = (
        "defense",
        "precision",
        "false alarms / decided [95% CI]",
        "inconclusive",
        "labels flagged (runs)",
    )
    return [Table(header, tuple(body))]


def inconclusive_items(rows: list[dict[str, Any]], defenses: list[str]) -> list[str]:
    """Why runs were inconclusive, per defense (empty when none was)."""
    return [
        f"{name}, {row['precision']}, {'poisoned' if row['poisoned'] else 'clean'}: "
        f"{reason} ({count}×)"
        for name in defenses
        for row in rows
        for reason, count in sorted(
            ((row["defenses"].get(name) or {}).get("inconclusive_reasons") or {}).items()
        )
    ]


def group_sections(report: dict[str, Any], key: GroupKey) -> list[Section]:
    """One (dataset, model, attack): its paper table, false alarms and inconclusive reasons."""
    summary = group_summary(report, key)
    defenses = report_defenses(report)
    rows = _sorted_rows(summary.rows, summary.precisions)
    runs = sorted(
        (r for r in report["runs"] if group_key(r) == key),
        key=lambda r: seed_order(r.get("seed")),
    )
    config = report.get("config", {})
    params = next((r["attack_params"] for r in runs if "attack_params" in r), None)
    if params is None and not isinstance(config.get("attack"), list):
        params = config.get("attack_params", {})
    seeds = group_seeds(report, key) or config.get("seeds")
    dataset, model, attack = (
        v if v is not None else config.get(axis)
        for v, axis in zip(key, ("dataset", "model", "attack"), strict=True)
    )
    intro = (
        f"Dataset `{dataset}`, model `{model}`, attack `{attack}` "
        f"{json.dumps(params or {}, sort_keys=True)}, seeds {seeds}."
    )
    sections = [
        Section(summary.label, 2, [intro]),
        Section(
            "Accuracy, attack success and defense verdicts per precision",
            3,
            [paper_table(rows, defenses, summary.n_seeds)],
        ),
        Section("Clean controls: false alarms", 3, false_alarm_blocks(rows, defenses)),
    ]
    items = inconclusive_items(rows, defenses)
    if items:
        sections.append(Section("Inconclusive runs", 3, [Bullets(tuple(items))]))
    return sections


def run_order(report: dict[str, Any]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """Sort key for run records: group (config order), seed, poisoned first, precision — the
    order of every per-run table, whatever order the store holds the cells in."""
    keys = report_groups(report)
    precisions = {p: i for i, p in enumerate(report_precisions(report))}

    def key(run: dict[str, Any]) -> tuple[Any, ...]:
        return (
            keys.index(group_key(run)),
            seed_order(run.get("seed")),
            not run["poisoned"],
            precisions.get(run["precision"], len(precisions)),
            str(run["precision"]),
        )

    return key


def runs_table(report: dict[str, Any]) -> Table:
    """Every run's verdict, what it flagged and its score, ordered by cell."""
    several = len(report_groups(report)) > 1
    defenses = report_defenses(report)
    runs = sorted(report["runs"], key=run_order(report))
    header = (
        *(("dataset",) if several else ()),
        "seed",
        "variant",
        "precision",
        "defense",
        "verdict",
        "flagged",
        "target hit",
        "score",
        "time (s)",
        "queries",
    )
    body = []
    for run in runs:
        results = run.get("defenses", {})
        for name in _ordered(set(results), defenses):
            res = results[name]
            score = res.get("score")
            score_text = "" if score is None else f"{score:.3f} ({res.get('score_name') or ''})"
            verdict = _verdict(res)
            reason = res.get("verdict_reason") if verdict == "inconclusive" else res.get("reason")
            if reason and verdict not in ("detected", "not detected"):
                verdict = f"{verdict}: {reason}"
            hit = res.get("target_hit")
            body.append(
                (
                    *((group_label(group_key(run)),) if several else ()),
                    str(run["seed"]),
                    "poisoned" if run["poisoned"] else "clean",
                    run["precision"],
                    name,
                    verdict,
                    str(res.get("flagged_labels") or "—"),
                    "—" if hit is None else str(hit),
                    score_text,
                    f"{res.get('wall_time_s', 0):.1f}",
                    str(res.get("queries", 0)),
                )
            )
    return Table(header, tuple(body))


def environment_blocks(report: dict[str, Any]) -> list[Any]:
    """Versions and the INT8 kernel settings the numbers were computed with."""
    config = report.get("config", {})
    env = report.get("environment", {})
    if not env:
        return []
    isa = ", ".join(k for k, v in env.get("cpu_isa", {}).items() if v) or "none"
    blocks: list[Any] = [
        f"onnxruntime {env.get('onnxruntime')}, onnx {env.get('onnx')}, torch {env.get('torch')}, "
        f"python {env.get('python')}; CPU INT8 instruction sets: {isa}."
    ]
    kernels = env.get("int8_kernels") or {}
    if kernels:
        blocks.append(
            f"INT8 kernel profile of every session: `{config.get('int8_kernels', 'exact')}`; "
            f"this host's default INT8 kernels measured as `{kernels.get('kernel_class')}` "
            f"(exact profile verified: {kernels.get('exact_verified')})."
        )
    return blocks


def _verdict(res: dict[str, Any] | None) -> str:
    """The verdict in words (detected, not detected, inconclusive), or the status of a run that
    did not finish."""
    if not res:
        return "—"
    verdict = record_verdict(res)
    return str(res.get("status")) if verdict is None else verdict.replace("_", " ")


def kernel_drift_blocks(report: dict[str, Any]) -> list[Any]:
    """The "host vs exact INT8 kernels" section: what this CPU's default kernels change.

    Cells carry ``kernel_drift`` (the same cell under the other profile) only where the host's
    kernels differ from int32-exact arithmetic; elsewhere the section says the profiles coincide.
    """
    kernels = report.get("environment", {}).get("int8_kernels") or {}
    drifted = sorted(
        (run for run in report["runs"] if run.get("kernel_drift")), key=run_order(report)
    )
    if not drifted:
        if kernels.get("profiles_differ") is False:
            return [
                "This host's default INT8 kernels accumulate exactly in int32 "
                f"(`{kernels.get('kernel_class')}`, measured): the `host` and `exact` profiles "
                "coincide, so every INT8 number above holds for both."
            ]
        return ["No cell was measured under both profiles."]
    profile = report.get("config", {}).get("int8_kernels", "exact")
    other = drifted[0]["kernel_drift"].get("kernels", {}).get("profile", "host")
    body = []
    for run in drifted:
        drift = run["kernel_drift"]
        changed = [
            f"{name}: {_verdict(res)} → {_verdict(drift.get('defenses', {}).get(name))}"
            for name, res in run.get("defenses", {}).items()
            if _verdict(res) != _verdict(drift.get("defenses", {}).get(name))
        ]
        body.append(
            (
                str(run["seed"]),
                "poisoned" if run["poisoned"] else "clean",
                run["precision"],
                f"{run['clean_acc']:.4f} → {drift['clean_acc']:.4f}",
                f"{run['asr']:.4f} → {drift['asr']:.4f}",
                f"{run['agreement_fp32']:.4f} → {drift['agreement_fp32']:.4f}",
                "; ".join(changed) or "none",
            )
        )
    header = (
        "seed",
        "variant",
        "precision",
        "clean acc",
        "ASR",
        "agree FP32",
        "verdicts that change",
    )
    return [
        f"This host's default INT8 kernels are `{kernels.get('kernel_class')}` (measured), so "
        f"every quantized cell was also run under the `{other}` profile. Each pair is "
        f"`{profile}` → `{other}`.",
        Table(header, tuple(body)),
    ]


def render_kernel_drift(report: dict[str, Any]) -> list[str]:
    """The kernel-drift section as Markdown lines."""
    return markdown_lines([Section("Host vs exact INT8 kernels", 2, kernel_drift_blocks(report))])


def _figure(plot: Plot) -> FigureRef:
    return FigureRef(plot.name, plot.title, plot.caption, plot.alt)


def figure_sections(report: dict[str, Any], plots: Sequence[Plot]) -> list[Section]:
    """Overview plots, then each defense's evidence figures (one seed per figure)."""
    if not plots:
        return []
    sections = [Section("Overview plots", 2, [_figure(p) for p in plots if p.defense is None])]
    evidence: list[Section] = [
        Section(
            "Evidence per defense",
            2,
            [
                "Per defense and dataset one figure: a panel per precision (columns) for the "
                "poisoned model and the clean control (rows), all of one seed (the one with the "
                "most finished cells, the smallest among ties), since per-label and per-sample "
                "evidence cannot be averaged over seeds; the tables above give the rates over "
                "every seed. A hatched panel says why a cell has nothing to draw (not applicable, "
                "error, not run, damaged evidence); an inconclusive cell keeps its evidence under "
                "an 'inconclusive' banner."
            ],
        )
    ]
    for name in report_defenses(report):
        figures = [_figure(p) for p in plots if p.defense == name]
        if figures:
            evidence.append(Section(name, 3, list(figures)))
    missing = [
        name
        for name in report_defenses(report)
        if name not in DEFENSE_FIGURES
        and any(name in r.get("defenses", {}) for r in report["runs"])
    ]
    if missing:
        evidence[0].blocks.append(
            f"No evidence figure for {', '.join(f'`{m}`' for m in missing)}: "
            "their verdicts are in the tables."
        )
    return sections + evidence


def report_sections(report: dict[str, Any], plots: Sequence[Plot] = ()) -> list[Section]:
    """The whole report as sections, rendered by :func:`render_markdown` and as HTML."""
    runs = report["runs"]
    keys = report_groups(report)
    intro = [
        f"Built from the result store alone (`results.jsonl` and `arrays/`): {len(runs)} "
        f"finished cell(s) in {len(keys)} dataset/model/attack group(s), precisions "
        f"{report_precisions(report)}.",
        *PAPER_TABLE_LEGEND,
    ]
    sections = [Section("", 2, intro)]
    if not keys:
        sections[0].blocks.append("No finished cell in the store.")
    for key in keys:
        sections += group_sections(report, key)
    sections += figure_sections(report, plots)
    if runs:
        sections.append(Section("Defense scores per run", 2, [runs_table(report)]))
    sections.append(Section("Host vs exact INT8 kernels", 2, kernel_drift_blocks(report)))
    env = environment_blocks(report)
    if env:
        sections.append(Section("Environment", 2, env))
    return sections


# ----------------------------------------------------------------------------- rendering
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_lines(sections: Sequence[Section]) -> list[str]:
    """Sections as Markdown lines (figures as ``plots/<name>.png`` images with a caption)."""
    lines: list[str] = []
    for section in sections:
        if section.title:
            lines += ["", "#" * section.level + " " + section.title]
        for block in section.blocks:
            lines.append("")
            if isinstance(block, Table):
                lines.append("| " + " | ".join(map(_md_cell, block.header)) + " |")
                lines.append("|" + "---|" * len(block.header))
                lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in block.rows]
            elif isinstance(block, Bullets):
                lines += [f"- {item}" for item in block.items]
            elif isinstance(block, FigureRef):
                alt = block.alt.replace("[", "(").replace("]", ")")
                lines += [
                    f"![{alt}](plots/{block.name}.png)",
                    "",
                    f"*{block.title}.* {block.caption}",
                ]
            else:
                lines.append(block)
    return lines


def render_markdown(report: dict[str, Any], plots: Sequence[Plot] = ()) -> str:
    """The human-readable report: the paper-style tables per dataset, the clean-control false
    alarms, inconclusive reasons, every run's verdict and — given ``plots`` — the figures."""
    lines = ["# " + TITLE, *markdown_lines(report_sections(report, plots))]
    return "\n".join(lines) + "\n"


def render_report_html(report: dict[str, Any], plots: Sequence[Plot] = ()) -> str:
    """``report.html``: the same sections as report.md, every figure embedded in the page."""
    images = {plot.name: plot.png for plot in plots}
    return render_html(TITLE, report_sections(report, plots), images)


# ----------------------------------------------------------------------------- files
def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by ``None``: JSON has no such
    numbers, and ``json.dumps`` would otherwise write ``NaN``, which strict readers reject."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def report_json(report: dict[str, Any]) -> str:
    """``report.json``'s text: strict JSON (non-finite numbers as ``null``)."""
    return json.dumps(json_safe(report), indent=2, sort_keys=False, allow_nan=False)


def remove_stale_plots(folder: Path, keep: Sequence[Path]) -> list[Path]:
    """Remove ``folder/*.png`` files that are not in ``keep``; returns what was removed.

    An earlier report over a larger store (another group, a defense since left out) leaves
    figures the new report no longer shows; left in ``plots/`` they would be read as current.
    Only visible ``*.png`` files directly in ``folder`` are touched (a hidden ``.partial`` file
    belongs to a writer still at work); a file that cannot be removed is a warning.
    """
    kept = {Path(path).name for path in keep}
    removed = []
    for path in sorted(folder.glob("*.png")):
        if path.name in kept or path.name.startswith(".") or not path.is_file():
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning(f"could not remove the stale figure {path}: {one_line(exc)}")
            continue
        removed.append(path)
    return removed


def _write_plots(plots: Sequence[Plot], folder: Path) -> list[Path]:
    paths = []
    for plot in plots:
        paths.append(atomic_write_bytes(folder / f"{plot.name}.png", plot.png))
    return paths


def plot_report(report: dict[str, Any], folder: Path, store: Path | None = None) -> list[Path]:
    """Write every figure as ``folder/<name>.png`` (atomically); returns the written files.

    ``store`` is the run folder holding ``arrays/`` (default: ``folder``'s parent, as in
    :func:`write_report`'s ``<run>/plots``).
    """
    folder = Path(folder)
    return _write_plots(build_plots(report, store or folder.parent), folder)


def write_report(folder: str | Path) -> dict[str, Path]:
    """Write report.json, report.md, report.html and plots/ for the store in ``folder``.

    Everything is computed first, then each file is replaced atomically — plots before the
    documents that show them — so a crash mid-report never leaves a torn file. Once the new
    documents are in place, figures in ``plots/`` that this report did not draw (left by an
    earlier one) are removed.
    """
    folder = Path(folder)
    report = build_report(folder)
    plots = build_plots(report, folder)
    document = report_json(report)
    markdown = render_markdown(report, plots)
    page = render_report_html(report, plots)
    plot_paths = _write_plots(plots, folder / "plots")
    paths = {
        "json": atomic_write_text(folder / "report.json", document),
        "markdown": atomic_write_text(folder / "report.md", markdown),
        "html": atomic_write_text(folder / "report.html", page),
    }
    remove_stale_plots(folder / "plots", plot_paths)
    return {**paths, **{p.stem: p for p in plot_paths}}
