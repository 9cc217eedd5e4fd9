"""The report's figures: what a reader needs to believe each table entry, drawn with matplotlib.

Pure drawing: every function takes plain data that :mod:`harness.report` read from the result
store (summary rows, stored defense results, per-cell arrays) and returns a :class:`Plot` — PNG
bytes plus a caption and a list of what each panel shows. Nothing here reads or writes files,
so the report writes every PNG atomically and embeds the same bytes in ``report.html``.
Figures are drawn on :class:`matplotlib.figure.Figure` objects directly (no ``pyplot`` state),
so building a report never depends on, or changes, a global backend.

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
  smallest among ties; see :func:`harness.report.evidence_seed`) — because
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

import io
import logging
import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from harness.errors import one_line
from harness.verdicts import record_verdict

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
logger = logging.getLogger(__name__)


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


def _verdict_words(result: dict[str, Any], poisoned: bool) -> str:
    """The verdict in a panel title (a repair's in its own words), with the flagged labels."""
    verdict = record_verdict(result) or str(result.get("status"))
    if result.get("group") == "repair" and verdict != "inconclusive":
        return REPAIR_WORDS[(poisoned, verdict == "detected")]
    flagged = result.get("flagged_labels")
    return str(verdict).replace("_", " ") + (f", flagged {flagged}" if flagged else "")


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


# ----------------------------------------------------------------------------- per defense
Drawer = Callable[[Axes, Evidence], None]


def _threshold(ev: Evidence, param: str, default: float) -> float:
    value = ev.result.get("threshold")
    if value is None:
        value = (ev.result.get("params") or {}).get(param, default)
    return float(value)


def _label_bars(
    ax: Axes,
    values: Sequence[float | None],
    threshold: float,
    flagged: Sequence[int],
    target: int | None,
    eligible: Sequence[bool] | None = None,
    ylabel: str = "",
) -> None:
    """Per-label bars with the decision threshold: flagged red, ineligible grey, target outlined.

    A label without a value (never converged / not scorable, or NaN) is a hatched full-height
    outline marked '?', so it cannot be read as a zero; only a true infinity is a full bar marked
    '∞' (a '−∞' bar reaches below 0); negative values (robust z-scores) go below 0.
    """
    finite = [v for v in values if v is not None and math.isfinite(v)]
    top = max([*finite, threshold, 0.0]) * 1.15 or 1.0
    bottom = min([*finite, 0.0]) * 1.15
    if any(v is not None and math.isinf(v) and v < 0 for v in values):
        bottom = min(bottom, -0.15 * top)
    for label, value in enumerate(values):
        if value is None or math.isnan(value):
            ax.bar(
                label,
                top - bottom,
                0.8,
                bottom=bottom,
                fill=False,
                hatch=HATCH,
                edgecolor=MUTED,
                linewidth=0.5,
            )
            ax.text(label, (top + bottom) / 2, "?", ha="center", va="center", fontsize=7)
            continue
        shown = value if math.isfinite(value) else (top if value > 0 else bottom)
        color = (
            POISONED_COLOR
            if label in flagged
            else (CLEAN_COLOR if eligible is None or eligible[label] else MUTED)
        )
        is_target = label == target
        ax.bar(
            label,
            shown,
            0.8,
            color=color,
            edgecolor="black" if is_target else color,
            linewidth=1.4 if is_target else 0,
        )
        if math.isinf(value):
            words, where = ("∞", "bottom") if value > 0 else ("−∞", "top")
            ax.text(label, shown, words, ha="center", va=where, fontsize=7)
    ax.axhline(threshold, color=POISONED_COLOR, linestyle="--", linewidth=1)
    ax.text(
        len(values) - 0.5,
        threshold,
        f"threshold {threshold:g}",
        ha="right",
        va="bottom",
        fontsize=6,
        color=POISONED_COLOR,
    )
    step = max(1, math.ceil(len(values) / 12))
    ticks = list(range(0, len(values), step))
    ax.set_xticks(ticks, [f"{k}{'ᵀ' if k == target else ''}" for k in ticks], fontsize=6)
    if bottom < 0:
        ax.axhline(0, color="0.4", linewidth=0.6)
    ax.set_ylim(bottom * 1.12, top * 1.12)
    ax.set_xlabel("label" + ("  (ᵀ target, outlined)" if target is not None else ""), fontsize=6)
    ax.set_ylabel(ylabel, fontsize=7)


def draw_nc_anomaly(ax: Axes, ev: Evidence) -> None:
    """Neural Cleanse: anomaly index per label (MAD rule) with the threshold line."""
    details = ev.result.get("details") or {}
    index = details.get("anomaly_indices")
    if not index:
        raise Missing("no anomaly indices stored")
    norms = details.get("l1_norms") or [None] * len(index)
    median = details.get("median_norm")
    undetermined = set(details.get("undetermined_labels") or [])
    # JSON has no infinity: the store keeps an infinite index (a zero MAD) as null
    values = [
        None if k in undetermined else (math.inf if v is None else float(v))
        for k, v in enumerate(index)
    ]
    eligible = [
        median is None or (n is not None and float(n) < float(median)) for n in norms
    ]  # only labels below the median norm can be flagged
    _label_bars(
        ax,
        values,
        _threshold(ev, "anomaly_threshold", 2.0),
        ev.result.get("flagged_labels") or [],
        ev.target,
        eligible,
        "anomaly index",
    )


def draw_strip(ax: Axes, ev: Evidence) -> None:
    """STRIP: entropy histograms of clean vs triggered inputs with the threshold line.

    Only finite entropies are binned (a NaN cannot be placed on the axis); how many were left
    out is said in the legend, and a cell with none left has nothing to draw (:class:`Missing`).
    """
    clean, triggered = ev.arrays.get("clean_entropy"), ev.arrays.get("triggered_entropy")
    if clean is None or triggered is None:
        raise Missing("entropy arrays not stored")
    clean, dropped_clean = _finite_values(clean)
    triggered, dropped_triggered = _finite_values(triggered)
    if not clean.size and not triggered.size:
        raise Missing("no finite entropy stored")
    both = np.r_[clean, triggered]
    bins = np.linspace(both.min(), both.max(), 25) if np.ptp(both) > 0 else 10
    for values, dropped, color, kind in (
        (clean, dropped_clean, CLEAN_COLOR, "clean"),
        (triggered, dropped_triggered, POISONED_COLOR, "triggered"),
    ):
        left_out = f", {dropped} non-finite left out" if dropped else ""
        ax.hist(
            values, bins=bins, alpha=0.6, color=color, label=f"{kind} (n={values.size}{left_out})"
        )
    threshold = ev.result.get("threshold")
    if threshold is not None and math.isfinite(threshold):
        ax.axvline(
            threshold,
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"threshold {threshold:.3g} (below: flagged)",
        )
    else:
        ax.text(0.02, 0.5, f"no usable threshold ({threshold})", transform=ax.transAxes, fontsize=6)
    scores = ev.result.get("scores") or {}
    rates = [f"{key.upper()} {scores[key]:.2f}" for key in ("tpr", "frr") if key in scores]
    ax.set_xlabel("mean entropy under superimposition (bits)", fontsize=6)
    ax.set_ylabel("inputs", fontsize=7)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.5)  # headroom: the legend sits above the bars
    ax.legend(fontsize=5.5, title=" · ".join(rates) or None, title_fontsize=6, loc="upper right")


def _finite_values(values: np.ndarray) -> tuple[np.ndarray, int]:
    """The finite entries of a stored array (flattened, as floats) and how many were not."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    keep = flat[np.isfinite(flat)]
    return keep, int(flat.size - keep.size)


def draw_ac(ax: Axes, ev: Evidence) -> None:
    """Activation Clustering: smaller cluster's relative size vs silhouette, per class."""
    details = ev.result.get("details") or {}
    per_class = details.get("per_class") or {}
    points = {
        int(k): (r["relative_size"], r["silhouette"])
        for k, r in per_class.items()
        if "relative_size" in r and "silhouette" in r
    }
    if not points:
        raise Missing("no class was clustered")
    params = ev.result.get("params") or {}
    size_thr = float(params.get("size_threshold", 0.35))
    sil_thr = _threshold(ev, "silhouette_threshold", 0.10)
    flagged = set(ev.result.get("flagged_labels") or [])
    ys = [p[1] for p in points.values()]
    y_low, y_high = min([*ys, sil_thr, 0.0]) - 0.05, max([*ys, sil_thr]) + 0.1
    ax.add_patch(
        Rectangle(
            (0, sil_thr), size_thr, y_high - sil_thr, color=POISONED_COLOR, alpha=0.08, zorder=0
        )
    )
    ax.axvline(size_thr, color=POISONED_COLOR, linestyle="--", linewidth=0.8)
    ax.axhline(sil_thr, color=POISONED_COLOR, linestyle="--", linewidth=0.8)
    for label, (size, sil) in sorted(points.items()):
        color = POISONED_COLOR if label in flagged else CLEAN_COLOR
        marker = "*" if label == ev.target else "o"
        ax.scatter(size, sil, s=40 if marker == "*" else 14, c=color, marker=marker, zorder=3)
        if label in flagged or label == ev.target:
            ax.annotate(
                str(label), (size, sil), fontsize=6, xytext=(3, 2), textcoords="offset points"
            )
    skipped = details.get("skipped_classes") or []
    text = f"flag region: size < {size_thr:g} and silhouette > {sil_thr:g}"
    if skipped:
        text += f"\nnot clusterable: {skipped}"
    ax.text(0.98, 0.02, text, transform=ax.transAxes, ha="right", va="bottom", fontsize=5.5)
    ax.set_xlim(0, 0.52)
    ax.set_ylim(y_low, y_high)
    ax.set_xlabel("smaller cluster / class size  (★ target)", fontsize=6)
    ax.set_ylabel("silhouette", fontsize=7)


def draw_ss_scores(ax: Axes, ev: Evidence) -> None:
    """Spectral Signatures: per-sample outlier scores, removed vs kept, with the removal cut."""
    scores, removed = ev.arrays.get("per_sample_scores"), ev.arrays.get("removed")
    if scores is None or removed is None or len(scores) != len(removed):
        raise Missing("per-sample scores / removal mask not stored")
    scored = np.isfinite(scores)
    if not scored.any():
        raise Missing("no sample could be scored")
    floor = np.nanmin(scores[scored & (scores > 0)]) if (scored & (scores > 0)).any() else 1e-12
    logs = np.log10(np.maximum(scores[scored], floor))
    gone = removed[scored].astype(bool)
    bins = np.linspace(logs.min(), logs.max(), 30) if np.ptp(logs) > 0 else 10
    ax.hist(logs[~gone], bins=bins, color=CLEAN_COLOR, alpha=0.7, label=f"kept ({(~gone).sum()})")
    ax.hist(logs[gone], bins=bins, color=POISONED_COLOR, alpha=0.7, label=f"removed ({gone.sum()})")
    if gone.any():
        ax.axvline(
            logs[gone].min(),
            color="black",
            linestyle="--",
            linewidth=1,
            label="lowest removed score\n(the cut is per class)",
        )
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * 8)  # headroom on the log axis for the legend
    ax.set_xlabel("log10 outlier score (squared projection)", fontsize=6)
    ax.set_ylabel("training samples", fontsize=7)
    ax.legend(fontsize=5.5, loc="upper left")


def draw_ss_z(ax: Axes, ev: Evidence) -> None:
    """Spectral Signatures: robust z-score of each class's log spectral gap, with the cut-off."""
    per_class = (ev.result.get("details") or {}).get("per_class") or {}
    if not per_class:
        raise Missing("no per-class record stored")
    n_labels = max(int(k) for k in per_class) + 1
    values = [per_class.get(str(k), {}).get("robust_z") for k in range(n_labels)]
    _label_bars(
        ax,
        values,
        _threshold(ev, "anomaly_threshold", 3.5),
        ev.result.get("flagged_labels") or [],
        ev.target,
        None,
        "robust z of log spectral gap",
    )


def draw_fine_pruning(ax: Axes, ev: Evidence) -> None:
    """Fine-Pruning: accuracy and ASR against channels pruned, the chosen point and the result."""
    details = ev.result.get("details") or {}
    curve = details.get("curve") or []
    if not curve:
        raise Missing("no pruning curve stored")
    pruned = [point["pruned"] for point in curve]
    ax.plot(pruned, [p["acc"] for p in curve], "o-", color=ACC_COLOR, ms=3, label="clean acc")
    asr = [p.get("asr") for p in curve]
    if any(v is not None for v in asr):
        ax.plot(
            pruned,
            [np.nan if v is None else v for v in asr],
            "s-",
            color=ASR_COLOR,
            ms=3,
            label="ASR",
        )
    else:
        ax.text(0.02, 0.05, "no ASR on a clean model", transform=ax.transAxes, fontsize=6)
    params = ev.result.get("params") or {}
    chosen = next((p["pruned"] for p in curve if p.get("chosen")), None)
    if chosen is not None:
        ax.axvline(chosen, color="0.3", linestyle=":", linewidth=1)
        ax.text(chosen, 1.06, " chosen", fontsize=6, va="bottom")
    if "max_acc_drop" in params:
        ax.axhline(
            curve[0]["acc"] - params["max_acc_drop"], color=ACC_COLOR, linestyle=":", linewidth=0.8
        )
    max_asr = ev.result.get("threshold")
    if max_asr is not None and any(v is not None for v in asr):
        ax.axhline(max_asr, color=ASR_COLOR, linestyle="--", linewidth=0.8)
    final_x = chosen if chosen is not None else pruned[-1]
    tuned = "after fine-tuning" if details.get("fine_tuned") else "pruned only"
    if details.get("final_acc") is not None:
        ax.scatter(
            [final_x],
            [details["final_acc"]],
            marker="D",
            s=30,
            c=ACC_COLOR,
            edgecolors="black",
            zorder=4,
            label=f"acc {tuned}",
        )
    if details.get("final_asr") is not None:
        ax.scatter(
            [final_x],
            [details["final_asr"]],
            marker="D",
            s=30,
            c=ASR_COLOR,
            edgecolors="black",
            zorder=4,
            label=f"ASR {tuned}",
        )
    channels = details.get("channels")
    ax.set_xlabel("channels pruned" + (f" (of {channels})" if channels else ""), fontsize=6)
    ax.set_ylim(-0.03, 1.15)
    ax.set_ylabel("rate", fontsize=7)
    ax.legend(fontsize=5.5, loc="center left")


@dataclass(frozen=True)
class DefenseFigure:
    """One per-defense figure: which drawer, its title and what a reader should look at."""

    suffix: str
    title: str
    caption: str
    draw: Drawer


DEFENSE_FIGURES: dict[str, list[DefenseFigure]] = {
    "neural_cleanse": [
        DefenseFigure(
            "",
            "Neural Cleanse: anomaly index per label",
            "Anomaly index (|norm − median| / 1.4826·MAD) of each label's smallest reversed "
            "trigger. A label is flagged (red) when its norm lies below the median and its index "
            "is above the dashed threshold; grey labels lie above the median and can never be "
            "flagged; '?' marks a label whose search never reached the attack-success threshold "
            "(no norm); the attack's target is outlined.",
            draw_nc_anomaly,
        )
    ],
    "strip": [
        DefenseFigure(
            "",
            "STRIP: entropy under superimposition, clean vs triggered inputs",
            "Mean prediction entropy of held-out clean and triggered inputs under random "
            "superimposition. Inputs left of the dashed threshold (fitted on clean inputs at the "
            "configured false-rejection rate) are flagged as triggered; TPR/FRR as measured.",
            draw_strip,
        )
    ],
    "activation_clustering": [
        DefenseFigure(
            "",
            "Activation Clustering: cluster size and silhouette per class",
            "Each point is one class: the smaller 2-means cluster's share of the class and the "
            "clustering's silhouette. Classes in the shaded region (small and well separated) are "
            "flagged (red); ★ is the attack's target.",
            draw_ac,
        )
    ],
    "spectral_signatures": [
        DefenseFigure(
            "",
            "Spectral Signatures: robust z of each class's spectral gap",
            "The verdict's basis: per class, the modified z-score of the log ratio of the two "
            "largest singular values of its centred representations; classes above the dashed "
            "cut-off are flagged (red); '?' marks a class too small to score; the target is "
            "outlined.",
            draw_ss_z,
        ),
        DefenseFigure(
            "scores",
            "Spectral Signatures: outlier scores, removed vs kept",
            "Per training sample, the squared projection on its class's top singular vector "
            "(log scale, pooled over classes). Red samples were removed (the top 1.5·ε·n of each "
            "class); the dashed line marks the lowest removed score — the cut is made per class, "
            "so kept samples of other classes can score above it.",
            draw_ss_scores,
        ),
    ],
    "fine_pruning": [
        DefenseFigure(
            "",
            "Fine-Pruning: accuracy and attack success against channels pruned",
            "Clean accuracy and ASR (selection half) as last-layer channels are pruned from the "
            "least active up; the dotted vertical line is the chosen prune point (last point "
            "within the accuracy bound, dotted horizontal), diamonds the final model after "
            "fine-tuning (measurement half); the dashed red line is the success bound on ASR.",
            draw_fine_pruning,
        )
    ],
}
"""Per-defense evidence figures; a defense not listed here has its verdicts in the tables only."""


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
        fig, notes = _grid(spec.draw, group, evidence, spec.title)
        name = "-".join(part for part in (defense, spec.suffix, group.slug) if part)
        plots.append(_plot(name, spec.title, spec.caption + seed_text, fig, notes, defense, group))
    if defense == "neural_cleanse":
        fig, notes = trigger_figure(group, evidence)
        plots.append(
            _plot(
                f"neural_cleanse-triggers-{group.slug}",
                "Neural Cleanse: reversed triggers beside the true trigger",
                "Per cell (row): the attack's true trigger (mask·pattern, rebuilt from the "
                "stored attack parameters) and the reversed trigger (mask·pattern) of each "
                "flagged label — or, when none is flagged, of the target (poisoned) or of the "
                "label with the smallest norm (clean control), marked 'not flagged'." + seed_text,
                fig,
                notes,
                defense,
                group,
            )
        )
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
            title += f"\n{_verdict_words(ev.result, ev.poisoned)}"
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
