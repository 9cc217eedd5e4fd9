"""Neural Cleanse step time with and without the replica's rewrites, side by side in one process.

The rewrites (:mod:`harness.replica.rewrites`: fused fake-quant, dropped re-quantization after
pools, MaxPool before Relu) must leave values and gradients unchanged (tested) and exist only to
make Neural Cleanse cheaper. This bench measures that: for each precision of the GTSRB grid
model it runs the same Neural Cleanse label steps (16 images, one mini-batch, one torch thread)
through the node-by-node replica and the rewritten one, alternating rounds, and prints the best
round of each and their ratio. It also checks that both give bit-identical logits on the images
(gradients are compared in ``tests/runtime/test_replica_rewrites.py``; the fused fake-quant's gradient
differs from the node-by-node pair's by float32 rounding, so trajectories drift apart and norms
after many steps are not a check).

Usage: ``python -m bench.runtime.bench_replica [--precisions fp32,int8-static] [--steps 40]
[--rounds 3]``. The model comes from ``bench.defenses.bench_nc``'s cache (``runs/bench_nc/``; built from
``../shared/data/gtsrb32.npz`` on first use).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.defenses.bench_nc import (
    CACHE,
    SEED,
    cpu_description,
    defense_data,
    grid_config,
    trained_artifacts,
)
from defenses.neural_cleanse import NeuralCleanseParams, TriggerSearch
from harness.replica.interpreter import build_replica
from harness.runtime.adapter import RuntimeAdapter
from harness.runtime.oracle import PixelReplica

LABEL = 1


def time_steps(module: PixelReplica, images: np.ndarray, steps: int) -> float:
    """Seconds for ``steps`` Neural Cleanse steps of one label."""
    params = NeuralCleanseParams(n_samples=len(images), batch_size=len(images))
    search = TriggerSearch(
        module.forward_with_pre_quantizer,
        images,
        43,
        params,
        SEED,
        module.replica.output_quantizer,
    )
    start = time.perf_counter()
    for _ in range(steps):
        search.step(np.array([LABEL]))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="fp32,int8-dynamic,int8-static,int4")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    config = grid_config()
    folder = CACHE / f"gtsrb_badnet_seed{SEED}"
    paths = trained_artifacts(config, folder)
    images = defense_data(config, folder / "defense_clean.npz").clean_x[:16]
    print(f"cpu: {cpu_description()}  torch {torch.__version__}", flush=True)
    mismatch = False
    for precision in args.precisions.split(","):
        adapter = RuntimeAdapter.from_path(paths[precision], kernel_profile=config.int8_kernels)
        modules = {
            rewrites: PixelReplica(
                build_replica(adapter.model, rewrites=rewrites), adapter.preprocessing
            )
            for rewrites in (False, True)
        }
        with torch.no_grad():
            pixels = torch.from_numpy(images.astype(np.float32))
            same = torch.equal(modules[False](pixels), modules[True](pixels))
        mismatch |= not same
        best = {False: np.inf, True: np.inf}
        for _ in range(args.rounds):
            for rewrites, module in modules.items():
                best[rewrites] = min(best[rewrites], time_steps(module, images, args.steps))
        plain, fast = (best[k] / args.steps * 1000 for k in (False, True))
        print(
            f"{precision:13s} node-by-node {plain:6.2f} ms/step  rewritten {fast:6.2f} ms/step  "
            f"speed-up {plain / fast:4.2f}x  logits {'identical' if same else 'DIFFER'}",
            flush=True,
        )
    return 1 if mismatch else 0


if __name__ == "__main__":
    raise SystemExit(main())
