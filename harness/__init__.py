"""quant-blindspots harness: data, attacks, training, the runtime adapter, runner and reports.

Importing this package is cheap: plug-ins register lazily and torch / onnxruntime load only
when a stage that needs them runs.
"""

__version__ = "0.1.0"
