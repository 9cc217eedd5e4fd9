"""STRIP's verdict under the empirical threshold, recomputed from a run's stored entropies.

The runner stores every STRIP per-input entropy (``arrays/<cell>.npz``), so a different
threshold rule can be evaluated without rerunning any model: the first half of the clean
entropies fits the threshold (as the defense does), the second half measures the FRR.

    .venv/bin/python -m bench.defenses.posthoc_strip runs/gtsrb [--frr 0.01]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from defenses.strip import empirical_threshold, normal_threshold
from harness.pipeline.store import ResultStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="run folder holding results.jsonl")
    parser.add_argument("--frr", type=float, default=0.01)
    args = parser.parse_args()
    print("| model | precision | normal thr | TPR | empirical thr | TPR | FRR (held-out clean) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for record in ResultStore(args.folder).records():
        if "strip" not in record.get("defenses", {}) or "arrays" not in record:
            continue
        with np.load(args.folder / record["arrays"]) as arrays:
            clean, triggered = arrays["strip.clean_entropy"], arrays["strip.triggered_entropy"]
        n_fit = (len(clean) + 1) // 2
        normal, _, _ = normal_threshold(clean[:n_fit], args.frr)
        empirical = empirical_threshold(clean[:n_fit], args.frr)
        kind = "poisoned" if record["poisoned"] else "clean"
        print(
            f"| {kind} | {record['precision']} | {normal:.3f} | {np.mean(triggered < normal):.2f} "
            f"| {empirical:.3f} | {np.mean(triggered < empirical):.2f} "
            f"| {np.mean(clean[n_fit:] < empirical):.2f} |"
        )


if __name__ == "__main__":
    main()
