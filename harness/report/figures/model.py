"""What every report figure is made of: the plain data a figure is drawn from, the PNG it
becomes, and the shared look of panels that have no number to draw.

:mod:`harness.report.figures.panels` draws one defense's evidence on one panel and
:mod:`harness.report.figures.plots` composes panels into figures; both use the types, colours and
the
"unavailable" / "inconclusive" treatments defined here, so a missing value looks the same in
every figure and never like a zero.
"""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from harness.core.verdicts import record_verdict

DPI = 100
POISONED_COLOR = "#c0392b"
CLEAN_COLOR = "#2e86c1"
ACC_COLOR = "#1f77b4"
ASR_COLOR = "#d62728"
AGREE_COLOR = "#2ca02c"
MUTED = "#b0b0b0"
HATCH = "///"
STATE_WORDS = {
    "ok": "ok",
    "inconclusive": "inconclusive",
    "not_applicable": "not applicable",
    "error": "error",
    "not_run": "not run",
    "no_result": "defense not run",
    "missing": "evidence not stored",
    "damaged": "damaged evidence",
}
"""Panel states (see :class:`Evidence`) in the words a panel shows."""
DAMAGE = (KeyError, TypeError, ValueError, IndexError)
"""What drawing a stored value that is not what its panel expects raises (a field missing or of
the wrong type, lists of different lengths, non-finite data a histogram cannot bin)."""


@dataclass(frozen=True)
class PanelNote:
    """What one panel of a figure shows: its label, its state and the reason, in words."""

    label: str
    state: str
    note: str = ""


@dataclass(frozen=True)
class Plot:
    """One rendered figure: ``plots/<name>.png`` in report.md, an embedded image in report.html."""

    name: str
    title: str
    caption: str
    png: bytes
    defense: str | None = None
    group: str | None = None
    panels: tuple[PanelNote, ...] = ()

    @property
    def alt(self) -> str:
        """Alternative text: the title and every panel that shows no decided evidence."""
        odd = [
            f"{p.label}: {STATE_WORDS.get(p.state, p.state)}"
            for p in self.panels
            if p.state != "ok"
        ]
        return self.title + (f" ({'; '.join(odd)})" if odd else "")


@dataclass(frozen=True)
class GroupSummary:
    """The summary rows of one (dataset, model, attack) group, in the report's precision order.

    ``n_seeds`` is how many seeds the group ran (``None``: unknown); a row over fewer seeds (a
    cell that failed or is still running) is marked ``n=k`` so its mean is not read as the
    group's.
    """

    label: str
    slug: str
    precisions: list[str]
    rows: list[dict[str, Any]]
    defenses: list[str]
    n_seeds: int | None = None

    def row(self, precision: str, poisoned: bool) -> dict[str, Any] | None:
        return next(
            (r for r in self.rows if r["precision"] == precision and r["poisoned"] == poisoned),
            None,
        )


@dataclass(frozen=True)
class Evidence:
    """One (defense, cell) as a panel draws it.

    ``state``: ``ok`` or ``inconclusive`` (a completed run: its evidence is drawn),
    ``not_applicable`` / ``error`` (the run did not complete), ``not_run`` (no such cell in the
    store) or ``no_result`` (the cell exists but this defense did not run on it). ``arrays`` are
    the defense's own arrays from the cell's ``.npz`` (names without the ``<defense>.`` prefix);
    ``true_trigger`` is the attack's trigger as ``mask·pattern`` (H, W, C) in 0..255 on poisoned
    cells where it could be rebuilt, ``trigger_note`` says why not otherwise.
    """

    precision: str
    poisoned: bool
    seed: int | None
    state: str
    note: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    target: int | None = None
    true_trigger: np.ndarray | None = None
    trigger_note: str = ""

    @property
    def label(self) -> str:
        kind = "poisoned" if self.poisoned else "clean control"
        return f"{self.precision}, {kind}" + ("" if self.seed is None else f", seed {self.seed}")

    @property
    def drawable(self) -> bool:
        return self.state in ("ok", "inconclusive")


class Missing(Exception):  # noqa: N818 - an outcome of drawing, shown on the panel
    """A completed run lacks what its panel draws (old store, arrays not written)."""


# ----------------------------------------------------------------------------- rendering
def render(fig: Figure) -> bytes:
    """PNG bytes of ``fig``, without the matplotlib version stamp (stable across installs)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _wrap(text: str, width: int = 38, limit: int = 180) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return textwrap.fill(text, width)


def unavailable(
    ax: Axes, state: str, note: str, gid: str = "", width: int = 38, fontsize: float = 7
) -> None:
    """A hatched panel saying why nothing is drawn — never an empty (zero-looking) axis."""
    ax.add_patch(
        Rectangle(
            (0, 0),
            1,
            1,
            transform=ax.transAxes,
            fill=False,
            hatch=HATCH,
            edgecolor=MUTED,
            gid=gid or f"unavailable:{state}",
        )
    )
    words = STATE_WORDS.get(state, state)
    ax.text(
        0.5,
        0.5,
        words + (f"\n{_wrap(note, width)}" if note else ""),
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=fontsize,
        bbox={"facecolor": "white", "edgecolor": MUTED, "boxstyle": "round"},
    )
    ax.set_xticks([])
    ax.set_yticks([])


BANNER_COLOR = "#e0a000"


def inconclusive_banner(ax: Axes, reason: str, width: int = 55) -> None:
    """Mark a panel whose evidence is drawn but decides nothing: an amber frame, and the reason
    in a box under the axis (where it hides no data; ``tight_layout`` makes room for it)."""
    for spine in ax.spines.values():
        spine.set_edgecolor(BANNER_COLOR)
        spine.set_linewidth(2.0)
    ax.text(
        0.5,
        -0.3,
        "inconclusive: " + _wrap(reason, width, 140),
        transform=ax.transAxes,
        ha="center",
        va="top",
        fontsize=6.5,
        color="#7a4800",
        bbox={"facecolor": "#fff4d6", "edgecolor": BANNER_COLOR, "boxstyle": "round"},
        zorder=10,
    )


REPAIR_WORDS = {
    (True, True): "backdoor removed",
    (True, False): "backdoor not removed",
    (False, True): "accuracy kept",
    (False, False): "accuracy lost",
}


def verdict_words(result: dict[str, Any], poisoned: bool) -> str:
    """The verdict in a panel title (a repair's in its own words), with the flagged labels."""
    verdict = record_verdict(result) or str(result.get("status"))
    if result.get("group") == "repair" and verdict != "inconclusive":
        return REPAIR_WORDS[(poisoned, verdict == "detected")]
    flagged = result.get("flagged_labels")
    return str(verdict).replace("_", " ") + (f", flagged {flagged}" if flagged else "")
