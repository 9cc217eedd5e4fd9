"""``blindspots demo``: the project's point on the embedded digits set, in about two minutes.

Two runs, both computed from scratch on every call:

1. a BadNet model and its clean control, exported and quantized to every precision, checked
   by the cheap defenses (``harness.cli.steps.DEMO_CONFIG``) — does the backdoor survive the
   shipped files, and does a defense still find it there?
2. the quantization-conditioned backdoor (:data:`DEMO_QCB_CONFIG`): asleep in the FP32 file,
   armed in the INT8 file, and the differential check that catches it.

``demo.json`` keeps the numbers the demo's table is made of (the two report summaries) and
``demo.md`` is that table; README's demo section is generated from ``demo.json`` by
``tools/demo_table.py`` and a test fails when they differ, so the README cannot drift from
what the code computes. ``--full`` runs the published defense budgets instead (minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from defenses.base import default_defenses
from harness.core.atomic import atomic_write_text
from harness.pipeline.config import build_config
from harness.pipeline.runner import run_experiment
from harness.qcb.pipeline import QCBConfig, run_qcb
from harness.report.document import write_report

DEMO_SCHEMA = 1

# The vignette of configs/qcb/qcb-digits.toml cut to what it shows: one seed, the FP32 file and
# the INT8 file the QCB targets, the differential check and STRIP (the same trigger-agnostic
# filter as in part 1), no re-quantization table.
DEMO_QCB_CONFIG: dict[str, Any] = {
    "dataset": "digits",
    "model": "small_cnn",
    "attack": "badnet",
    "attack_params": {"patch_size": 3, "pattern": "checkerboard", "margin": 0, "target_label": 0},
    "training": {"epochs": 25, "batch_size": 64, "lr": 0.05},
    "qcb": {"targets": ["int8-static"], "kappa": 4.0, "boost_units": 4, "recover_epochs": 2},
    "seeds": [0],
    "precisions": ["fp32", "int8-static"],
    "calibration_size": 256,
    "defense_clean_size": 225,
    "defense_train_size": 1000,
    "threads": 1,
    "defenses": ["deployment_diff", "strip"],
    # STRIP's paper fits its threshold on 2000 clean inputs; digits holds 225 for defenses, so
    # the demo names the deviation (see defenses/strip.py) instead of reporting "inconclusive".
    "defense_params": {"strip": {"n_overlays": 50, "n_test": 100, "n_clean_fit": 100}},
    "requantize": False,
}

# --full: every defense at the budgets the demo used before it was cut to two minutes, and
# the QCB vignette with every defense and the re-quantization table.
FULL_DEFENSE_PARAMS: dict[str, dict[str, Any]] = {
    "neural_cleanse": {"steps": 400, "batch_size": 32, "n_samples": 256, "torch_threads": 1},
    "strip": {"n_overlays": 50, "n_test": 100},
}
FULL_QCB_CHANGES: dict[str, Any] = {
    "precisions": ["fp32", "int8-static", "int4"],
    "qcb": {**DEMO_QCB_CONFIG["qcb"], "targets": ["int8-static", "int4"]},
    "defense_params": {
        "neural_cleanse": {"steps": 200, "batch_size": 32, "n_samples": 128, "torch_threads": 1},
        "strip": {"n_overlays": 50, "n_test": 100},
    },
    "requantize": True,
}

SHORT = {
    "neural_cleanse": "NC",
    "activation_clustering": "AC",
    "spectral_signatures": "SS",
    "strip": "STRIP",
    "fine_pruning": "FP",
    "deployment_diff": "deployment_diff",
}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def demo_configs(base: dict[str, Any], full: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two runs' raw configs: the fast demo, or the full budget with ``full``."""
    if not full:
        return base, DEMO_QCB_CONFIG
    main = {**base, "defenses": default_defenses("run"), "defense_params": FULL_DEFENSE_PARAMS}
    qcb = {**DEMO_QCB_CONFIG, **FULL_QCB_CHANGES, "defenses": default_defenses("qcb")}
    return main, qcb


def run_demo(args: argparse.Namespace, base: dict[str, Any]) -> int:
    """Both runs into ``args.out`` (BadNet at the top, the QCB in ``qcb/``), then the table."""
    main_raw, qcb_raw = demo_configs(base, getattr(args, "full", False))
    config = build_config({**main_raw, "int8_kernels": args.int8_kernels}, "demo config")
    qcb_config = QCBConfig.model_validate(qcb_raw)
    out = Path(args.out)
    started = time.perf_counter()
    run_experiment(config, out, log=_log)
    write_report(out)
    run_qcb(qcb_config, out / "qcb", log=_log)
    demo = demo_summary(out)
    atomic_write_text(out / "demo.json", json.dumps(demo, indent=2, sort_keys=True) + "\n")
    table = render_demo(demo)
    atomic_write_text(out / "demo.md", table)
    _log(f"demo finished in {time.perf_counter() - started:.0f}s")
    print(table)
    print(f"wrote {out / 'demo.md'}, {out / 'report.html'} and {out / 'qcb' / 'report.html'}")
    return 0


# ------------------------------------------------------------------------------- the numbers
def demo_summary(out: str | Path) -> dict[str, Any]:
    """What the demo table is made of, read back from the two runs' own reports."""
    out = Path(out)
    report = json.loads((out / "report.json").read_text())
    qcb = json.loads((out / "qcb" / "qcb.json").read_text())
    config = report["config"]
    qcb_config = json.loads((out / "qcb" / "qcb_config.json").read_text())
    return {
        "schema": DEMO_SCHEMA,
        "badnet": {
            "setting": {
                key: config[key]
                for key in ("dataset", "model", "attack", "attack_params", "seeds", "precisions")
            },
            "defenses": config["defenses"],
            "summary": report["summary"],
        },
        "qcb": {
            "setting": {
                key: qcb_config[key]
                for key in ("dataset", "model", "attack_params", "seeds", "precisions", "qcb")
            },
            "defenses": qcb_config["defenses"],
            "seeds": qcb["seeds"],
            "verdicts": qcb["verdicts"],
        },
    }


def _cell(tally: dict[str, Any] | None) -> str:
    """``detected/decided``; inconclusive and not-applicable runs are named, never counted."""
    if tally is None:
        return "—"
    if tally["decided"] == 0 and tally.get("not_applicable"):
        return "n/a"
    cell = f"{tally['detected']}/{tally['decided']}"
    if tally.get("inconclusive"):
        cell += f" +{tally['inconclusive']} inconclusive"
    if tally.get("errors"):
        cell += f" +{tally['errors']} error"
    return cell


def _flagged_at(rows: list[dict[str, Any]], name: str) -> list[str]:
    return [
        row["precision"] for row in rows if (row["defenses"].get(name) or {}).get("detected", 0) > 0
    ]


def _listing(items: list[str]) -> str:
    return ", ".join(items) if items else "none"


def render_demo(demo: dict[str, Any]) -> str:
    """The demo's tables and the findings computed from them (markdown, deterministic)."""
    badnet, qcb = demo["badnet"], demo["qcb"]
    setting = badnet["setting"]
    params = setting["attack_params"]
    defenses = badnet["defenses"]
    rows = badnet["summary"]
    order = {p: i for i, p in enumerate(setting["precisions"])}
    rows = sorted(rows, key=lambda r: (order.get(r["precision"], 99), not r["poisoned"]))
    poisoned = [r for r in rows if r["poisoned"]]
    clean = [r for r in rows if not r["poisoned"]]
    lines = [
        f"**1. BadNet** ({setting['dataset']}, `{setting['model']}`, "
        f"{params.get('patch_size')}×{params.get('patch_size')} patch, "
        f"{params.get('poison_rate')} poison rate, target {params.get('target_label')}, "
        f"seed {', '.join(map(str, setting['seeds']))}). "
        "A defense cell is detected / decided runs; on clean rows a detection is a false alarm.",
        "",
        "| precision | model | clean acc | ASR | "
        + " | ".join(SHORT.get(d, d) for d in defenses)
        + " |",
        "|---|---|---:|---:|" + "---|" * len(defenses),
    ]
    for row in rows:
        cells = [_cell(row["defenses"].get(name)) for name in defenses]
        lines.append(
            f"| {row['precision']} | {'poisoned' if row['poisoned'] else 'clean'} | "
            f"{row['clean_acc_mean']:.4f} | {row['asr_mean']:.4f} | " + " | ".join(cells) + " |"
        )
    asr = ", ".join(f"{r['precision']} {r['asr_mean']:.4f}" for r in poisoned)
    lines += ["", f"- Backdoor ASR per precision: {asr}; "
              f"clean control at most {max(r['asr_mean'] for r in clean):.4f}."]  # fmt: skip
    for name in defenses:
        if name == "fine_pruning":  # a repair: its "detected" means the repair worked
            lines.append(
                "- FP is a repair, not a detection: backdoor removed with accuracy kept on the "
                f"poisoned model at: {_listing(_flagged_at(poisoned, name))}; accuracy kept on "
                f"the clean control at: {_listing(_flagged_at(clean, name))}."
            )
            continue
        lines.append(
            f"- {SHORT.get(name, name)} flags the poisoned model at: "
            f"{_listing(_flagged_at(poisoned, name))}; the clean control at: "
            f"{_listing(_flagged_at(clean, name))}."
        )
    lines += ["", *_render_qcb(qcb)]
    return "\n".join(lines) + "\n"


def _render_qcb(qcb: dict[str, Any]) -> list[str]:
    setting = qcb["setting"]
    params = setting["attack_params"]
    defenses = qcb["defenses"]
    verdicts = qcb["verdicts"]
    lines = [
        f"**2. Quantization-conditioned backdoor** ({setting['dataset']}, `{setting['model']}`, "
        f"{params.get('patch_size')}×{params.get('patch_size')} {params.get('pattern')} trigger, "
        f"target {params.get('target_label')}, armed for {', '.join(setting['qcb']['targets'])}, "
        f"seed {', '.join(map(str, setting['seeds']))}; exact INT8 kernels). "
        "deployment_diff compares each shipped file with the FP32 one.",
        "",
        "| artifact | QCB ASR | QCB acc | clean-control ASR | clean-control acc | "
        + " | ".join(f"{SHORT.get(d, d)} QCB / clean" for d in defenses)
        + " |",
        "|---|---:|---:|---:|---:|" + "---|" * len(defenses),
    ]
    for seed_row in qcb["seeds"]:
        for precision in setting["precisions"]:
            numbers = seed_row.get(f"{precision}/exact")
            if numbers is None:
                continue
            cells = [
                f"{_cell(verdicts.get(d, {}).get(f'{precision}/qcb'))} / "
                f"{_cell(verdicts.get(d, {}).get(f'{precision}/clean'))}"
                for d in defenses
            ]
            lines.append(
                f"| {precision} | {numbers['qcb_asr']:.4f} | {numbers['qcb_acc']:.4f} | "
                f"{numbers['clean_asr']:.4f} | {numbers['clean_acc']:.4f} | "
                + " | ".join(cells)
                + " |"
            )
    lines.append("")
    for seed_row in qcb["seeds"]:
        asr = ", ".join(
            f"{p} {seed_row[f'{p}/exact']['qcb_asr']:.4f}"
            for p in setting["precisions"]
            if f"{p}/exact" in seed_row
        )
        lines.append(f"- QCB ASR per file (seed {seed_row['seed']}): {asr}.")
    for name in defenses:
        per = verdicts.get(name, {})
        hit = [p for p in setting["precisions"] if (per.get(f"{p}/qcb") or {}).get("detected")]
        fa = [p for p in setting["precisions"] if (per.get(f"{p}/clean") or {}).get("detected")]
        if name == "fine_pruning":
            lines.append(
                "- FP is a repair, not a detection: it succeeded on the QCB at: "
                f"{_listing(hit)}; accuracy kept on the clean control at: {_listing(fa)}."
            )
            continue
        lines.append(
            f"- {SHORT.get(name, name)} flags the QCB at: {_listing(hit)}; "
            f"the clean control at: {_listing(fa)}."
        )
    return lines


def demo_tables_equal(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Where two demo summaries differ (empty: the same table, number for number)."""
    differences = []
    for part in ("badnet", "qcb"):
        left = json.dumps(a[part], sort_keys=True)
        right = json.dumps(b[part], sort_keys=True)
        if left != right:
            differences.append(f"{part}: summaries differ")
    if render_demo(a) != render_demo(b):
        differences.append("rendered tables differ")
    return differences
