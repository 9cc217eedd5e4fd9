"""quant-blindspots harness: data, attacks, training, the runtime adapter, runner and reports.

Importing this package is cheap: plug-ins register lazily and torch / onnxruntime load only
when a stage that needs them runs. It does one thing on import: pin torch's float kernels to
their portable AVX2 code paths (see :mod:`harness.determinism`), which must happen before torch
runs its first operation.
"""

from harness.determinism import pin_portable_float_kernels

__version__ = "0.1.0"

pin_portable_float_kernels()
