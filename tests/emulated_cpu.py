"""Run under ``qemu-x86_64 -cpu Haswell-v4``: an AVX2-only x86 CPU whose INT8 kernels saturate.

Invoked as a subprocess by tests/runtime/test_kernels.py (``python tests/emulated_cpu.py MODE ...``); it
prints one JSON document on stdout. Kept as a script, not a test module, so the emulated process
imports only what the check needs.
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np


def probe() -> dict:
    from harness.runtime.kernels import probe_host

    return probe_host().as_dict()


def logits(model: str, pixels: str) -> dict:
    """Logits under both profiles, and the replica's parity verdict under each."""
    from harness.runtime.adapter import RuntimeAdapter

    images = np.load(pixels)
    out = {}
    for profile in ("exact", "host"):
        adapter = RuntimeAdapter.from_path(model, kernel_profile=profile)
        values = adapter.logits(images)
        report = adapter.gradient_oracle().parity(images)
        out[profile] = {
            "sha256": hashlib.sha256(values.tobytes()).hexdigest(),
            "predictions": values.argmax(axis=1).tolist(),
            "parity_passed": report.passed,
            "likely_cause": report.likely_cause,
        }
    return out


def train_digest() -> dict:
    """Weights of one short seeded training run (portable float kernels are pinned on import)."""
    from harness.artifacts.preprocessing import Preprocessing
    from harness.data.base import load_dataset
    from harness.training.loop import TrainConfig, train_model

    data = load_dataset("digits")
    preprocessing = Preprocessing.from_images(data.x_train)
    config = TrainConfig(model="small_cnn", epochs=1, batch_size=64, seed=0, num_threads=1)
    model = train_model(
        data.x_train[:512], data.y_train[:512], 10, preprocessing, config, progress=False
    )
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().numpy().tobytes())
    return {"sha256": digest.hexdigest()}


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    result = {"probe": probe, "logits": logits, "train": train_digest}[mode](*rest)
    print(json.dumps(result))
