"""Neural Cleanse's replica step, eager against ``torch.compile``, side by side in one process.

Issue 20 item 3: does compiling the gradient replica pay on CPU? For each precision of the GTSRB
grid model (``bench.defenses.bench_nc``'s cache) and each batch size, the replica's forward
(``PixelReplica.forward_with_pre_quantizer``, fused fake-quant autograd Functions included) is
compiled with the chosen backend (``dynamic=False``: one graph per batch shape), and

- the compiled forward must pass the onnxruntime parity check exactly as Neural Cleanse runs it
  (:meth:`GradientOracle.parity` on the defense's parity images, clean and randomly stamped);
- on ``--checks`` seeded Neural-Cleanse-style batches (random mask and pattern stamped on the
  images, the loss Neural Cleanse minimises), logits, pre-quantizer logits and the mask and
  pattern gradients are compared with the eager replica bit for bit; where they differ, the
  count of differing logits (on quantized outputs: output codes that flipped) is reported;
- the same Neural Cleanse label steps (one Adam update on ``batch`` images per step, one torch
  thread) run eager and compiled in alternating rounds; best and median ms per step of each,
  the compile time (first call, parity shapes included) reported apart. Both run with Neural
  Cleanse's retained heap; a third column, eager with glibc's initial heap thresholds (128 KiB,
  fixed; before :func:`harness.core.threads.retained_heap` the scan ran with glibc's dynamic
  ones, which start there), measures that change in the same rounds.

Usage: ``python -m bench.runtime.bench_compile [--precisions fp32,int8-static] [--batches 16,32]
[--steps 30] [--rounds 5] [--backend inductor] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

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
from harness.core.threads import _glibc, retain_heap, retained_heap
from harness.runtime.adapter import RuntimeAdapter
from harness.runtime.oracle import GradientOracle

LABEL = 1


class _Compiled:
    """The oracle's module with both entry points compiled (what a compiled oracle would hold)."""

    def __init__(self, module: Any, backend: str) -> None:
        self.replica = module.replica
        self.forward = torch.compile(module.forward, backend=backend, dynamic=False)
        self.forward_with_pre_quantizer = torch.compile(
            module.forward_with_pre_quantizer, backend=backend, dynamic=False
        )

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward(pixels)


@contextmanager
def default_heap() -> Iterator[None]:
    """glibc's default thresholds for the block (128 KiB, fixed), the retained heap after it."""
    calls = _glibc()
    if calls is not None:
        mallopt, malloc_trim = calls
        mallopt(-3, 128 * 1024)
        mallopt(-1, 128 * 1024)
        malloc_trim(0)
    try:
        yield
    finally:
        retain_heap()


def time_steps(forward: Any, quantizer: Any, images: np.ndarray, steps: int) -> float:
    """Seconds per Neural Cleanse step of one label (one update on all of ``images``)."""
    params = NeuralCleanseParams(n_samples=len(images), batch_size=len(images))
    search = TriggerSearch(forward, images, 43, params, SEED, quantizer)
    start = time.perf_counter()
    for _ in range(steps):
        search.step(np.array([LABEL]))
    return (time.perf_counter() - start) / steps


def step_values(forward: Any, images: np.ndarray, seed: int) -> list[torch.Tensor]:
    """Logits, pre-quantizer logits and mask / pattern gradients of one NC-style batch."""
    g = torch.Generator().manual_seed(seed)
    _, h, w, c = images.shape
    mask = torch.rand(h, w, generator=g).requires_grad_(True)
    pattern = (torch.rand(h, w, c, generator=g) * 255).requires_grad_(True)
    x = torch.from_numpy(images.astype(np.float32))
    logits, pre = forward((1 - mask[..., None]) * x + mask[..., None] * pattern)
    for_loss = logits if pre is None else pre + (logits - pre).detach()
    target = torch.full((len(x),), LABEL, dtype=torch.long)
    loss = torch.nn.functional.cross_entropy(for_loss, target, reduction="sum")
    (loss + mask.sum()).backward()
    pre = torch.zeros(0) if pre is None else pre
    assert mask.grad is not None and pattern.grad is not None
    return [logits.detach(), pre.detach(), mask.grad, pattern.grad]


def compare(eager: Any, compiled: Any, images: np.ndarray, checks: int) -> dict[str, Any]:
    """Bit-identity of compiled against eager on ``checks`` seeded batches."""
    names = ("logits", "pre_quantizer", "mask_grad", "pattern_grad")
    differing = dict.fromkeys(names, 0)
    worst = dict.fromkeys(names, 0.0)
    total = dict.fromkeys(names, 0)
    argmax_changes = 0
    for seed in range(checks):
        a = step_values(eager, images, seed)
        b = step_values(compiled, images, seed)
        for name, x, y in zip(names, a, b, strict=True):
            differing[name] += int((x != y).sum())
            total[name] += x.numel()
            if x.numel():
                worst[name] = max(worst[name], float((x - y).abs().max()))
        argmax_changes += int((a[0].argmax(1) != b[0].argmax(1)).sum())
    return {
        "identical": all(v == 0 for v in differing.values()),
        "differing_elements": differing,
        "elements": total,
        "max_abs_diff": worst,
        "top1_changes": argmax_changes,
    }


def bench_precision(
    precision: str, path: Path, images: np.ndarray, parity_images: np.ndarray, args: Any
) -> list[dict[str, Any]]:
    adapter = RuntimeAdapter.from_path(path, kernel_profile=grid_config().int8_kernels)
    oracle = GradientOracle(adapter)
    eager = oracle.module
    compiled = _Compiled(eager, args.backend)
    rows = []
    first = True
    for batch in (int(b) for b in args.batches.split(",")):
        batch_images = images[:batch]
        start = time.perf_counter()
        compare(
            compiled.forward_with_pre_quantizer,
            compiled.forward_with_pre_quantizer,
            batch_images,
            1,
        )
        compile_s = time.perf_counter() - start
        parity: dict[str, Any] = {}
        if first:  # the parity gate, through the compiled module (its own batch shape)
            start = time.perf_counter()
            gated = object.__new__(GradientOracle)  # copy.copy would drop the session
            gated.__dict__.update(oracle.__dict__, module=compiled)
            report = gated.parity(parity_images)
            parity = {
                "passed": report.passed,
                "max_abs_logit_diff": report.max_abs_logit_diff,
                "agreement": report.agreement,
                "eager_passed": oracle.parity(parity_images).passed,
                "seconds": time.perf_counter() - start,
            }
            first = False
        identity = compare(
            eager.forward_with_pre_quantizer,
            compiled.forward_with_pre_quantizer,
            batch_images,
            args.checks,
        )
        times: dict[str, list[float]] = {"eager": [], "compiled": [], "eager_system_heap": []}
        quantizer = eager.replica.output_quantizer
        for _ in range(args.rounds):
            for name, fwd in (
                ("eager", eager.forward_with_pre_quantizer),
                ("compiled", compiled.forward_with_pre_quantizer),
                ("eager_system_heap", eager.forward_with_pre_quantizer),
            ):
                heap = default_heap() if name == "eager_system_heap" else nullcontext()
                with heap:
                    times[name].append(time_steps(fwd, quantizer, batch_images, args.steps))
        row: dict[str, Any] = {
            "precision": precision,
            "batch": batch,
            "compile_s": compile_s,
            "parity": parity,
            "identity": identity,
            "eager_ms": {
                "best": min(times["eager"]) * 1e3,
                "median": statistics.median(times["eager"]) * 1e3,
            },
            "compiled_ms": {
                "best": min(times["compiled"]) * 1e3,
                "median": statistics.median(times["compiled"]) * 1e3,
            },
            "eager_system_heap_ms": {
                "best": min(times["eager_system_heap"]) * 1e3,
                "median": statistics.median(times["eager_system_heap"]) * 1e3,
            },
            "rounds_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
            "load_after": os.getloadavg()[0],
        }
        rows.append(row)
        print(
            f"{precision:13s} batch {batch:3d}  eager best {row['eager_ms']['best']:6.2f} "
            f"median {row['eager_ms']['median']:6.2f}  compiled best "
            f"{row['compiled_ms']['best']:6.2f} median {row['compiled_ms']['median']:6.2f} ms/step"
            f"  eager/compiled (best) {row['eager_ms']['best'] / row['compiled_ms']['best']:4.2f}x"
            f"  system heap best {row['eager_system_heap_ms']['best']:6.2f} median "
            f"{row['eager_system_heap_ms']['median']:6.2f}"
            f"  compile {compile_s:5.1f}s  identical {identity['identical']} "
            f"{identity['differing_elements']}  parity {parity.get('passed', '-')}  "
            f"load {row['load_after']:.1f}",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="fp32,int8-dynamic,int8-static,int4")
    parser.add_argument("--batches", default="16,32")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--checks", type=int, default=8, help="seeded batches compared")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    config = grid_config()
    folder = CACHE / f"gtsrb_badnet_seed{SEED}"
    paths = trained_artifacts(config, folder)
    clean = defense_data(config, folder / "defense_clean.npz").clean_x
    images, parity_images = clean[:64], clean[:256]
    cpu = cpu_description()
    print(
        f"cpu: {cpu}  torch {torch.__version__}  backend {args.backend}  "
        f"load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    with retained_heap():
        for precision in args.precisions.split(","):
            rows += bench_precision(precision, paths[precision], images, parity_images, args)
    if args.json:
        args.json.write_text(
            json.dumps({"cpu": cpu, "backend": args.backend, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
