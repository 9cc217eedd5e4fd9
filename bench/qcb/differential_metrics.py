"""Protocol §4.6 (v3) metrics of the deployment-differential check from a ``qcb run`` folder.

    python -m bench.qcb.differential_metrics runs/q2-hong-digits [--seeds 10-19]

Per quantized precision, as docs/protocol.md §4.6 fixes them before the run:

* a QCB cell counts only at a precision in the config's ``[qcb] targets`` where the QCB model
  is *armed* — onnxruntime ASR there ≥ 0.50 and FP32 ASR < 0.20; others are listed as unarmed;
* clean controls count at every quantized precision;
* detection rate (flagged label = target) over armed QCB cells and false-alarm rate (any flag)
  over clean controls, Wilson 95%; inconclusive runs counted apart;
* the AUROC of the score (held-out differential rate of the best candidate) between armed QCB
  cells and clean controls, its percentile bootstrap CI, and the exact one-sided Mann–Whitney
  test, Holm over the setup's precisions that have one;
* per armed cell, whether the winning patch was a first-layer stimulus pattern.

The statistics are ``harness.report.stats``'s, the ones the report uses for §5.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from harness.pipeline.store import ResultStore
from harness.report.primary import wilson_rate
from harness.report.stats import ALPHA, auroc, bootstrap_auroc_ci, holm, mann_whitney_exact

ARMED_ASR = 0.50
"""§4.6: a QCB model is armed at a target precision when its onnxruntime ASR there is ≥ this…"""
ASLEEP_FP32_ASR = 0.20
"""…while its FP32 ASR stays below this."""


def _parse_seeds(text: str | None) -> set[int] | None:
    if not text:
        return None
    if "-" in text and "," not in text:
        low, high = (int(v) for v in text.split("-"))
        return set(range(low, high + 1))
    return {int(v) for v in text.split(",")}


def _verdict_rate(results: list[dict[str, Any]], counts: Any) -> dict[str, Any]:
    """``counts`` over decided ``ok`` runs; inconclusive and not-``ok`` runs counted apart."""
    ok = [r for r in results if r.get("status") == "ok"]
    decided = [r for r in ok if r.get("verdict") in ("detected", "not_detected")]
    return wilson_rate(
        sum(bool(counts(r)) for r in decided),
        len(decided),
        len(ok) - len(decided),
        len(results) - len(ok),
    )


def metrics(folder: Path, seeds: set[int] | None = None) -> dict[str, Any]:
    """The §4.6 metrics of one QCB store (only ``seeds`` if given)."""
    config = json.loads((folder / "qcb_config.json").read_text())
    targets = list((config.get("qcb") or {}).get("targets") or [])
    rows = [r for r in ResultStore(folder).records() if seeds is None or r["seed"] in seeds]
    cell = {(r["seed"], r["poisoned"], r["precision"]): r for r in rows}
    quantized = sorted({r["precision"] for r in rows if r["precision"] != "fp32"})
    out: dict[str, Any] = {"seeds": sorted({r["seed"] for r in rows}), "precisions": {}}
    for precision in quantized:
        armed, unarmed, clean = [], [], []
        for (seed, poisoned, p), record in sorted(cell.items()):
            if p != precision:
                continue
            result = (record.get("defenses") or {}).get("deployment_diff") or {}
            if not poisoned:
                clean.append(result)
            elif precision in targets:
                asr, fp32 = record.get("asr"), cell.get((seed, True, "fp32"), {}).get("asr")
                if (
                    asr is not None
                    and fp32 is not None
                    and asr >= ARMED_ASR
                    and fp32 < ASLEEP_FP32_ASR
                ):
                    armed.append((seed, result))
                    continue
                unarmed.append({"seed": seed, "asr": asr, "fp32_asr": fp32})
        entry: dict[str, Any] = {
            "detection": _verdict_rate([r for _, r in armed], lambda r: bool(r.get("target_hit")))
            if precision in targets
            else None,
            "false_alarm": _verdict_rate(clean, lambda r: r.get("verdict") == "detected"),
            "wrong_label": [
                {"seed": seed, "flagged": r.get("flagged_labels")}
                for seed, r in armed
                if r.get("verdict") == "detected" and not r.get("target_hit")
            ],
            "unarmed": unarmed,
            "stimulus_wins": sum(
                bool((r.get("details") or {}).get("best_is_stimulus"))
                for _, r in armed
                if r.get("target_hit")
            ),
            "auroc": None,
        }
        pos = [
            r["score"] for _, r in armed if r.get("status") == "ok" and r.get("score") is not None
        ]
        neg = [r["score"] for r in clean if r.get("status") == "ok" and r.get("score") is not None]
        if pos and neg:
            low, high = (
                bootstrap_auroc_ci(pos, neg) if min(len(pos), len(neg)) > 1 else (None, None)
            )
            entry["auroc"] = {
                "value": auroc(pos, neg),
                "ci": [low, high],
                "degenerate": low is not None and low == high,
                "n_qcb": len(pos),
                "n_clean": len(neg),
                "p": mann_whitney_exact(pos, neg),
            }
        out["precisions"][precision] = entry
    tested = [p for p, e in out["precisions"].items() if e["auroc"]]
    for precision, adjusted in zip(
        tested, holm([out["precisions"][p]["auroc"]["p"] for p in tested]), strict=True
    ):
        test = out["precisions"][precision]["auroc"]
        test["p_holm"] = adjusted
        test["holm_family"] = len(tested)
        ci_low = test["ci"][0]
        test["works"] = bool(ci_low is not None and ci_low > 0.5 and adjusted < ALPHA)
    return out


def _fmt_rate(rate: dict[str, Any] | None) -> str:
    if not rate:
        return "—"
    if not rate["n"]:
        return f"0/0 (+{rate['inconclusive']} inconclusive)" if rate["inconclusive"] else "—"
    low, high = rate["ci"]
    extra = f", +{rate['inconclusive']} inconclusive" if rate["inconclusive"] else ""
    extra += f", {rate['not_ok']} not run" if rate.get("not_ok") else ""
    return f"{rate['k']}/{rate['n']} [{low:.2f}, {high:.2f}]{extra}"


def render(result: dict[str, Any]) -> str:
    """Markdown table of :func:`metrics` (what BENCHMARKS.md quotes)."""
    lines = [
        "| precision | detection (armed QCB) | false alarms (clean) | unarmed QCB | AUROC [95% CI] "
        "| Mann–Whitney p / Holm p | works (§5) | stimulus wins | wrong-label flags |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for precision, e in result["precisions"].items():
        a = e["auroc"]
        if a:
            ci = "degenerate " if a["degenerate"] else ""
            low, high = a["ci"]
            shown_ci = f"{ci}[{low:.2f}, {high:.2f}]" if low is not None else "n too small"
            area = f"{a['value']:.3f} {shown_ci} ({a['n_qcb']} + {a['n_clean']})"
            tests = f"{a['p']:.2g} / {a['p_holm']:.2g}"
            works = "yes" if a["works"] else "no"
        else:
            area, tests, works = "—", "—", "—"
        stimulus = str(e["stimulus_wins"]) if e["detection"] else "—"
        lines.append(
            f"| {precision} | {_fmt_rate(e['detection'])} | {_fmt_rate(e['false_alarm'])} | "
            f"{len(e['unarmed'])} | {area} | {tests} | {works} | {stimulus} | "
            f"{len(e['wrong_label']) if e['detection'] else '—'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seeds", help="e.g. 10-19 or 10,11,12 (default: every seed)")
    parser.add_argument("--json", type=Path, help="also write the metrics as JSON")
    args = parser.parse_args(argv)
    result = metrics(args.folder, _parse_seeds(args.seeds))
    print(f"seeds {result['seeds']}")
    print(render(result), end="")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
