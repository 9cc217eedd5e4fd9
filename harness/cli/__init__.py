"""Floor 8 — the ``blindspots`` command line: one module per command group.

The console script is ``harness.cli:main``; every command imports its floor lazily, so
``blindspots --help`` and ``blindspots list`` start without torch or onnxruntime.
"""

from harness.cli.app import main

__all__ = ["main"]
