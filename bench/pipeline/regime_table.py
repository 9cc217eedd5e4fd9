"""The operating-regime columns (protocol §5, S3) of every poisoned cell of a sweep store,
attack-valid or not — descriptive: the report's primary metrics list only valid attacks.

    python -m bench.pipeline.regime_table runs/regime-gtsrb

Per poisoned cell: FP32 ASR (the §2 validity bar is 0.90), the target class's poison fraction in
the analysed sample, Spectral Signatures' removed fraction of the sample and the poison recall
of that removal, Activation Clustering's smaller-cluster purity (poison precision) and recall on
the target class, and the classes each flagged.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from harness.pipeline.store import ResultStore
from harness.report.primary import _group_cells, _regime_rows


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def table(store: Path) -> str:
    cells, _ = _group_cells(ResultStore(store).records())
    seeds = sorted({seed for seed, _, _ in cells})
    precisions = [
        p for p in ("fp32", "int8-dynamic", "int8-static", "int4") if any(k[2] == p for k in cells)
    ]
    rows = _regime_rows(cells, seeds, set(seeds), precisions)
    out = [
        "| seed | precision | FP32 ASR | target poison fraction | SS removed | SS poison recall "
        "| SS flagged | AC purity | AC recall | AC flagged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        asr = cells[(row["seed"], True, "fp32")].get("asr")
        out.append(
            f"| {row['seed']} | {row['precision']} | {_fmt(asr)} | "
            f"{_fmt(row['target_poison_fraction'])} | {_fmt(row['ss_removed_fraction'])} | "
            f"{_fmt(row['ss_poison_recall'])} | {row['ss_flagged']} | {_fmt(row['ac_purity'])} | "
            f"{_fmt(row['ac_recall'])} | {row['ac_flagged']} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", type=Path)
    print(table(parser.parse_args(argv).store), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
