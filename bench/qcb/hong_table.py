"""The second-QCB table of BENCHMARKS.md from ``blindspots qcb run`` folders (issue 17 item 7).

Per seed: accuracy and ASR of the QCB model and its clean control at every precision
(onnxruntime, ``exact`` kernels), and the deployment-differential check's verdict on each
quantized file — the label it flagged, whether that is the target (hit = QCB file flagged with the
target label; false alarm = clean control's file flagged), its held-out differential rate, and
whether the winning patch was one of its first-layer stimulus patterns (``best_is_stimulus``)
rather than a random patch. With ``--trigger-rate`` it also measures, on onnxruntime, the
*attacker's own trigger's* differential rate (the fraction of triggered non-target test images
the quantized file sends to the target while the FP32 file does not): what a search that found
the real trigger would have scored. Everything else is read from ``results.jsonl``.

    python -m bench.qcb.hong_table runs/qcb-hong-digits [runs/qcb-hong-digits-joint ...] [--trigger-rate]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from harness.pipeline.store import ResultStore

PRECISIONS = ("fp32", "int8-static", "int4")


def _records(folder: Path) -> dict[tuple[int, bool, str], dict[str, Any]]:
    rows = ResultStore(folder).records()  # first copy of each cell, as the report reads it
    return {(r["seed"], r["poisoned"], r["precision"]): r for r in rows}


def trigger_rates(folder: Path, threads: int = 1) -> dict[tuple[int, bool, str], float]:
    """Per quantized cell, the real trigger's differential rate on the run's test images."""
    import numpy as np

    from harness.attacks.base import build_attack
    from harness.pipeline.evaluate import evaluation_images
    from harness.qcb.pipeline import QCBConfig, qcb_dataset
    from harness.runtime.adapter import RuntimeAdapter

    config = QCBConfig.model_validate_json((folder / "qcb_config.json").read_text())
    attack = build_attack(config.attack, config.attack_params)
    images = evaluation_images(qcb_dataset(config), attack, config.eval_limit)
    out = {}
    for (seed, poisoned, precision), record in _records(folder).items():
        if precision == "fp32":
            continue
        kind = "qcb" if poisoned else "clean"
        fp32 = folder / "artifacts" / f"s{seed}" / kind / "exported.onnx"
        predict = {
            name: RuntimeAdapter.from_path(path, threads=threads, kernel_profile="exact").predict(
                images.triggered
            )
            for name, path in (("quant", Path(record["artifacts"]["onnx"])), ("fp32", fp32))
        }
        target = images.target_label
        out[(seed, poisoned, precision)] = float(
            np.mean((predict["quant"] == target) & (predict["fp32"] != target))
        )
    return out


def _diff(record: dict[str, Any] | None, poisoned: bool) -> str:
    """One cell's differential-check verdict, as the target rule reads it."""
    result = (record or {}).get("defenses", {}).get("deployment_diff")
    if not result or result.get("status") != "ok":
        return "n/a"
    details = result.get("details", {})
    label, rate = details.get("label"), result.get("score")
    patch = "stimulus" if details.get("best_is_stimulus") else "random"
    if result.get("verdict") != "detected":
        return f"not flagged (best: label {label}, {rate:.2f}, {patch})"
    if poisoned:
        outcome = "HIT" if result.get("target_hit") else "flagged, wrong label"
    else:
        outcome = "FALSE ALARM"
    return f"{outcome}: label {label}, {rate:.2f}, {patch}"


def table(folder: Path, trigger: dict[tuple[int, bool, str], float] | None = None) -> str:
    cells = _records(folder)
    trigger = trigger or {}
    seeds = sorted({seed for seed, _, _ in cells})
    head = " / ".join(PRECISIONS)
    lines = [
        f"| seed | QCB acc {head} | QCB ASR {head} | clean-control acc {head} "
        f"| clean-control ASR {head} | diff check int8-static: QCB · control "
        "| diff check int4: QCB · control |"
        + (" real trigger's rate int8-static / int4: QCB · control |" if trigger else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if trigger else ""),
    ]
    for seed in seeds:

        def rates(poisoned: bool, key: str, seed: int = seed) -> str:
            values = [cells.get((seed, poisoned, p)) for p in PRECISIONS]
            return " / ".join(
                "—" if v is None else f"{v['profiles']['exact'][key]:.3f}" for v in values
            )

        verdicts = [
            f"{_diff(cells.get((seed, True, p)), True)} · {_diff(cells.get((seed, False, p)), False)}"
            for p in PRECISIONS[1:]
        ]
        if trigger:
            verdicts.append(
                " · ".join(
                    " / ".join(
                        f"{trigger[(seed, poisoned, p)]:.2f}"
                        if (seed, poisoned, p) in trigger
                        else "—"
                        for p in PRECISIONS[1:]
                    )
                    for poisoned in (True, False)
                )
            )
        lines.append(
            f"| {seed} | {rates(True, 'clean_acc')} | {rates(True, 'asr')} | "
            f"{rates(False, 'clean_acc')} | {rates(False, 'asr')} | " + " | ".join(verdicts) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="blindspots qcb run --out folders")
    parser.add_argument(
        "--trigger-rate", action="store_true", help="also measure the real trigger's rate (ORT)"
    )
    args = parser.parse_args(argv)
    for folder in args.runs:
        rates = trigger_rates(folder) if args.trigger_rate else None
        print(f"### {folder}\n\n{table(folder, rates)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
