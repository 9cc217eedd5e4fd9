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
         "defenses": {name: {"defense", "group", "status", "detected", "score", "score_name", "scores",
                             "flagged_labels", "threshold", "queries", "wall_time_s",
                             "params", "details", "reason"}},
         "arrays": "arrays/<cell>.npz"}   # per-sample scores, reversed triggers (optional)
      ],
      "summary": [                # aggregated over seeds, one per (precision, poisoned)
        {"precision", "poisoned", "n_seeds", "clean_acc_mean", "clean_acc_std", "asr_mean",
         "asr_std", "agreement_fp32_mean",
         "defenses": {name: {"detected": k, "ok": n, "errors": e, "not_applicable": m}}}
      ]
    }
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from harness.store import ResultStore

SCHEMA_VERSION = 1


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Aggregate runs over seeds per (precision, poisoned), keeping the runs' precision order."""
    groups: dict[tuple[str, bool], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(run["precision"], run["poisoned"])].append(run)
    rows = []
    for (precision, poisoned), members in groups.items():
        defenses: dict[str, dict[str, int]] = {}
        for run in members:
            for name, res in run.get("defenses", {}).items():
                tally = defenses.setdefault(
                    name, {"detected": 0, "ok": 0, "errors": 0, "not_applicable": 0}
                )
                if res["status"] == "ok":
                    tally["ok"] += 1
                    tally["detected"] += int(bool(res["detected"]))
                elif res["status"] == "error":
                    tally["errors"] += 1
                else:
                    tally["not_applicable"] += 1
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


def build_report(folder: str | Path) -> dict[str, Any]:
    """The report.json document for the results stored in ``folder``."""
    folder = Path(folder)
    store = ResultStore(folder)
    runs = store.records()
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
    return json.loads(path.read_text()) if path.is_file() else {}


def _cell(tally: dict[str, int] | None) -> str:
    """``2/3`` detected out of ok runs, with errors and n/a shown, never hidden as 'no'."""
    if tally is None:
        return "—"
    parts = []
    if tally["ok"]:
        parts.append(f"{tally['detected']}/{tally['ok']}")
    if tally["errors"]:
        parts.append(f"{tally['errors']} error")
    if tally["not_applicable"]:
        parts.append(f"{tally['not_applicable']} n/a")
    return ", ".join(parts) or "—"


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
        f"Dataset `{config.get('dataset')}`, model `{config.get('model')}`, attack `{config.get('attack')}` "
        f"{json.dumps(config.get('attack_params', {}))}, seeds {config.get('seeds')}.",
        "",
        "## Accuracy, attack success and defense verdicts per precision",
        "",
        "Defense cells give *detected / runs that completed* (for Fine-Pruning: *backdoor removed*). "
        "On clean controls a detection is a false positive (for Fine-Pruning it only means "
        "accuracy survived the repair: there is no backdoor to remove). Errors and not-applicable cells are "
        "shown as such, never as 'not detected'.",
        "",
    ]
    header = ["precision", "model", "clean acc", "ASR", "agree FP32", *defenses]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    order = {p: i for i, p in enumerate(config.get("precisions", []))}
    for row in sorted(summary, key=lambda r: (order.get(r["precision"], 99), not r["poisoned"])):
        cells = [
            row["precision"],
            "poisoned" if row["poisoned"] else "clean",
            _mean_std(row["clean_acc_mean"], row["clean_acc_std"], row["n_seeds"]),
            _mean_std(row["asr_mean"], row["asr_std"], row["n_seeds"]),
            f"{row['agreement_fp32_mean']:.4f}",
            *[_cell(row["defenses"].get(d)) for d in defenses],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Defense scores per run", ""]
    lines.append(
        "| seed | model | precision | defense | status | detected | score | flagged | time (s) | queries |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for run in report["runs"]:
        for name, res in run.get("defenses", {}).items():
            score = (
                ""
                if res.get("score") is None
                else f"{res['score']:.3f} ({res.get('score_name') or ''})"
            )
            status = (
                res["status"] if res["status"] == "ok" else f"{res['status']}: {res.get('reason')}"
            )
            lines.append(
                f"| {run['seed']} | {'poisoned' if run['poisoned'] else 'clean'} | {run['precision']} | {name} | "
                f"{status} | {res.get('detected')} | {score} | {res.get('flagged_labels')} | "
                f"{res.get('wall_time_s', 0):.1f} | {res.get('queries', 0)} |"
            )
    lines += render_kernel_drift(report)
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
    return "\n".join(lines) + "\n"


def _verdict(res: dict[str, Any] | None) -> str:
    if not res:
        return "—"
    if res.get("status") != "ok":
        return str(res.get("status"))
    return "detected" if res.get("detected") else "not detected"


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
