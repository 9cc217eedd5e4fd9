"""Portable float kernels: the same torch arithmetic on every x86-64 CPU with AVX2.

INT8 kernels are pinned by :mod:`harness.kernels`; float kernels need the same care. torch picks
its vectorised CPU kernels (ATen), its oneDNN convolutions and MKL's GEMM code path from the
CPU it runs on, and AVX-512 kernels round differently from AVX2 ones. Measured here: one epoch of
the digits ``small_cnn`` gives different weights on an AVX-512 host and on an AVX2-only CPU
(emulated with ``qemu-x86_64 -cpu Haswell``), and bit-identical weights once ATen and oneDNN are
capped at AVX2. A few ulps at training time become a different trained model, so Neural
Cleanse's reversed-trigger norms and every table downstream would depend on the auditor's CPU.

:func:`pin_portable_float_kernels` therefore caps them at AVX2 through the environment variables
the libraries read on first use. It runs when :mod:`harness` is imported, before torch executes
an operation (the settings are read lazily, so importing torch earlier is fine). A variable the
user already set wins, and ``BLINDSPOTS_FLOAT_KERNELS=host`` turns the cap off for speed; what was
in force is recorded with every run (:func:`float_kernel_record`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

#: Library switches and the value that makes each use its AVX2 code path.
PORTABLE_FLOAT_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's vectorised CPU kernels
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN (mkldnn) convolutions and matmuls
    "MKL_CBWR": "AVX2",  # MKL's conditional numerical reproducibility branch
}
OPT_OUT_VARIABLE = "BLINDSPOTS_FLOAT_KERNELS"


def pin_portable_float_kernels() -> None:
    """Cap torch's float kernels at AVX2 unless the user opted out or chose values already."""
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
