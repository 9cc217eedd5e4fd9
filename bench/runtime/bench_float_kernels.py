"""What does pinning float kernels to vendor-independent paths cost?

:mod:`harness.core.determinism` pins MKL to its ``COMPATIBLE`` branch (the same GEMM results on
Intel and AMD) and caps ATen and oneDNN at AVX2. This bench trains the same seeded model under
each setting, each in a fresh process (the libraries read the settings once, on first use),
alternating the settings round by round so load on a shared machine hits them alike, and prints
the median wall time per setting and its ratio to the portable default, with the training digest
each gave (equal digests: same arithmetic) and the CPU it ran on.

Usage: ``python -m bench.runtime.bench_float_kernels [--model small_cnn] [--images 1024] [--epochs 2]
[--rounds 3] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

from bench._cpu import cpu_description, cpu_label

#: name -> environment overrides. "portable" is what harness applies on import.
SETTINGS: dict[str, dict[str, str]] = {
    "portable (MKL COMPATIBLE, ATen/oneDNN AVX2)": {},
    "MKL AVX2 branch (Intel-only reproducibility)": {"MKL_CBWR": "AVX2"},
    "host (no pins)": {"BLINDSPOTS_FLOAT_KERNELS": "host"},
}

CHILD = """
import hashlib, json, sys, time
import numpy as np
from harness.artifacts.preprocessing import Preprocessing
from harness.data.base import load_dataset
from harness.training.loop import TrainConfig, train_model
model, images, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = load_dataset("digits")
x = np.resize(data.x_train, (images, *data.x_train.shape[1:]))
y = np.resize(data.y_train, images)
config = TrainConfig(model=model, epochs=epochs, batch_size=64, seed=0, num_threads=1)
started = time.perf_counter()
trained = train_model(x, y, 10, Preprocessing.from_images(x), config, progress=False)
seconds = time.perf_counter() - started
digest = hashlib.sha256()
for tensor in trained.state_dict().values():
    digest.update(tensor.detach().numpy().tobytes())
print(json.dumps({"seconds": seconds, "sha256": digest.hexdigest()}))
"""


def _run(overrides: dict[str, str], model: str, images: int, epochs: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATEN_", "ONEDNN_", "MKL_"))}
    env.pop("BLINDSPOTS_FLOAT_KERNELS", None)
    env.update(overrides)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(images), str(epochs)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    seconds: dict[str, list[float]] = {name: [] for name in SETTINGS}
    digests: dict[str, str] = {}
    for _ in range(args.rounds):
        for name, overrides in SETTINGS.items():
            result = _run(overrides, args.model, args.images, args.epochs)
            seconds[name].append(result["seconds"])
            digests[name] = result["sha256"]
    baseline = statistics.median(seconds[next(iter(SETTINGS))])
    cpu = cpu_description()
    record = {
        "cpu": cpu_label(cpu),
        "isa": cpu["isa"],
        "model": args.model,
        "images": args.images,
        "epochs": args.epochs,
        "rounds": args.rounds,
        "settings": {
            name: {
                "median_s": statistics.median(times),
                "ratio_to_portable": statistics.median(times) / baseline,
                "sha256": digests[name][:12],
            }
            for name, times in seconds.items()
        },
    }
    flags = [flag for flag, present in record["isa"].items() if present]
    print(f"CPU: {record['cpu']}; flags: {', '.join(flags) or 'none of the INT8-relevant ones'}")
    print(
        f"{args.model}, {args.images} images x {args.epochs} epochs, {args.rounds} rounds, 1 thread"
    )
    print("| setting | median s | ratio to portable | weights digest |")
    print("|---|---|---|---|")
    for name, row in record["settings"].items():
        print(
            f"| {name} | {row['median_s']:.2f} | {row['ratio_to_portable']:.2f} | `{row['sha256']}` |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=2)


if __name__ == "__main__":
    main()
