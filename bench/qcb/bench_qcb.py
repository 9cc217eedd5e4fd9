"""QCB acceptance run: does the backdoor sleep in FP32 and wake in the deployed INT8 file?

Runs ``blindspots qcb run`` for one config (default ``configs/qcb/qcb-gtsrb.toml``: GTSRB, three
seeds) and prints, per seed and artifact, the onnxruntime ASR of the QCB and the clean accuracy
of the QCB and of its clean control, under both INT8 kernel profiles, plus the wall time of each
seed (training, implant, export/quantization, evaluation, defenses, re-quantization) so a run
that does not fit a budget can still be sized from one seed. Finished seeds are reused.

Usage: ``python -m bench.qcb.bench_qcb [--config configs/qcb/qcb-gtsrb.toml] [--out runs/qcb-gtsrb]
[--seeds 0,1,2] [--data-root PATH] [--threads N] [--json bench_qcb.json]``
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from harness.qcb.pipeline import load_qcb_config, run_qcb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/qcb/qcb-gtsrb.toml")
    parser.add_argument("--out", default="runs/qcb-gtsrb")
    parser.add_argument("--seeds", default=None, help="comma list overriding the config's seeds")
    parser.add_argument("--json", default=None, help="also write the summary here")
    parser.add_argument("--data-root", default=None, help="override the config's data_root")
    parser.add_argument("--threads", type=int, default=None, help="override the config's threads")
    args = parser.parse_args(argv)
    overrides = {"data_root": args.data_root, "threads": args.threads}
    if args.seeds:
        overrides["seeds"] = [int(s) for s in args.seeds.split(",")]
    config = load_qcb_config(args.config, overrides)
    started = time.perf_counter()
    summary = run_qcb(config, args.out, log=lambda message: print(message, flush=True))
    summary["total_seconds"] = time.perf_counter() - started
    summary["machine"] = {"processor": platform.processor(), "python": platform.python_version()}
    print((Path(args.out) / "qcb.md").read_text())
    print(f"seconds per seed: {summary['seconds_per_seed']}; total {summary['total_seconds']:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
