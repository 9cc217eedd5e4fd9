"""The CPU a benchmark ran on, recorded beside every number it prints.

Timings and INT8 results depend on the CPU's vendor (MKL's code paths), model and instruction
sets (onnxruntime's INT8 kernels), so each bench writes the same description: one reader of
``/proc/cpuinfo`` for all of them, with the flags the harness itself records per run
(:data:`harness.runtime.kernels.ISA_FLAGS`).
"""

from __future__ import annotations

import os
import platform
from typing import Any

from harness.runtime.kernels import cpu_isa_flags


def _first_processor(cpuinfo: str) -> dict[str, str]:
    """The ``key: value`` fields of the first processor in ``cpuinfo`` (empty off Linux)."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> dict[str, Any]:
    """Vendor, model name, logical CPUs and the INT8-relevant instruction sets (None: unknown)."""
    fields = _first_processor(cpuinfo)
    model = fields.get("model name") or platform.processor() or platform.machine()
    return {
        "vendor": fields.get("vendor_id") or None,
        "model_name": model or None,
        "cpus": os.cpu_count(),
        "isa": cpu_isa_flags(cpuinfo),
    }


def cpu_label(description: dict[str, Any] | None = None) -> str:
    """``"<vendor> <model name>"`` in one string, ``"unknown"`` when neither is known."""
    described = description if description is not None else cpu_description()
    parts = (described.get("vendor"), described.get("model_name"))
    return " ".join(part for part in parts if part) or "unknown"
