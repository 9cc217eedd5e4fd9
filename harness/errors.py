"""User-facing errors.

Anything a user can cause (a wrong path, a corrupt file, an unknown plugin name, a bad
parameter) raises :class:`BlindspotsError` with one line that names the problem. The CLI prints
that line and exits non-zero instead of showing a traceback, so a typo never looks like a bug.
"""

from __future__ import annotations


class BlindspotsError(Exception):
    """An error caused by input the user controls; its message is shown as-is, on one line."""


class DataError(BlindspotsError):
    """Missing, corrupt or mis-laid-out data."""


class ModelError(BlindspotsError):
    """A model file that cannot be loaded, exported, quantized or queried as asked."""
