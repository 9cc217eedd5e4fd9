"""What do the INT8 kernel profiles cost, and what does this CPU's default arithmetic change?

For each precision of one trained model (the runner's artifact folder), in one process:

- **cost**: ``adapter.logits`` on the same images under ``exact`` and ``host``, alternating call
  by call so load on a shared machine hits both alike; the report gives the median of per-round
  ratios exact/host (> 1: the exact profile is slower);
- **drift**: clean accuracy, attack success and top-1 agreement with FP32 under both profiles,
  on the test set (identical wherever the host's kernels are int32-exact).

The host's kernel class is measured by :func:`harness.runtime.kernels.probe_host` and printed with
the
CPU's flags, so every number says which CPU produced it.

Usage: ``python -m bench.runtime.bench_kernels --artifacts runs/demo/artifacts/<key>/poisoned
[--dataset digits] [--data-root PATH] [--images 512] [--repeats 15] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from harness.attacks.base import build_attack
from harness.core.metrics import accuracy, agreement, attack_success_rate
from harness.data.base import load_dataset
from harness.runtime.adapter import RuntimeAdapter
from harness.runtime.kernels import PROFILES, cpu_isa_flags, probe_host

PRECISIONS = ("int8-dynamic", "int8-static", "int4")


def time_ratio(adapters: dict[str, RuntimeAdapter], images: np.ndarray, repeats: int) -> float:
    """Median over rounds of time(exact) / time(host), the two alternating within a round."""
    ratios = []
    for _ in range(repeats):
        seconds = {}
        for profile, adapter in adapters.items():
            started = time.perf_counter()
            adapter.logits(images)
            seconds[profile] = time.perf_counter() - started
        ratios.append(seconds["exact"] / seconds["host"])
    return statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", required=True, help="folder with <precision>.onnx files")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--attack-params", default='{"patch_size": 2, "margin": 0}')
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    data = load_dataset(args.dataset, args.data_root)
    attack = build_attack("badnet", json.loads(args.attack_params))
    triggered, _ = attack.triggered_test_set(data.x_test, data.y_test)
    folder = Path(args.artifacts)
    fp32 = RuntimeAdapter.from_path(folder / "fp32.onnx", threads=args.threads)
    fp32_pred = fp32.predict(data.x_test)
    host = probe_host()
    rows = []
    for precision in PRECISIONS:
        path = folder / f"{precision}.onnx"
        if not path.is_file():
            continue
        adapters = {
            p: RuntimeAdapter.from_path(path, threads=args.threads, kernel_profile=p)
            for p in PROFILES
        }
        row: dict = {"precision": precision}
        for profile, adapter in adapters.items():
            pred = adapter.predict(data.x_test)
            row[profile] = {
                "clean_acc": accuracy(pred, data.y_test),
                "asr": attack_success_rate(adapter.predict(triggered), attack.target_label),
                "agreement_fp32": agreement(pred, fp32_pred),
            }
        images = data.x_test[: args.images]
        row["time_ratio_exact_over_host"] = time_ratio(adapters, images, args.repeats)
        rows.append(row)
    result = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_flags": [flag for flag, present in cpu_isa_flags().items() if present],
        "host_kernels": host.as_dict(),
        "threads": args.threads,
        "images": args.images,
        "rows": rows,
    }
    print(f"host INT8 kernels: {host.kernel_class}; CPU flags: {', '.join(result['cpu_flags'])}")
    print("| precision | exact acc / ASR / agree | host acc / ASR / agree | time exact/host |")
    print("|---|---|---|---|")
    for row in rows:
        cells = [
            " / ".join(f"{row[p][k]:.4f}" for k in ("clean_acc", "asr", "agreement_fp32"))
            for p in ("exact", "host")
        ]
        ratio = row["time_ratio_exact_over_host"]
        print(f"| {row['precision']} | {cells[0]} | {cells[1]} | {ratio:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
