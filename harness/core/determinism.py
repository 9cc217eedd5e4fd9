"""Portable float kernels: the same torch arithmetic on every x86-64 CPU with AVX2, any vendor.

INT8 kernels are pinned by :mod:`harness.runtime.kernels`; float kernels need the same care. torch
picks
its vectorised CPU kernels (ATen), its oneDNN convolutions and MKL's GEMM code path from the
CPU it runs on. Two things vary:

- **vector width**: AVX-512 kernels round differently from AVX2 ones. One epoch of the digits
  ``small_cnn`` gave different weights on an AVX-512 Intel host and on an AVX2-only CPU
  (``qemu-x86_64 -cpu Haswell``) until ATen and oneDNN were capped at AVX2;
- **vendor**: MKL chooses its GEMM code path by CPU vendor, and its AVX2 reproducibility branch
  (``MKL_CBWR=AVX2``) is an Intel-only promise. With it, the same one-epoch run gave digest
  ``b1213ee0…`` on an emulated Intel Haswell and ``d090a8aa…`` natively on an AMD EPYC and under
  ``qemu-x86_64 -cpu EPYC-Rome``. ``MKL_CBWR=COMPATIBLE`` is the branch MKL documents as giving
  the same results on Intel and compatible (non-Intel) processors; with it all three give
  ``a496fc8a…`` (``tests/runtime/test_kernels.py`` checks both emulated vendors against the host; what
  it costs is in BENCHMARKS, ``python -m bench.runtime.bench_float_kernels``).

A few ulps at training time become a different trained model, so Neural Cleanse's
reversed-trigger norms and every table downstream would depend on the auditor's CPU.
:func:`pin_portable_float_kernels` therefore pins all three through the environment variables
the libraries read on first use. It runs when :mod:`harness` is imported, before torch executes
an operation (the settings are read lazily, so importing torch earlier is fine). A variable the
user already set wins, and ``BLINDSPOTS_FLOAT_KERNELS=host`` turns the pins off for speed; what
was in force is recorded with every run (:func:`float_kernel_record`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

#: Library switches and the value that makes each take a code path every x86-64 CPU with AVX2
#: runs alike, whatever its vendor.
PORTABLE_FLOAT_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's vectorised CPU kernels
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN (mkldnn) convolutions and matmuls
    "MKL_CBWR": "COMPATIBLE",  # MKL's vendor-independent reproducibility branch (GEMM)
}
OPT_OUT_VARIABLE = "BLINDSPOTS_FLOAT_KERNELS"


def pin_portable_float_kernels() -> None:
    """Pin torch's float kernels to their portable paths unless the user opted out or chose."""
    if os.environ.get(OPT_OUT_VARIABLE, "portable") == "host":
        return
    for key, value in PORTABLE_FLOAT_ENV.items():
        os.environ.setdefault(key, value)


def float_kernel_record() -> dict[str, Any]:
    """The float-kernel settings in force, for a run's provenance."""
    record: dict[str, Any] = {
        "mode": os.environ.get(OPT_OUT_VARIABLE, "portable"),
        "environment": {key: os.environ.get(key) for key in PORTABLE_FLOAT_ENV},
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        record["aten_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return record
