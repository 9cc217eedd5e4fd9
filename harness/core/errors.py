"""User-facing errors.

Anything a user can cause (a wrong path, a corrupt file, an unknown plugin name, a bad
parameter) raises :class:`BlindspotsError` with one line that names the problem. The CLI prints
that line and exits non-zero instead of showing a traceback, so a typo never looks like a bug.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class BlindspotsError(Exception):
    """An error caused by input the user controls; its message is shown as-is, on one line."""


class DataError(BlindspotsError):
    """Missing, corrupt or mis-laid-out data."""


class ModelError(BlindspotsError):
    """A model file that cannot be loaded, exported, quantized or queried as asked."""


def validation_message(exc: Any, what: str, known: Iterable[str] = ()) -> str:
    """Condense a pydantic ``ValidationError`` to one line naming the first offending field.

    ``what`` names the kind of field ("badnet parameter", "training option"); ``known`` lists
    the valid field names so a typo gets a did-you-mean suggestion.
    """
    err = exc.errors()[0]
    field = ".".join(str(part) for part in err["loc"]) or what
    if err["type"] == "extra_forbidden":
        known = list(known)
        close = difflib.get_close_matches(field.split(".")[-1], known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown {what} '{field}'{hint}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"invalid {what} '{field}': {msg} (got {err.get('input')!r})"


def one_line(exc: BaseException, *, first_line: bool = False, limit: int | None = None) -> str:
    """A library exception's message as one line, to embed in a :class:`BlindspotsError`.

    By default every line is kept and whitespace squeezed (PIL, numpy and pickle messages are
    short); ``first_line`` keeps only the first line (onnx and onnxruntime append stack dumps
    and graph listings after it); ``limit`` cuts text from hostile files (tensor names can be
    megabytes). An empty message falls back to the exception's type name.
    """
    text = str(exc).strip()
    if first_line and text:
        text = text.splitlines()[0]
    text = " ".join(text.split()) or type(exc).__name__
    return text if limit is None or len(text) <= limit else text[:limit] + "..."
