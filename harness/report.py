"""Reports: ``report.json`` (stable schema), ``report.md`` (the paper-style table) and plots.

Everything here is recomputed from the result store's records — never by rerunning a model or
a defense — so a report can be rebuilt at any time, including after a crashed run.

``report.json`` schema (version 1)::

    {
      "schema_version": 1,
      "config": {...},            # the ExperimentConfig that produced the runs
      "environment": {...},       # versions, CPU INT8 instruction sets, the measured host INT8
                                  # kernel class (int8_kernels) and float kernel settings
      "runs": [                   # one per (seed, poisoned/clean, precision)
        {"dataset", "model", "attack", "attack_params", "seed", "poisoned": bool,
         "precision", "clean_acc", "asr", "agreement_fp32", "n_test", "n_triggered",
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
      "summary": [                # aggregated over seeds, one per (precision, poisoned)
        {"precision", "poisoned", "n_seeds", "clean_acc_mean", "clean_acc_std", "asr_mean",
         "asr_std", "agreement_fp32_mean",
         "defenses": {name: {"group", "ok", "errors", "not_applicable",
                             "decided", "detected", "inconclusive", "inconclusive_reasons",
                             "detection_rate", "detection_ci" (Wilson 95%, decided runs only),
                             "target_known", "target_hit", "exact_target_hit",
                             "other_flagged", "false_alarm_labels": {label: runs}}}}
      ]
    }
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import BlindspotsError
from harness.metrics import wilson_interval
from harness.store import FinishedCell, ResultStore, read_json

SCHEMA_VERSION = 1
logger = logging.getLogger(__name__)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Aggregate runs over seeds per (precision, poisoned), keeping the runs' precision order."""
    groups: dict[tuple[str, bool], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(run["precision"], run["poisoned"])].append(run)
    rows = []
    for (precision, poisoned), members in groups.items():
        names = list(dict.fromkeys(name for run in members for name in run.get("defenses", {})))
        defenses = {
            name: tally_defense(
                [run["defenses"][name] for run in members if name in run["defenses"]]
            )
            for name in names
        }
        rows.append(
            {
                "precision": precision,
                "poisoned": poisoned,
                "n_seeds": len(members),
                "clean_acc_mean": float(np.mean([r["clean_acc"] for r in members])),
                "clean_acc_std": float(np.std([r["clean_acc"] for r in members])),
                "asr_mean": float(np.mean([r["asr"] for r in members])),
                "asr_std": float(np.std([r["asr"] for r in members])),
                "agreement_fp32_mean": float(np.mean([r["agreement_fp32"] for r in members])),
                "defenses": defenses,
            }
        )
    return rows


def record_verdict(res: dict[str, Any]) -> str | None:
    """A stored result's three-valued verdict; ``None`` unless it completed (status ``ok``).

    Records written before verdicts existed carry only ``detected``: ``True``/``False`` map to
    detected / not detected, ``None`` to inconclusive.
    """
    if res.get("status") != "ok":
        return None
    if res.get("verdict"):
        return str(res["verdict"])
    detected = res.get("detected")
    return "inconclusive" if detected is None else ("detected" if detected else "not_detected")


def tally_defense(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One defense's results over seeds: verdict counts, what was flagged, and the rate.

    ``detection_rate``/``detection_ci`` (Wilson 95%) count detections over *decided* cells
    only: an inconclusive cell is neither a hit nor a miss. ``target_hit``/``exact_target_hit``
    and ``other_flagged`` (false-alarm labels summed over decided cells) are counted where the
    defense names labels and the target is known (``target_known`` cells).
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


def _mean_std(mean: float, std: float, n: int) -> str:
    return f"{mean:.4f} ± {std:.3f}" if n > 1 else f"{mean:.4f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report: the paper-style table plus per-cell defense details."""
    config = report.get("config", {})
    summary = report["summary"]
    defenses = list(config.get("defenses") or sorted({d for r in summary for d in r["defenses"]}))
    lines = [
        "# quant-blindspots report",
        "",
        f"Dataset `{config.get('dataset')}`, model `{config.get('model')}`, attack "
        f"`{config.get('attack')}` {json.dumps(config.get('attack_params', {}))}, "
        f"seeds {config.get('seeds')}.",
        "",
        "## Accuracy, attack success and defense verdicts per precision",
        "",
        *PAPER_TABLE_LEGEND,
        "",
    ]
    header = ["precision", "model", "clean acc", "ASR", "agree FP32", *defenses]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    order = {p: i for i, p in enumerate(config.get("precisions", []))}
    rows = sorted(summary, key=lambda r: (order.get(r["precision"], 99), not r["poisoned"]))
    for row in rows:
        cells = [
            row["precision"],
            "poisoned" if row["poisoned"] else "clean",
            _mean_std(row["clean_acc_mean"], row["clean_acc_std"], row["n_seeds"]),
            _mean_std(row["asr_mean"], row["asr_std"], row["n_seeds"]),
            f"{row['agreement_fp32_mean']:.4f}",
            *[_cell(row["defenses"].get(d), row["poisoned"]) for d in defenses],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += render_false_alarms(rows, defenses)
    lines += render_inconclusive(rows, defenses)
    lines += render_runs(report["runs"])
    lines += render_kernel_drift(report)
    lines += _render_environment(report)
    return "\n".join(lines) + "\n"


PAPER_TABLE_LEGEND = [
    "Poisoned rows: *target flagged / decided runs* [Wilson 95% interval over seeds]; for "
    "label-flagging defenses also *exact* (the target and nothing else flagged) and the mean "
    "number of *other* labels flagged per run (each one a false alarm). Clean rows: *FA* = "
    "false alarms / decided runs (any alarm on a clean model is false). Fine-Pruning is a repair: "
    "*removed* = backdoor removed within the accuracy bound; on clean models *acc kept* only "
    "says the repair did not cost accuracy. *Inconclusive* runs (reasons below) are neither hits "
    "nor misses and are left out of every rate; errors and not-applicable runs are shown as such.",
]


def render_false_alarms(rows: list[dict[str, Any]], defenses: list[str]) -> list[str]:
    """Clean controls: how often each detection defense alarmed, and on which labels."""
    clean = [row for row in rows if not row["poisoned"]]
    lines = ["", "## Clean controls: false alarms", ""]
    if not clean:
        return [*lines, "No clean control was run."]
    lines += [
        "| defense | precision | false alarms / decided [95% CI] | inconclusive | "
        "labels flagged (runs) |",
        "|---|---|---|---|---|",
    ]
    for name in defenses:
        for row in clean:
            tally = row["defenses"].get(name)
            if tally is None or tally.get("group") == "repair":
                continue
            labels = ", ".join(
                f"{label} ({count})"
                for label, count in sorted(
                    tally.get("false_alarm_labels", {}).items(), key=lambda kv: -kv[1]
                )
            )
            lines.append(
                f"| {name} | {row['precision']} | "
                f"{_rate(tally['detected'], tally.get('decided', tally['ok']))} | "
                f"{tally.get('inconclusive', 0)} | {labels or '—'} |"
            )
    return lines


def render_inconclusive(rows: list[dict[str, Any]], defenses: list[str]) -> list[str]:
    """Why runs were inconclusive, per defense (omitted when none was)."""
    entries = [
        f"- {name}, {row['precision']}, {'poisoned' if row['poisoned'] else 'clean'}: "
        f"{reason} ({count}×)"
        for name in defenses
        for row in rows
        for reason, count in (row["defenses"].get(name) or {})
        .get("inconclusive_reasons", {})
        .items()
    ]
    return ["", "## Inconclusive runs", "", *entries] if entries else []


def render_runs(runs: list[dict[str, Any]]) -> list[str]:
    """Every run's verdict, what it flagged and its score."""
    lines = [
        "",
        "## Defense scores per run",
        "",
        "| seed | model | precision | defense | verdict | flagged | target hit | score | "
        "time (s) | queries |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for name, res in run.get("defenses", {}).items():
            score = res.get("score")
            score_text = "" if score is None else f"{score:.3f} ({res.get('score_name') or ''})"
            verdict = _verdict(res)
            reason = res.get("verdict_reason") if verdict == "inconclusive" else res.get("reason")
            if reason and verdict not in ("detected", "not detected"):
                verdict = f"{verdict}: {reason}"
            hit = res.get("target_hit")
            lines.append(
                f"| {run['seed']} | {'poisoned' if run['poisoned'] else 'clean'} | "
                f"{run['precision']} | {name} | {verdict} | {res.get('flagged_labels') or '—'} | "
                f"{'—' if hit is None else hit} | "
                f"{score_text} | {res.get('wall_time_s', 0):.1f} | {res.get('queries', 0)} |"
            )
    return lines


def _render_environment(report: dict[str, Any]) -> list[str]:
    """Versions and the INT8 kernel settings the numbers were computed with."""
    config = report.get("config", {})
    lines: list[str] = []
    env = report.get("environment", {})
    if env:
        isa = ", ".join(k for k, v in env.get("cpu_isa", {}).items() if v) or "none"
        lines += [
            "",
            "## Environment",
            "",
            f"onnxruntime {env.get('onnxruntime')}, onnx {env.get('onnx')}, torch {env.get('torch')}, "
            f"python {env.get('python')}; CPU INT8 instruction sets: {isa}.",
        ]
        kernels = env.get("int8_kernels") or {}
        if kernels:
            lines.append(
                f"INT8 kernel profile of every session: `{config.get('int8_kernels', 'exact')}`; "
                f"this host's default INT8 kernels measured as `{kernels.get('kernel_class')}` "
                f"(exact profile verified: {kernels.get('exact_verified')})."
            )
    return lines


def _verdict(res: dict[str, Any] | None) -> str:
    """The verdict in words (detected, not detected, inconclusive), or the status of a run that
    did not finish."""
    if not res:
        return "—"
    verdict = record_verdict(res)
    return str(res.get("status")) if verdict is None else verdict.replace("_", " ")


def render_kernel_drift(report: dict[str, Any]) -> list[str]:
    """The "host vs exact INT8 kernels" section: what this CPU's default kernels change.

    Cells carry ``kernel_drift`` (the same cell under the other profile) only where the host's
    kernels differ from int32-exact arithmetic; elsewhere the section says the profiles coincide.
    """
    kernels = report.get("environment", {}).get("int8_kernels") or {}
    drifted = [run for run in report["runs"] if run.get("kernel_drift")]
    lines = ["", "## Host vs exact INT8 kernels", ""]
    if not drifted:
        if kernels.get("profiles_differ") is False:
            lines.append(
                "This host's default INT8 kernels accumulate exactly in int32 "
                f"(`{kernels.get('kernel_class')}`, measured): the `host` and `exact` profiles "
                "coincide, so every INT8 number above holds for both."
            )
        else:
            lines.append("No cell was measured under both profiles.")
        return lines
    profile = report.get("config", {}).get("int8_kernels", "exact")
    other = drifted[0]["kernel_drift"].get("kernels", {}).get("profile", "host")
    lines += [
        f"This host's default INT8 kernels are `{kernels.get('kernel_class')}` (measured), so "
        f"every quantized cell was also run under the `{other}` profile. Each pair is "
        f"`{profile}` → `{other}`.",
        "",
        "| seed | model | precision | clean acc | ASR | agree FP32 | verdicts that change |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in drifted:
        drift = run["kernel_drift"]
        changed = [
            f"{name}: {_verdict(res)} → {_verdict(drift.get('defenses', {}).get(name))}"
            for name, res in run.get("defenses", {}).items()
            if _verdict(res) != _verdict(drift.get("defenses", {}).get(name))
        ]
        lines.append(
            f"| {run['seed']} | {'poisoned' if run['poisoned'] else 'clean'} | {run['precision']} | "
            f"{run['clean_acc']:.4f} → {drift['clean_acc']:.4f} | "
            f"{run['asr']:.4f} → {drift['asr']:.4f} | "
            f"{run['agreement_fp32']:.4f} → {drift['agreement_fp32']:.4f} | "
            f"{'; '.join(changed) or 'none'} |"
        )
    return lines


def plot_report(report: dict[str, Any], folder: Path) -> list[Path]:
    """Accuracy/ASR bars and defense-score bars per precision (PNG); returns written files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    if not runs:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    precisions = list(dict.fromkeys(r["precision"] for r in runs))
    written = []
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.2
    for k, (label, key, poisoned) in enumerate(
        [
            ("clean acc (poisoned)", "clean_acc", True),
            ("ASR (poisoned)", "asr", True),
            ("clean acc (clean)", "clean_acc", False),
            ("ASR (clean)", "asr", False),
        ]
    ):
        values = [
            np.mean(
                [r[key] for r in runs if r["precision"] == p and r["poisoned"] == poisoned]
                or [np.nan]
            )
            for p in precisions
        ]
        ax.bar(np.arange(len(precisions)) + (k - 1.5) * width, values, width, label=label)
    ax.set_xticks(range(len(precisions)), precisions)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("Accuracy and attack success per precision")
    fig.tight_layout()
    path = folder / "accuracy_asr.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    names = sorted({n for r in runs for n in r.get("defenses", {})})
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            for k, poisoned in enumerate((True, False)):
                vals = []
                for p in precisions:
                    scores = [
                        r["defenses"][name]["score"]
                        for r in runs
                        if r["precision"] == p
                        and r["poisoned"] == poisoned
                        and name in r.get("defenses", {})
                        and r["defenses"][name].get("score") is not None
                    ]
                    vals.append(np.mean(scores) if scores else np.nan)
                ax.bar(
                    np.arange(len(precisions)) + (k - 0.5) * 0.35,
                    vals,
                    0.35,
                    label="poisoned" if poisoned else "clean",
                )
            score_names = {
                r["defenses"][name].get("score_name") for r in runs if name in r.get("defenses", {})
            }
            ax.set_title(f"{name}\n{', '.join(sorted(s for s in score_names if s))}", fontsize=8)
            ax.set_xticks(range(len(precisions)), precisions, rotation=30, fontsize=7)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = folder / "defense_scores.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write_report(folder: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and plots/ for the store in ``folder``."""
    folder = Path(folder)
    report = build_report(folder)
    (folder / "report.json").write_text(json.dumps(report, indent=2, sort_keys=False))
    (folder / "report.md").write_text(render_markdown(report))
    plots = plot_report(report, folder / "plots")
    return {
        "json": folder / "report.json",
        "markdown": folder / "report.md",
        **{p.stem: p for p in plots},
    }
