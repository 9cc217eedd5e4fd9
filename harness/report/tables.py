"""The report's tables and sections, as the renderer-neutral model of :mod:`harness.report.html`.

Paper-style tables per (dataset, model, attack), clean-control false alarms, inconclusive reasons,
every run's verdict, the environment and the host-vs-exact kernel drift: each built once as
:class:`~harness.report.html.Section` objects, so ``report.md`` and ``report.html`` cannot say
different things.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from harness.core.metrics import wilson_interval
from harness.core.verdicts import record_verdict
from harness.report.data import (
    group_label,
    group_seeds,
    group_summary,
    ordered,
    report_defenses,
    report_groups,
    report_precisions,
)
from harness.report.figures.evidence import seed_order
from harness.report.figures.model import Plot
from harness.report.figures.plots import DEFENSE_FIGURES
from harness.report.html import Bullets, FigureRef, Section, Table
from harness.report.primary import primary_metrics, primary_sections
from harness.report.tally import GroupKey, group_key, label_order


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
                    key=lambda kv: (-kv[1], label_order(kv[0])),
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


def _score(value: float) -> str:
    """A stored score: ``+∞`` for Neural Cleanse's zero-MAD index (protocol v2 §4.1), else 3 dp."""
    return "+∞" if value == math.inf else "−∞" if value == -math.inf else f"{value:.3f}"


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
        for name in ordered(set(results), defenses):
            res = results[name]
            score = res.get("score")
            score_text = "" if score is None else f"{_score(score)} ({res.get('score_name') or ''})"
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
    sections += primary_sections(report.get("primary_metrics") or primary_metrics(report, keys))
    sections += figure_sections(report, plots)
    if runs:
        sections.append(Section("Defense scores per run", 2, [runs_table(report)]))
    sections.append(Section("Host vs exact INT8 kernels", 2, kernel_drift_blocks(report)))
    env = environment_blocks(report)
    if env:
        sections.append(Section("Environment", 2, env))
    return sections
