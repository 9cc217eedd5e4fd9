"""Which evidence figures each defense has, registered beside the code that draws them.

A defense's figure is declared where its drawer is written, with a decorator:

* :func:`panel_figure` — a drawer of one cell (``draw(ax, evidence)``); the report lays it out as
  a grid, poisoned model and clean control (rows) × precisions (columns);
* :func:`group_figure` — a drawer of a whole group (``draw(group, evidence) -> (figure,
  notes)``), for evidence that is not one panel per cell (Neural Cleanse's reversed triggers).

So adding a defense's figure edits no central table, and a defense from another package (an
entry point in ``blindspots.defenses``) can register its figures in its own module: asking the
catalog about a defense it has no figures for imports that defense's module once, through the
defense registry. A defense without figures has its verdicts in the tables only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from harness.core.errors import BlindspotsError
from harness.report.figures.model import Evidence, GroupSummary, PanelNote

Drawer = Callable[[Axes, Evidence], None]
GroupDrawer = Callable[[GroupSummary, Sequence[Evidence]], tuple[Figure, list[PanelNote]]]


@dataclass(frozen=True)
class DefenseFigure:
    """One per-defense figure: its drawer, file-name suffix, title and what to look at."""

    suffix: str
    title: str
    caption: str
    draw: Drawer | None = None
    """Per-cell drawer, laid out as a grid; exactly one of ``draw`` / ``draw_group`` is set."""
    draw_group: GroupDrawer | None = None


class FigureCatalog(dict[str, list[DefenseFigure]]):
    """``defense name → figures`` that loads a plug-in defense's module before answering.

    Built-in drawers register when :mod:`harness.report.figures.plots` is imported; a plug-in's
    register when its defense module is imported, which a report (that only reads a store) would
    otherwise never do.
    """

    def __init__(self) -> None:
        super().__init__()
        self._asked: set[str] = set()

    def _load_plugin(self, defense: str) -> None:
        if defense in self._asked or dict.__contains__(self, defense):
            return
        self._asked.add(defense)
        from defenses.base import DEFENSES  # the registry knows where a plug-in lives

        origin = DEFENSES.origin(defense)
        if origin is not None and not origin.startswith("defenses."):
            # a plug-in that no longer loads has its verdicts in the tables only
            with contextlib.suppress(BlindspotsError):
                DEFENSES.get(defense)

    def __contains__(self, defense: object) -> bool:
        if isinstance(defense, str):
            self._load_plugin(defense)
        return dict.__contains__(self, defense)

    def get(self, defense: str, default: Any = None) -> Any:
        self._load_plugin(defense)
        return dict.get(self, defense, default)


DEFENSE_FIGURES = FigureCatalog()
"""Per-defense evidence figures in registration order (see the module doc)."""


def _add(defense: str, figure: DefenseFigure) -> None:
    if any(f.suffix == figure.suffix for f in dict.get(DEFENSE_FIGURES, defense, [])):
        raise ValueError(f"{defense} already has a figure with suffix '{figure.suffix}'")
    DEFENSE_FIGURES.setdefault(defense, []).append(figure)


def panel_figure(
    defense: str, *, title: str, caption: str, suffix: str = ""
) -> Callable[[Drawer], Drawer]:
    """Decorator: register a per-cell drawer as one of ``defense``'s evidence figures."""

    def register(draw: Drawer) -> Drawer:
        _add(defense, DefenseFigure(suffix, title, caption, draw=draw))
        return draw

    return register


def group_figure(
    defense: str, *, title: str, caption: str, suffix: str
) -> Callable[[GroupDrawer], GroupDrawer]:
    """Decorator: register a whole-group drawer as one of ``defense``'s evidence figures."""

    def register(draw: GroupDrawer) -> GroupDrawer:
        _add(defense, DefenseFigure(suffix, title, caption, draw_group=draw))
        return draw

    return register
