"""A stored defense result's verdict, read one way by every part of the report.

The tables (:mod:`harness.report.tables`) and the figures (:mod:`harness.report.figures.plots`) both
need the three-valued verdict of a stored result, including records written before verdicts existed.
Reading it in one place keeps a panel title and a table cell from ever disagreeing; it lives in its
own module (importing nothing of the harness) so both can use it without an upward import.
"""

from __future__ import annotations

from typing import Any


def record_verdict(res: dict[str, Any]) -> str | None:
    """A stored result's three-valued verdict; ``None`` unless it completed (status ``ok``).

    Records written before verdicts existed carry only ``detected``: ``True``/``False`` map to
    detected / not detected, ``None`` to inconclusive.
    """
    if res.get("status") != "ok":
        return None
    if res.get("verdict"):
        return str(res["verdict"])
    detected = res.get("detected")
    return "inconclusive" if detected is None else ("detected" if detected else "not_detected")
