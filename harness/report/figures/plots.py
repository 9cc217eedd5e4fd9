"""The report's figures: what a reader needs to believe each table entry, drawn with matplotlib.

Pure drawing: every function takes plain data that :mod:`harness.report.data` read from the result
store (summary rows, stored defense results, per-cell arrays) and returns a :class:`Plot` — PNG
bytes plus a caption and a list of what each panel shows. Nothing here reads or writes files, so the
report writes every PNG atomically and embeds the same bytes in ``report.html``. Figures are drawn
on :class:`matplotlib.figure.Figure` objects directly (no ``pyplot`` state), so building a report
never depends on, or changes, a global backend.

Which figures, and why this scheme (a 40-cell grid would otherwise need 200 panels):

* ``accuracy_asr.png`` — per (dataset, model, attack) one panel: clean accuracy, attack success
  and FP32 agreement per precision, poisoned models and clean controls, mean over seeds
  (whiskers: ± the sample standard deviation, none for a single seed; ``n=k`` over a bar whose
  seed count differs from its group's).
* ``detection_rates.png`` — per (dataset, model, attack) × defense one panel: detection rate
  (repair: backdoor removed) on poisoned models and false-alarm rate on clean controls per
  precision, over *decided* seeds, with Wilson 95% whiskers.
* per defense and (dataset, model, attack) one figure, ``<defense>-<dataset>-<model>-<attack>
  .png``: a panel per precision (columns) for the poisoned model and the clean control (rows),
  all for **one seed** — the seed with the most finished cells in that dataset/model/attack (the
  smallest among ties; see :func:`harness.report.figures.evidence.evidence_seed`) — because
  the evidence behind a verdict (per-label anomaly indices, entropy histograms, pruning curves)
  cannot be averaged over seeds; the tables give the rates over every seed. Neural Cleanse
  (``neural_cleanse-…``: anomaly index per label and threshold) has a second figure,
  ``neural_cleanse-triggers-…``, with the reversed trigger of each flagged label beside the
  attack's true trigger (a row per cell); Spectral Signatures (``spectral_signatures-…``: the
  per-class robust z its verdict rests on, with the cut-off) a second one,
  ``spectral_signatures-scores-…``, with the per-sample score histograms and the removal cut.
  STRIP (entropy histograms and threshold), Activation Clustering (cluster size vs silhouette
  per class, with the flag region) and Fine-Pruning (accuracy/ASR against channels pruned) have
  one each. Other defenses (e.g. ``deployment_diff``) have their verdicts in the tables only.

A cell that has no number to draw never looks like a zero: a not-applicable, failed or missing
cell is a hatched panel (or a hatched full-height outline bar) with the reason written on it,
and an inconclusive cell keeps its evidence under an "inconclusive" banner with the reason. A
stored value that cannot be drawn (a field missing or of the wrong type, lists of mismatched
lengths) damages only its own panel: it is hatched as "damaged evidence" with the error in one
line, and a warning is logged — one bad record never costs the reader the whole report.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

import harness.report.figures.panels  # noqa: F401 - its drawers register themselves
from harness.core.errors import one_line
from harness.report.figures.catalog import DEFENSE_FIGURES, Drawer, group_figure
from harness.report.figures.model import (
    ACC_COLOR,
    AGREE_COLOR,
    ASR_COLOR,
    CLEAN_COLOR,
    DAMAGE,
    HATCH,
    MUTED,
    POISONED_COLOR,
    Evidence,
    GroupSummary,
    Missing,
    PanelNote,
    Plot,
    inconclusive_banner,
    render,
    unavailable,
    verdict_words,
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- overview
ACCURACY_SERIES = (
    ("clean acc", "clean_acc", True, ACC_COLOR, 1.0),
    ("ASR", "asr", True, ASR_COLOR, 1.0),
    ("agree FP32", "agreement_fp32", True, AGREE_COLOR, 1.0),
    ("clean acc (clean ctl)", "clean_acc", False, ACC_COLOR, 0.45),
    ("ASR (clean ctl)", "asr", False, ASR_COLOR, 0.45),
)


def accuracy_figure(groups: Sequence[GroupSummary]) -> tuple[Figure, list[PanelNote]]:
    """Clean accuracy, ASR and FP32 agreement per precision, one panel per group."""
    n_prec = max(len(g.precisions) for g in groups)
    fig = Figure(figsize=(max(6.0, 1.6 * n_prec + 2.5), 2.9 * len(groups)))
    axes = fig.subplots(len(groups), 1, squeeze=False)[:, 0]
    notes: list[PanelNote] = []
    width = 0.8 / len(ACCURACY_SERIES)
    for ax, group in zip(axes, groups, strict=True):
        for k, (label, key, poisoned, color, alpha) in enumerate(ACCURACY_SERIES):
            for i, precision in enumerate(group.precisions):
                x = i + (k - (len(ACCURACY_SERIES) - 1) / 2) * width
                row = group.row(precision, poisoned)
                gid = f"{group.slug}|{precision}|{key}|{'poisoned' if poisoned else 'clean'}"
                if row is None:
                    _outline_bar(ax, x, width, "not run", gid)
                    notes.append(PanelNote(f"{group.label} {precision} {label}", "not_run"))
                    continue
                mean = row.get(f"{key}_mean")
                std = _spread(row, key)
                ax.bar(
                    x,
                    mean,
                    width,
                    color=color,
                    alpha=alpha,
                    yerr=std,
                    error_kw={"elinewidth": 0.8, "capsize": 2},
                    label=label if i == 0 else None,
                    gid=gid,
                )
                n = row.get("n_seeds")
                if group.n_seeds is not None and n != group.n_seeds:
                    top = (mean if _finite(mean) else 0.0) + (std or 0.0)
                    ax.text(x, min(top, 1.0) + 0.01, f"n={n}", ha="center", va="bottom", fontsize=5)
        ax.set_xticks(range(len(group.precisions)), group.precisions, fontsize=8)
        ax.set_ylim(0, 1.08)
        ax.set_ylabel("rate", fontsize=8)
        ax.set_title(group.label, fontsize=9)
        ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig, notes


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _spread(row: dict[str, Any], key: str) -> float | None:
    """A summary row's sample standard deviation of ``key``; ``None`` where there is none (one
    seed, or a value that is not a finite number) — never a whisker of length zero."""
    std = row.get(f"{key}_std")
    if (row.get("n_seeds") or 0) < 2 or not _finite(std):
        return None
    return float(std)


def _outline_bar(ax: Axes, x: float, width: float, words: str, gid: str) -> None:
    """A hatched full-height outline where a rate cannot be given, with the reason on it."""
    ax.bar(x, 1.0, width, fill=False, hatch=HATCH, edgecolor=MUTED, linewidth=0.6, gid=gid)
    ax.text(
        x,
        0.5,
        words,
        rotation=90,
        ha="center",
        va="center",
        fontsize=6.5,
        color="0.2",
        bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
    )


def _no_rate_words(tally: dict[str, Any] | None) -> str:
    """Why a (defense, precision) has no rate: the most telling of its undecided outcomes."""
    if not tally:
        return "not run"
    if tally.get("inconclusive"):
        return "inconclusive"
    if tally.get("not_applicable"):
        return "n/a"
    if tally.get("errors"):
        return "error"
    return "not run"


DETECTION_COLUMNS = 3


def detection_figure(groups: Sequence[GroupSummary]) -> tuple[Figure, list[PanelNote]]:
    """Per group × defense a panel (three to a row; each group starts a row): the detection /
    false-alarm rate per precision over decided seeds, with Wilson whiskers.

    Each bar carries a ``gid`` ``"<slug>|<defense>|<precision>|poisoned|clean"`` so the drawing
    can be checked; a precision with no decided seed is a hatched outline with the reason.
    """
    n_cols = min(DETECTION_COLUMNS, max(1, max(len(g.defenses) for g in groups)))
    layout = [
        [(group, name) for name in group.defenses[start : start + n_cols]]
        for group in groups
        for start in range(0, max(1, len(group.defenses)), n_cols)
    ]
    n_prec = max(len(g.precisions) for g in groups)
    fig = Figure(figsize=(max(2.6, 0.8 * n_prec + 1.2) * n_cols, 2.6 * len(layout) + 0.5))
    axes = fig.subplots(len(layout), n_cols, squeeze=False)
    notes: list[PanelNote] = []
    for row_axes, panels in zip(axes, layout, strict=True):
        for ax in row_axes[len(panels) :]:
            ax.set_visible(False)
        for ax, (group, name) in zip(row_axes, panels, strict=False):
            notes += _detection_panel(ax, group, name)
        row_axes[0].set_ylabel("rate over decided seeds", fontsize=7)
    fig.legend(
        handles=[
            Patch(color=POISONED_COLOR, label="poisoned: detected (repair: removed)"),
            Patch(color=CLEAN_COLOR, label="clean control: false alarm (repair: acc kept)"),
            Patch(fill=False, hatch=HATCH, edgecolor=MUTED, label="no decided seed (reason)"),
        ],
        loc="lower center",
        ncol=3,
        fontsize=7,
    )
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1))
    return fig, notes


def _detection_panel(ax: Axes, group: GroupSummary, name: str) -> list[PanelNote]:
    """One defense on one group: a poisoned and a clean bar per precision."""
    notes = []
    width = 0.38
    for i, precision in enumerate(group.precisions):
        for poisoned, offset in ((True, -width / 2), (False, width / 2)):
            tally = (group.row(precision, poisoned) or {}).get("defenses", {}).get(name)
            kind = "poisoned" if poisoned else "clean"
            gid = f"{group.slug}|{name}|{precision}|{kind}"
            label = f"{group.label} {name} {precision} {kind}"
            if tally and tally.get("decided"):
                _rate_bar(ax, i + offset, width, tally, poisoned, gid)
                notes.append(PanelNote(label, "ok"))
                continue
            words = _no_rate_words(tally)
            _outline_bar(ax, i + offset, width, words, gid)
            state = {"n/a": "not_applicable", "not run": "not_run"}.get(words, words)
            notes.append(PanelNote(label, state))
    ax.set_xticks(range(len(group.precisions)), group.precisions, rotation=30, fontsize=7)
    ax.set_ylim(0, 1.15)
    ax.set_title(f"{name}\n{group.label}", fontsize=7.5)
    ax.tick_params(axis="y", labelsize=7)
    return notes


def _rate_bar(
    ax: Axes, x: float, width: float, tally: dict[str, Any], poisoned: bool, gid: str
) -> None:
    """One rate bar with its Wilson interval and 'k/n (+m inconclusive)' written above."""
    rate = tally["detected"] / tally["decided"]
    low, high = tally.get("detection_ci") or (rate, rate)
    ax.bar(
        x,
        rate,
        width,
        color=POISONED_COLOR if poisoned else CLEAN_COLOR,
        yerr=[[max(0.0, rate - low)], [max(0.0, high - rate)]],
        error_kw={"elinewidth": 0.8, "capsize": 2},
        gid=gid,
    )
    text = f"{tally['detected']}/{tally['decided']}"
    if tally.get("inconclusive"):
        text += f"\n+{tally['inconclusive']} inc."
    ax.text(x, min(high, 1.0) + 0.02, text, ha="center", va="bottom", fontsize=5.5)


def defense_plots(defense: str, group: GroupSummary, evidence: Sequence[Evidence]) -> list[Plot]:
    """The evidence figures of one defense on one group (grid: kind × precision, one seed)."""
    seeds = sorted({ev.seed for ev in evidence if ev.seed is not None})
    seed_text = (
        f" Seed {', '.join(map(str, seeds))} "
        "(one seed per figure; rates over every seed are in the tables)."
        if seeds
        else ""
    )
    plots = []
    for spec in DEFENSE_FIGURES.get(defense, []):
        if spec.draw is not None:
            fig, notes = _grid(spec.draw, group, evidence, spec.title)
        else:
            fig, notes = spec.draw_group(group, evidence)
        name = "-".join(part for part in (defense, spec.suffix, group.slug) if part)
        plots.append(_plot(name, spec.title, spec.caption + seed_text, fig, notes, defense, group))
    return plots


def _plot(
    name: str,
    title: str,
    caption: str,
    fig: Figure,
    notes: list[PanelNote],
    defense: str | None = None,
    group: GroupSummary | None = None,
) -> Plot:
    return Plot(
        name=name,
        title=title + (f" — {group.label}" if group else ""),
        caption=caption,
        png=render(fig),
        defense=defense,
        group=group.label if group else None,
        panels=tuple(notes),
    )


def _grid(
    draw: Drawer, group: GroupSummary, evidence: Sequence[Evidence], title: str
) -> tuple[Figure, list[PanelNote]]:
    """Rows: poisoned model, clean control (those present); columns: precisions."""
    kinds = [k for k in (True, False) if any(ev.poisoned == k for ev in evidence)] or [True]
    cells = {(ev.poisoned, ev.precision): ev for ev in evidence}
    fig = Figure(figsize=(3.3 * len(group.precisions), 2.8 * len(kinds) + 0.4))
    axes = fig.subplots(len(kinds), len(group.precisions), squeeze=False)
    notes = []
    for row, poisoned in zip(axes, kinds, strict=True):
        for ax, precision in zip(row, group.precisions, strict=True):
            ev = cells.get((poisoned, precision)) or Evidence(precision, poisoned, None, "not_run")
            notes.append(draw_panel(ax, ev, draw, f"{title} — {group.label}"))
    fig.suptitle(f"{title} — {group.label}", fontsize=9)
    fig.tight_layout()
    return fig, notes


def damaged(ax: Axes, ev: Evidence, exc: BaseException, figure: str = "", **text: Any) -> PanelNote:
    """Replace whatever a drawer left on ``ax`` with a hatched "damaged evidence" panel naming
    the error in one line, and log it once: one bad stored value costs one panel, not the
    report."""
    why = _damage_words(exc)
    ax.clear()
    unavailable(ax, "damaged", why, gid=f"unavailable:damaged:{ev.label}", **text)
    where = f"{figure}, {ev.label}" if figure else ev.label
    logger.warning(f"{where}: damaged evidence ({why}); its panel is drawn hatched")
    return PanelNote(ev.label, "damaged", why)


def _damage_words(exc: BaseException) -> str:
    """The error in one line; a missing key says so (a bare ``'acc'`` reads as nothing)."""
    text = one_line(exc)
    return f"no {text} stored" if isinstance(exc, KeyError) else text


def draw_panel(ax: Axes, ev: Evidence, draw: Drawer, figure: str = "") -> PanelNote:
    """One cell: its evidence (with a banner if inconclusive) or a hatched reason panel.

    ``figure`` names the figure in the warning logged when the cell's evidence is damaged.
    """
    kind = "poisoned" if ev.poisoned else "clean control"
    title = f"{ev.precision} · {kind}"
    note = PanelNote(ev.label, ev.state, ev.note)
    if ev.drawable:
        try:
            draw(ax, ev)
        except Missing as exc:
            ax.clear()
            unavailable(ax, "missing", str(exc), gid=f"unavailable:missing:{ev.label}")
            note = PanelNote(ev.label, "missing", str(exc))
        except DAMAGE as exc:
            note = damaged(ax, ev, exc, figure)
        else:
            title += f"\n{verdict_words(ev.result, ev.poisoned)}"
            if ev.state == "inconclusive":
                inconclusive_banner(ax, ev.note)
    else:
        unavailable(ax, ev.state, ev.note, gid=f"unavailable:{ev.state}:{ev.label}")
    ax.set_title(title, fontsize=7.5)
    ax.tick_params(labelsize=6)
    return note


def _trigger_image(image: np.ndarray) -> np.ndarray:
    """(H, W, C) in 0..255 → what ``imshow`` shows: grey (H, W) or RGB (H, W, 3) in 0..1."""
    image = np.clip(np.asarray(image, dtype=np.float64) / 255.0, 0.0, 1.0)
    return image[..., 0] if image.shape[-1] == 1 else image[..., :3]


def _show(ax: Axes, image: np.ndarray, title: str) -> None:
    shown = _trigger_image(image)
    ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1)
    ax.set_title(title, fontsize=6.5)
    ax.set_xticks([])
    ax.set_yticks([])


def _shown_labels(ev: Evidence) -> list[tuple[int, str]]:
    """Labels whose reversed trigger a row shows: flagged ones, else the telling one."""
    flagged = [int(k) for k in ev.result.get("flagged_labels") or []]
    if flagged:
        return [(k, f"label {k}{' (target)' if k == ev.target else ''}\nflagged") for k in flagged]
    if ev.target is not None:
        return [(ev.target, f"target {ev.target}\nnot flagged")]
    norms = (ev.result.get("details") or {}).get("l1_norms")
    if norms:
        k = int(np.nanargmin(np.asarray([np.inf if v is None else v for v in norms], float)))
        return [(k, f"label {k}, smallest norm\nnot flagged")]
    return []


MAX_REVERSED = 4


@group_figure(
    "neural_cleanse",
    suffix="triggers",
    title="Neural Cleanse: reversed triggers beside the true trigger",
    caption="Per cell (row): the attack's true trigger (mask·pattern, rebuilt from the stored "
    "attack parameters) and the reversed trigger (mask·pattern) of each flagged label — or, when "
    "none is flagged, of the target (poisoned) or of the label with the smallest norm (clean "
    "control), marked 'not flagged'.",
)
def trigger_figure(
    group: GroupSummary, evidence: Sequence[Evidence]
) -> tuple[Figure, list[PanelNote]]:
    """Neural Cleanse's reversed triggers (mask·pattern) beside the attack's true trigger.

    A row whose stored evidence cannot be drawn (a flagged label without a reversed trigger,
    masks and patterns that do not fit) shows a hatched "damaged evidence" panel instead; the
    other rows are drawn as usual.
    """
    order = {p: i for i, p in enumerate(group.precisions)}
    rows = sorted(evidence, key=lambda ev: (not ev.poisoned, order.get(ev.precision, 99)))
    shown: dict[int, list[tuple[int, str]] | Exception] = {}
    for ev in rows:
        try:
            shown[id(ev)] = _shown_labels(ev) if ev.drawable else []
        except DAMAGE as exc:
            shown[id(ev)] = exc
    widths = [min(len(v), MAX_REVERSED) for v in shown.values() if isinstance(v, list)]
    n_cols = 1 + max([1, *widths])
    fig = Figure(figsize=(max(4.8, 1.7 * n_cols + 0.6), 1.75 * max(1, len(rows)) + 0.6))
    axes = fig.subplots(max(1, len(rows)), n_cols, squeeze=False)
    notes = []
    small = {"width": 18, "fontsize": 5.5}
    figure = f"Neural Cleanse reversed triggers — {group.label}"
    for row_axes, ev in zip(axes, rows, strict=False):
        for ax in row_axes[1:]:
            ax.set_axis_off()
        first, second = row_axes[0], row_axes[1]
        if not ev.poisoned:
            unavailable(first, "clean control", "no trigger implanted", **small)
        elif ev.true_trigger is not None:
            _show(first, ev.true_trigger, "true trigger")
        else:
            unavailable(first, "true trigger", ev.trigger_note or "not rebuilt", **small)
        first.set_ylabel(
            f"{ev.precision}\n{'poisoned' if ev.poisoned else 'clean ctl'}", fontsize=7
        )
        second.set_axis_on()
        try:
            note = _reversed_row(row_axes, ev, shown[id(ev)], small)
        except DAMAGE as exc:
            for ax in row_axes[2:]:
                ax.clear()
                ax.set_axis_off()
            note = damaged(second, ev, exc, figure, **small)
        notes.append(note)
    fig.suptitle(f"Neural Cleanse reversed triggers\n{group.label}", fontsize=9)
    fig.tight_layout()
    return fig, notes


def _reversed_row(
    row_axes: Sequence[Axes],
    ev: Evidence,
    labels: list[tuple[int, str]] | Exception,
    small: dict[str, Any],
) -> PanelNote:
    """One row's reversed triggers (from the second column on); raises what damaged them."""
    second = row_axes[1]
    if not ev.drawable:
        unavailable(second, ev.state, ev.note, gid=f"unavailable:{ev.state}:{ev.label}", **small)
        return PanelNote(ev.label, ev.state, ev.note)
    masks, patterns = ev.arrays.get("masks"), ev.arrays.get("patterns")
    if masks is None or patterns is None:
        unavailable(second, "missing", "reversed triggers not stored", **small)
        return PanelNote(ev.label, "missing", "reversed triggers not stored")
    if isinstance(labels, Exception):
        raise labels
    for ax, (label, title) in zip(row_axes[1:], labels[:MAX_REVERSED], strict=False):
        if not 0 <= label < min(len(masks), len(patterns)):
            raise IndexError(f"label {label} has no stored reversed trigger (of {len(masks)})")
        ax.set_axis_on()
        _show(ax, masks[label][..., None] * patterns[label], f"reversed: {title}")
    extra = len(labels) - MAX_REVERSED
    if extra > 0:
        row_axes[-1].set_xlabel(f"… +{extra} more flagged", fontsize=6)
    if ev.state == "inconclusive":
        inconclusive_banner(second, ev.note, width=24)
    return PanelNote(ev.label, ev.state, ev.note)


def overview_plots(groups: Sequence[GroupSummary]) -> list[Plot]:
    """``accuracy_asr`` and ``detection_rates`` over every group (empty when nothing ran)."""
    if not groups:
        return []
    fig, notes = accuracy_figure(groups)
    plots = [
        _plot(
            "accuracy_asr",
            "Clean accuracy, attack success and FP32 agreement per precision",
            "Mean over seeds (whiskers: ± the sample standard deviation; none where one seed "
            "ran; 'n=k' over a bar whose seed count differs from its group's); solid bars: "
            "poisoned models, pale bars: clean controls. ASR counts triggered non-target test "
            "images classified as the target.",
            fig,
            notes,
        )
    ]
    if any(g.defenses for g in groups):
        fig, notes = detection_figure(groups)
        plots.append(
            _plot(
                "detection_rates",
                "Defense verdicts per precision",
                "Detection rate on poisoned models (red; repair: backdoor removed) and false-alarm "
                "rate on clean controls (blue; repair: accuracy kept), over decided seeds with "
                "Wilson 95% whiskers; 'k/n' above each bar, '+m inc.' counts inconclusive seeds "
                "left out of the rate. Hatched outlines mark a precision with no decided seed, "
                "with the reason (inconclusive, n/a, error, not run) — not a zero.",
                fig,
                notes,
            )
        )
    return plots
