"""STRIP (Gao et al., ACSAC 2019): a trigger survives superimposition, so predictions stay sure.

Paper: https://arxiv.org/abs/1902.06531

Each tested input is superimposed with ``n_overlays`` (100) clean images drawn at random from a
held-out pool; the Shannon entropy (bits) of the model's softmax is averaged over the overlays.
A clean input's prediction is scrambled by the overlay (high entropy); a triggered input keeps
predicting the target (low entropy).

Fidelity notes:
- Blending: the authors' code superimposes with ``cv2.addWeighted(background, 1, overlay, 1, 0)``
  on uint8 images, i.e. a *sum saturated at 255*; that is ``blend="add"`` (default).
  ``blend="average"`` (0.5·x + 0.5·overlay) is the variant some re-implementations use.
- Entropy: ``-Σ p·log2 p`` with ``0·log 0 = 0`` (the authors use ``np.nansum`` for that).
- Threshold: a normal is fitted to the entropies of clean inputs and the threshold is its
  ``frr`` quantile (1% in the paper), via ``scipy.stats.norm.ppf``; inputs below are flagged.

Held-out data use (all drawn with the given ``rng``): ``DefenseData.clean_x`` is split into the
tested clean inputs (at most ``n_test``, at most half of the set) and a disjoint overlay pool.
The threshold is fitted on the first half of the tested clean inputs and the FRR is measured on
the other half, so the reported FRR is out-of-sample; AUROC uses all tested clean inputs against
up to ``n_test`` of ``DefenseData.triggered_x``. Verdict: ``detected`` when the TPR on triggered
inputs at the threshold is ≥ ``detect_tpr`` (on a clean control that is a false alarm). STRIP
flags inputs, not labels, so ``flagged_labels`` stays empty.

Cost: ``n_overlays × (clean + triggered tested inputs)`` images, 40 000 with the defaults.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.special import entr, softmax
from scipy.stats import norm

from defenses.base import DEFENSES, Defense, DefenseData, Finding, Group, Need, NotApplicable
from defenses.filtering import auroc, input_filter_rates
from harness.errors import DataError

MIN_CLEAN_TESTED = 4
"""At least two inputs to fit the normal and two to measure the FRR on."""


class StripParams(BaseModel):
    """``n_overlays``, ``frr`` and the additive blend are the paper's; the rest bound the cost."""

    model_config = ConfigDict(extra="forbid")

    n_overlays: int = Field(100, ge=1, description="superimpositions per tested input")
    blend: Literal["add", "average"] = Field("add", description="saturated sum or mean")
    frr: float = Field(0.01, gt=0, lt=1, description="target false-rejection rate")
    detect_tpr: float = Field(0.5, gt=0, le=1, description="TPR at which the defense alarms")
    threshold_fit: Literal["normal", "empirical"] = Field(
        "normal",
        description="normal fit to clean entropies (the authors') or their empirical quantile",
    )
    n_test: int = Field(200, ge=1, description="cap on tested clean and triggered inputs each")
    chunk_images: int = Field(4096, ge=1, description="blended images built per adapter call")


def entropy_bits(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy in bits of each row; exact zeros contribute 0 (never NaN or inf)."""
    return entr(np.asarray(probabilities, dtype=np.float64)).sum(axis=-1) / np.log(2.0)


def superimpose(inputs: np.ndarray, overlays: np.ndarray, blend: str) -> np.ndarray:
    """Blend every input (N, H, W, C) with its overlays (N, K, H, W, C) → (N·K, H, W, C) float."""
    base = inputs.astype(np.float32)[:, None]
    if blend == "add":
        mixed = np.minimum(base + overlays, 255.0)
    else:
        mixed = 0.5 * base + 0.5 * overlays.astype(np.float32)
    return mixed.reshape(-1, *inputs.shape[1:]).astype(np.float32, copy=False)


def strip_entropies(
    adapter: Any, inputs: np.ndarray, pool: np.ndarray, p: StripParams, rng: np.random.Generator
) -> np.ndarray:
    """Mean entropy over ``p.n_overlays`` random superimpositions, one value per input."""
    per_chunk = max(1, p.chunk_images // p.n_overlays)
    out = np.empty(len(inputs))
    for start in range(0, len(inputs), per_chunk):
        batch = inputs[start : start + per_chunk]
        picks = rng.integers(len(pool), size=(len(batch), p.n_overlays))
        logits = adapter.logits(superimpose(batch, pool[picks].astype(np.float32), p.blend))
        probs = softmax(np.asarray(logits, dtype=np.float64), axis=1)
        out[start : start + len(batch)] = entropy_bits(probs).reshape(len(batch), -1).mean(axis=1)
    return out


def normal_threshold(entropies: np.ndarray, frr: float) -> tuple[float, float, float]:
    """(threshold, mean, std) of a normal fitted to clean entropies; its ``frr`` quantile."""
    mean, std = norm.fit(entropies)
    threshold = float(norm.ppf(frr, loc=mean, scale=std)) if std > 0 else float(mean)
    return threshold, float(mean), float(std)


def empirical_threshold(entropies: np.ndarray, frr: float) -> float:
    """The ``frr`` quantile of the clean entropies themselves (no distributional assumption).

    On skewed entropy distributions (many confidently classified clean inputs near 0 bits, as
    on GTSRB) the normal fit's 1% quantile falls below zero and no input can ever be flagged;
    the empirical quantile keeps the intended false-rejection rate.
    """
    return float(np.quantile(entropies, frr))


def _check_images(name: str, images: np.ndarray, like: np.ndarray | None = None) -> None:
    if images.ndim != 4:
        raise DataError(f"STRIP: {name} must be NHWC images, got shape {images.shape}")
    if like is not None and images.shape[1:] != like.shape[1:]:
        raise DataError(
            f"STRIP: {name} have shape {images.shape[1:]} but clean images {like.shape[1:]}"
        )


@DEFENSES.register("strip")
class Strip(Defense):
    """Flag inputs whose predictions stay confident under random superimposition."""

    name = "strip"
    group = Group.INPUT_FILTERING
    needs = frozenset({Need.LOGITS, Need.TRIGGERED_INPUTS})
    Params = StripParams
    paper = "Gao et al., STRIP: A Defence Against Trojan Attacks on DNNs, ACSAC 2019"

    def _run(self, adapter: Any, data: DefenseData, rng: np.random.Generator) -> Finding:
        p: StripParams = self.params  # type: ignore[assignment]
        assert data.triggered_x is not None  # guaranteed by the needs
        clean_x, triggered_x = np.asarray(data.clean_x), np.asarray(data.triggered_x)
        _check_images("clean images", clean_x)
        _check_images("triggered images", triggered_x, like=clean_x)
        n_clean = min(p.n_test, len(clean_x) // 2)
        if n_clean < MIN_CLEAN_TESTED or len(triggered_x) == 0:
            raise NotApplicable(
                f"needs ≥ {2 * MIN_CLEAN_TESTED} held-out clean images and ≥ 1 triggered input, "
                f"got {len(clean_x)} and {len(triggered_x)}"
            )
        order = rng.permutation(len(clean_x))
        tested_clean, pool = clean_x[order[:n_clean]], clean_x[order[n_clean:]]
        picked = rng.choice(len(triggered_x), size=min(p.n_test, len(triggered_x)), replace=False)
        tested_triggered = triggered_x[np.sort(picked)]

        clean_h = strip_entropies(adapter, tested_clean, pool, p, rng)
        triggered_h = strip_entropies(adapter, tested_triggered, pool, p, rng)
        n_fit = (n_clean + 1) // 2
        normal_thr, mean, std = normal_threshold(clean_h[:n_fit], p.frr)
        empirical_thr = empirical_threshold(clean_h[:n_fit], p.frr)
        threshold = normal_thr if p.threshold_fit == "normal" else empirical_thr
        rates = input_filter_rates(clean_h[n_fit:], triggered_h, threshold, flag_below=True)
        other = input_filter_rates(
            clean_h[n_fit:],
            triggered_h,
            empirical_thr if p.threshold_fit == "normal" else normal_thr,
            flag_below=True,
        )
        other_fit = "empirical" if p.threshold_fit == "normal" else "normal"
        area = auroc(-clean_h, -triggered_h)  # low entropy ⇒ triggered

        scores = {
            "tpr": rates["tpr"],
            "frr": rates["frr"],
            "auroc": area,
            "mean_entropy_clean": float(clean_h.mean()),
            "mean_entropy_triggered": float(triggered_h.mean()),
            f"tpr_{other_fit}_threshold": other["tpr"],
            f"frr_{other_fit}_threshold": other["frr"],
        }
        details = {
            "n_clean_fit": n_fit,
            "n_clean_eval": n_clean - n_fit,
            "n_triggered": len(tested_triggered),
            "n_overlay_pool": len(pool),
            "clean_entropy_normal": {"mean": mean, "std": std},
            "thresholds": {"normal": normal_thr, "empirical": empirical_thr},
            "frr_in_sample": float((clean_h[:n_fit] < threshold).mean()),
        }
        return Finding(
            detected=bool(rates["tpr"] >= p.detect_tpr),
            score=rates["tpr"],
            score_name="tpr_at_threshold",
            scores=scores,
            threshold=threshold,
            details=details,
            per_sample_scores=np.r_[clean_h, triggered_h],
            arrays={"clean_entropy": clean_h, "triggered_entropy": triggered_h},
        )
