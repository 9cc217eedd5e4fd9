"""quant-blindspots harness, in floors: each subpackage imports only the floors below it.

    core ← artifacts ← replica, data, attacks ← runtime, training ← defenses, exporters
         ← pipeline ← report ← audit, qcb ← cli

(``defenses`` and ``exporters`` are top-level packages on floor 4; ``.importlinter`` holds the
contract that ``make test`` checks.) Importing this package is cheap: plug-ins register lazily
and torch / onnxruntime load only when a stage that needs them runs. It does one thing on
import: pin torch's float kernels to their portable code paths (see
:mod:`harness.core.determinism`), which must happen before torch runs its first operation.
"""

from harness.core.determinism import pin_portable_float_kernels

__version__ = "0.1.0"

pin_portable_float_kernels()
