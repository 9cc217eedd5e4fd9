"""The second-QCB table of BENCHMARKS.md from ``blindspots qcb run`` folders (issue 17 item 7).

Per seed: accuracy and ASR of the QCB model and its clean control at every precision
(onnxruntime, ``exact`` kernels), and the deployment-differential check's verdict on each
quantized file — the label it flagged, whether that is the target (hit = QCB file flagged with the
target label; false alarm = clean control's file flagged), its held-out differential rate, and
whether the winning patch was one of its first-layer stimulus patterns (``best_is_stimulus``)
rather than a random patch. Reads only ``results.jsonl``; reruns nothing.

    python -m bench.qcb.hong_table runs/qcb-hong-digits [runs/qcb-hong-digits-joint ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PRECISIONS = ("fp32", "int8-static", "int4")


def _records(folder: Path) -> dict[tuple[int, bool, str], dict[str, Any]]:
    lines = (folder / "results.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return {(r["seed"], r["poisoned"], r["precision"]): r for r in rows}


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


def table(folder: Path) -> str:
    cells = _records(folder)
    seeds = sorted({seed for seed, _, _ in cells})
    head = " / ".join(PRECISIONS)
    lines = [
        f"| seed | QCB acc {head} | QCB ASR {head} | clean-control acc {head} "
        f"| clean-control ASR {head} | diff check int8-static: QCB · control "
        "| diff check int4: QCB · control |",
        "|---|---|---|---|---|---|---|",
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
        lines.append(
            f"| {seed} | {rates(True, 'clean_acc')} | {rates(True, 'asr')} | "
            f"{rates(False, 'clean_acc')} | {rates(False, 'asr')} | " + " | ".join(verdicts) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="blindspots qcb run --out folders")
    args = parser.parse_args(argv)
    for folder in args.runs:
        print(f"### {folder}\n\n{table(folder)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
