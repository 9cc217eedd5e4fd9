"""Does a second CPU compute the same INT8 logits as this one? (the deployed arithmetic, per CPU)

Run this module on two machines over the same ONNX file and pixels: the first run writes a
reference JSON, the second compares with it. For each kernel profile (``exact``, ``host``) it
records a SHA-256 of the logits and the top-1 labels, together with the CPU's flags and its
measured kernel class (:func:`harness.runtime.kernels.probe_host`). The ``exact`` profile must match
bit for bit on any x86 CPU; ``host`` matches only where both CPUs are int32-exact.

Usage: ``python -m bench.runtime.cross_cpu MODEL.onnx PIXELS.npy --json out.json [--reference ref.json]``
(PIXELS: uint8 NHWC images; the model's own preprocessing metadata is applied).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

from harness.runtime.adapter import RuntimeAdapter
from harness.runtime.kernels import cpu_isa_flags, probe_host

PROFILES = ("exact", "host")


def fingerprint(model: Path, pixels: np.ndarray) -> dict:
    """Per-profile logits hash and labels, with what this CPU is."""
    out: dict = {"probe": probe_host().as_dict(), "isa": cpu_isa_flags()}
    for profile in PROFILES:
        adapter = RuntimeAdapter.from_path(model, kernel_profile=profile, threads=1)
        logits = np.ascontiguousarray(adapter.logits(pixels))
        out[profile] = {
            "sha256": hashlib.sha256(logits.tobytes()).hexdigest(),
            "pred": logits.argmax(axis=1).tolist(),
        }
    return out


def compare(here: dict, reference: dict) -> list[str]:
    """One line per profile: identical logits to the reference's ``exact``, and label agreement."""
    ref = reference["exact"]
    lines = []
    for profile in PROFILES:
        same = here[profile]["sha256"] == ref["sha256"]
        pairs = zip(here[profile]["pred"], ref["pred"], strict=True)
        agree = float(np.mean([a == b for a, b in pairs]))
        lines.append(
            f"{profile}: bit-identical to reference exact: {same}; top-1 agreement {agree:.4f}"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("pixels", type=Path)
    parser.add_argument("--json", type=Path, required=True, help="where to write this CPU's record")
    parser.add_argument("--reference", type=Path, help="another CPU's record to compare with")
    args = parser.parse_args(argv)
    here = fingerprint(args.model, np.load(args.pixels))
    args.json.write_text(json.dumps(here))
    print(f"kernel class {here['probe']['kernel_class']}; flags {here['isa']}")
    if args.reference is not None:
        print("\n".join(compare(here, json.loads(args.reference.read_text()))))


if __name__ == "__main__":
    main()
