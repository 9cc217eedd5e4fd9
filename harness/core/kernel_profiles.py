"""The INT8 kernel profile names (what ``--int8-kernels`` accepts), without onnxruntime.

:mod:`harness.runtime.kernels` gives them meaning; the command line only needs the words.
"""

from __future__ import annotations

from typing import Literal, get_args

KernelProfile = Literal["exact", "host"]
PROFILES: tuple[KernelProfile, ...] = get_args(KernelProfile)
DEFAULT_PROFILE: KernelProfile = "exact"
