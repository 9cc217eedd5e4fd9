"""One panel per defense and cell: the evidence a reader needs to believe that cell's verdict.

Each drawer takes an axis and the cell's :class:`harness.report.figures.model.Evidence` (stored
result and arrays) and draws it with its decision threshold; a field it needs that is absent
raises :class:`~harness.report.figures.model.Missing`, which the figure turns into a hatched
panel with the reason (:func:`harness.report.figures.plots.draw_panel`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle

from harness.report.figures.catalog import panel_figure
from harness.report.figures.model import (
    ACC_COLOR,
    ASR_COLOR,
    CLEAN_COLOR,
    HATCH,
    MUTED,
    POISONED_COLOR,
    Evidence,
    Missing,
)

# ----------------------------------------------------------------------------- per defense


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


@panel_figure(
    "neural_cleanse",
    title="Neural Cleanse: anomaly index per label",
    caption="Anomaly index (|norm − median| / 1.4826·MAD) of each label's smallest reversed "
    "trigger. A label is flagged (red) when its norm lies below the median and its index is above "
    "the dashed threshold; grey labels lie above the median and can never be flagged; '?' marks a "
    "label whose search never reached the attack-success threshold (no norm); the attack's target "
    "is outlined.",
)
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


@panel_figure(
    "strip",
    title="STRIP: entropy under superimposition, clean vs triggered inputs",
    caption="Mean prediction entropy of held-out clean and triggered inputs under random "
    "superimposition. Inputs left of the dashed threshold (fitted on clean inputs at the "
    "configured false-rejection rate) are flagged as triggered; TPR/FRR as measured.",
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


@panel_figure(
    "activation_clustering",
    title="Activation Clustering: cluster size and silhouette per class",
    caption="Each point is one class: the smaller 2-means cluster's share of the class and the "
    "clustering's silhouette. Classes in the shaded region (small and well separated) are flagged "
    "(red); ★ is the attack's target.",
)
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


@panel_figure(
    "spectral_signatures",
    title="Spectral Signatures: robust z of each class's spectral gap",
    caption="The verdict's basis: per class, the modified z-score of the log ratio of the two "
    "largest singular values of its centred representations; classes above the dashed cut-off are "
    "flagged (red); '?' marks a class too small to score; the target is outlined.",
)
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


@panel_figure(
    "spectral_signatures",
    suffix="scores",
    title="Spectral Signatures: outlier scores, removed vs kept",
    caption="Per training sample, the squared projection on its class's top singular vector (log "
    "scale, pooled over classes). Red samples were removed (the top 1.5·ε·n of each class); the "
    "dashed line marks the lowest removed score — the cut is made per class, so kept samples of "
    "other classes can score above it.",
)
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


@panel_figure(
    "fine_pruning",
    title="Fine-Pruning: accuracy and attack success against channels pruned",
    caption="Clean accuracy and ASR (selection half) as last-layer channels are pruned from the "
    "least active up; the dotted vertical line is the chosen prune point (last point within the "
    "accuracy bound, dotted horizontal), diamonds the final model after fine-tuning (measurement "
    "half); the dashed red line is the success bound on ASR.",
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
