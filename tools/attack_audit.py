"""Audit every model of an attacks sweep and tally the audit's detections and false alarms.

    python tools/attack_audit.py /work/runs/attacks-digits --out /work/runs/attacks-digits-audit \
        [--budget quick] [--dataset digits] [--data-root PATH] [--only ATTACK ...]

For each poisoned model of the sweep (``results.jsonl``, any precision's record names the
model) and each distinct clean control (the runner trains one per attack; the same seed gives the
same weights, so controls are deduplicated by their ONNX weights), it runs
``python -m harness.cli audit <exported.onnx> --budget <budget> --out <out>/<name>`` (the FP32
export as a vendor would publish it, no training data: AC/SS are not applicable), records its
wall time, and reads ``audit.json``:

* **named**: a poisoned model whose overall verdict is ``suspicious`` with the true target among
  Neural Cleanse's flagged labels;
* **flagged, wrong label**: suspicious, target not flagged;
* **false alarm**: a clean control whose overall verdict is ``suspicious``.

Audits already finished (``audit.json`` present) are read, not rerun. Writes ``tally.json`` and
``tally.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import onnx


def _weights_digest(path: Path) -> str:
    model = onnx.load(str(path))
    h = hashlib.sha256()
    for init in sorted(model.graph.initializer, key=lambda t: t.name):
        h.update(init.name.encode())
        h.update(onnx.numpy_helper.to_array(init).tobytes())
    return h.hexdigest()


def models_of(sweep: Path, only: list[str] | None) -> list[dict[str, Any]]:
    """One entry per distinct model of the sweep: attack, seed, poisoned, ASR, ONNX path."""
    seen: dict[str, dict[str, Any]] = {}
    for line in (sweep / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        if only and record["attack"] not in only:
            continue
        exported = Path(record["artifacts"]["state"]).parent / "exported.onnx"
        key = str(exported) if record["poisoned"] else _weights_digest(exported)
        if key in seen:
            continue
        seen[key] = {
            "attack": record["attack"] if record["poisoned"] else "clean",
            "seed": record["seed"],
            "poisoned": record["poisoned"],
            "target": record["attack_params"].get("target_label", 0),
            "asr": record.get("asr"),
            "clean_acc": record.get("clean_acc"),
            "onnx": str(exported),
            "dataset": record["dataset"],
        }
    return sorted(seen.values(), key=lambda m: (not m["poisoned"], m["attack"], m["seed"]))


def audit_one(model: dict[str, Any], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    name = f"{model['attack']}-s{model['seed']}"
    folder = out / name
    report = folder / "audit.json"
    wall = None
    if not report.is_file():
        command = [sys.executable, "-m", "harness.cli", "audit", model["onnx"]]
        command += ["--budget", args.budget, "--out", str(folder), "--dataset", args.dataset]
        if args.data_root:
            command += ["--data-root", args.data_root]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "audit.log").write_text(done.stdout + done.stderr)
        (folder / "wall_s.txt").write_text(f"{wall:.1f}\n")
        if not report.is_file():
            return {**model, "name": name, "error": done.stderr.strip().splitlines()[-1:]}
    elif (folder / "wall_s.txt").is_file():
        wall = float((folder / "wall_s.txt").read_text())
    audit = json.loads(report.read_text())
    cell = audit["cells"][0]
    nc = cell["defenses"]["neural_cleanse"]
    strip = cell["defenses"].get("strip", {})
    confirmation = nc.get("confirmation") or {}
    return {
        **model,
        "name": name,
        "overall": audit["overall"]["verdict"],
        "nc_verdict": nc["verdict"],
        "nc_suspected": nc.get("suspected_labels") or [],
        "nc_raw_flagged": confirmation.get("flagged") or [],
        "nc_ort_success": confirmation.get("ort_attack_success") or {},
        "nc_score": nc.get("result", {}).get("score"),
        "nc_wall_s": nc.get("result", {}).get("wall_time_s"),
        "strip_verdict": strip.get("verdict"),
        "wall_s": wall,
    }


def _cell(row: dict[str, Any]) -> str:
    """One model: its overall verdict, NC's raw flags with onnxruntime success, max index."""
    if "error" in row:
        return "error"
    flags = ", ".join(
        f"{label}:{row['nc_ort_success'].get(str(label), float('nan')):.2f}"
        for label in row["nc_raw_flagged"]
    )
    return f"{row['overall']} [{flags}] {row['nc_score']:.2f}"


def tally(rows: list[dict[str, Any]]) -> str:
    """Markdown: per family, named / target flagged unconfirmed / wrong label; clean alarms."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row["attack"]].append(row)
    lines = [
        "| family | models | ASR (mean) | named | target flagged, not confirmed "
        "| suspicious on another label | per model: verdict [NC flag:ORT success] max index "
        "| audit wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for attack, items in groups.items():
        ok = [r for r in items if "error" not in r]
        poisoned = items[0]["poisoned"]
        asr = [r["asr"] for r in items if r.get("asr") is not None]
        sus = [r for r in ok if r["overall"] == "suspicious"]
        named = [r for r in sus if r["target"] in r["nc_suspected"]]
        unconfirmed = [r for r in ok if r not in named and r["target"] in r["nc_raw_flagged"]]
        walls = [r["wall_s"] for r in ok if r.get("wall_s") is not None]
        wall = f"{min(walls):.0f}–{max(walls):.0f}" if walls else "—"
        per_model = "; ".join(f"s{r['seed']}: {_cell(r)}" for r in items)
        if poisoned:
            cells = [
                f"{len(named)}/{len(items)}",
                f"{len(unconfirmed)}/{len(items)}",
                f"{len(sus) - len(named)}/{len(items)}",
            ]
        else:
            inconclusive = sum(1 for r in ok if r["overall"] == "inconclusive")
            cells = [
                "—",
                f"inconclusive {inconclusive}/{len(items)}",
                f"**false alarms {len(sus)}/{len(items)}**",
            ]
        label = "clean controls" if not poisoned else attack
        lines.append(
            f"| {label} | {len(items)} | {sum(asr) / max(len(asr), 1):.3f} | "
            + " | ".join(cells)
            + f" | {per_model} | {wall} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", default="quick", choices=["quick", "paper"])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-root")
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in models_of(args.sweep, args.only):
        row = audit_one(model, args.out, args)
        print(
            json.dumps(
                {
                    k: row.get(k)
                    for k in ("name", "overall", "nc_flagged", "nc_score", "wall_s", "error")
                }
            ),
            flush=True,
        )
        rows.append(row)
    (args.out / "tally.json").write_text(json.dumps(rows, indent=2))
    table = tally(rows)
    (args.out / "tally.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
