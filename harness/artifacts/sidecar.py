"""Quantization sidecars: the ``<artifact>.json`` record next to every quantized model.

Core, not exporters: the runtime adapter reads an artifact's precision from its sidecar, and
only when the sidecar provably describes *this* file (sha256), so the reading half lives below
both the exporters that write sidecars and the adapter that trusts them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from harness.core.errors import ModelError


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar_path(onnx_path: str | Path) -> Path:
    """``<artifact>.json`` next to the artifact (``model.onnx`` → ``model.onnx.json``)."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".json")


def read_sidecar(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The sidecar of an artifact (pass the ``.onnx`` or the ``.json`` path).

    With ``verify`` the artifact's current sha256 must match the recorded one, so a model
    edited after quantization is never reported under its old recipe.
    """
    path = Path(path)
    side = path if path.suffix == ".json" else sidecar_path(path)
    try:
        record = json.loads(side.read_text())
    except FileNotFoundError as exc:
        raise ModelError(f"no quantization sidecar at {side}") from exc
    except (OSError, ValueError) as exc:
        raise ModelError(f"unreadable quantization sidecar {side}: {exc}") from exc
    if not isinstance(record, dict) or not isinstance(record.get("artifact"), dict):
        raise ModelError(f"{side} is not a quantization sidecar (no 'artifact' entry)")
    if verify:
        artifact = side.with_name(side.name.removesuffix(".json"))
        if not artifact.is_file():
            raise ModelError(f"sidecar {side} describes a missing model {artifact}")
        if sha256_file(artifact) != record["artifact"].get("sha256"):
            raise ModelError(f"model {artifact} changed after quantization (sha256 mismatch)")
    return record


def sidecar_precision(path: str | Path) -> str | None:
    """The precision the sidecar of the model at ``path`` records, only if it describes *this*
    file (sha256 match); else None.

    A sidecar copied next to another model, or left behind when the model was replaced, must not
    relabel it (an int8-dynamic graph reported as fp32); callers then infer the precision from
    the graph itself.
    """
    try:
        record = read_sidecar(path, verify=True)
    except (ModelError, OSError):
        return None
    precision = record.get("precision")
    return precision if isinstance(precision, str) else None
