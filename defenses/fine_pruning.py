"""Fine-Pruning (Liu, Dolan-Gavitt & Garg, RAID 2018): prune dormant channels, then fine-tune.

Paper: https://arxiv.org/abs/1805.12185

Backdoor behaviour tends to live in last-layer convolutional channels that stay quiet on clean
inputs. The defense ranks the last convolutional layer's channels by their mean activation on
clean data, prunes them from the least active upwards until clean accuracy falls more than
``max_acc_drop`` (the paper's 4 points) below the unpruned model, keeps the last mask within
that bound, and fine-tunes the pruned model on clean data.

Disjoint clean sets: ``DefenseData.clean_x`` is split into two halves, stratified by label
(seeded by the run's ``rng``). The *selection* half ranks the channels and chooses the prune
point; the *measurement* half scores the unpruned, pruned and fine-tuned models. Choosing and
scoring the prune point on the same images would let the chosen point look better than it is.
``arrays["selection_mask"]`` records the split.

Pruning is graph surgery on the deployed artifact
(:meth:`~harness.runtime.adapter.RuntimeAdapter.with_channels_masked`), so every point of the
pruning
curve is measured with the arithmetic that ships (INT8/INT4 included). Fine-tuning needs the
trainable source: the runner passes ``DefenseData.retrainer`` (keep mask → adapter of the
fine-tuned, re-exported, re-quantized model; its budget, from ``describe()``, is recorded in
``details["fine_tune_budget"]``; see :mod:`harness.pipeline.retrain` for the default budget).
Without a
retrainer only half of the method ran: the verdict is ``inconclusive`` unless
``allow_pruning_only`` is set (a named deviation: the pruned model is then judged alone).

Verdict (a repair defense, see :mod:`defenses.base`): ``detected`` means the repair worked —
final attack success ≤ ``max_final_asr`` with clean accuracy at most ``max_final_acc_loss``
below the unpruned model, both on the measurement half. These two bounds are ours (the paper
reports the numbers, not a pass mark). On clean controls (no target label) there is no attack
success to measure: ASR is reported as ``None`` and success only asks that accuracy survives.

No-fine-tune control (docs/protocol.md v1 §4.5): whether fine-tuning helped or hurt can only be
read against the pruned model before it, so every run also applies the same success rule to the
pruned, not fine-tuned artifact, on the same images (``details["control_no_fine_tune"]``). A
statement like "fine-tuning brings the backdoor back" is the difference between the two.

Fine-tuning data: the paper fine-tunes on the defender's held-out clean data. The retrainer says
where its images come from (``describe()["data_source"]``: ``"held_out"`` or ``"training"``, the
images the model was fitted on); it is recorded as ``details["fine_tune_data"]``, and training
images are named there as a deviation from protocol v1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from defenses.base import DEFENSES, Defense, DefenseData, Finding, Group, Need
from defenses.deployed import DeployedModel
from harness.core import metrics
from harness.core.errors import DataError


class FinePruningParams(BaseModel):
    """The paper's 4-point accuracy bound; the pruning stride keeps the curve affordable."""

    model_config = ConfigDict(extra="forbid")

    max_acc_drop: float = Field(
        0.04, ge=0, le=1, description="stop pruning once clean accuracy falls more than this"
    )
    step_fraction: float = Field(
        0.05, gt=0, le=1, description="fraction of the channels pruned per curve point"
    )
    step_channels: int | None = Field(
        None, ge=1, description="channels pruned per curve point (overrides step_fraction)"
    )
    max_final_asr: float = Field(0.20, ge=0, le=1, description="success: final ASR at most this")
    max_final_acc_loss: float = Field(
        0.05, ge=0, le=1, description="success: final clean-accuracy loss at most this"
    )
    allow_pruning_only: bool = Field(
        False, description="decide on the pruned model when no retrainer can fine-tune it"
    )


def stratified_halves(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of a selection half; every class splits as evenly as its count allows.

    Images are grouped by label in random order and dealt alternately to the two halves, so
    each class differs by at most one image between them (a singleton class goes to one side).
    """
    labels = np.asarray(labels)
    order = rng.permutation(len(labels))
    grouped = order[np.argsort(labels[order], kind="stable")]
    selection = np.zeros(len(labels), dtype=bool)
    selection[grouped[0::2]] = True
    return selection


def channel_ranking(adapter: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Last-conv channels in increasing order of mean clean activation, and those means."""
    act = adapter.activations(images, ["last_conv"])["last_conv"]  # (N, C, H, W)
    means = act.reshape(act.shape[0], act.shape[1], -1).mean(axis=(0, 2))
    return np.argsort(means, kind="stable"), means


def accuracy(adapter: Any, images: np.ndarray, labels: np.ndarray) -> float:
    """Clean top-1 accuracy of ``adapter`` (the harness's own metric)."""
    return metrics.accuracy(adapter.predict(images), labels)


def attack_success(adapter: Any, triggered: np.ndarray, target: int | None) -> float | None:
    """Fraction of triggered inputs sent to the target; ``None`` on clean controls."""
    if target is None:
        return None
    return metrics.attack_success_rate(adapter.predict(triggered), target)


def _fine_tune(retrainer: Any, keep: np.ndarray) -> tuple[Any, dict[str, Any] | None]:
    """The repaired artifact's adapter and the retrainer's budget, if it describes one."""
    repaired = retrainer(keep.copy())
    describe = getattr(retrainer, "describe", None)
    return repaired, describe() if callable(describe) else None


def _success(
    base_acc: float, acc: float, asr: float | None, p: FinePruningParams
) -> dict[str, Any]:
    """The success rule applied to one artifact's measurements (the control's, see module doc)."""
    removed = asr is None or asr <= p.max_final_asr
    return {
        "acc": acc,
        "asr": asr,
        "acc_loss": base_acc - acc,
        "success": bool(removed and base_acc - acc <= p.max_final_acc_loss),
    }


def _data_source(budget: dict[str, Any] | None) -> str | None:
    """Where the fine-tuning images came from, as the retrainer describes it (see module doc)."""
    if not budget or "data_source" not in budget:
        return None
    source = str(budget["data_source"])
    if source == "training":
        return "training (images the model was trained on; protocol v1 asks held-out data)"
    return source


@DEFENSES.register("fine_pruning")
class FinePruning(Defense[FinePruningParams]):
    """Prune dormant last-conv channels within an accuracy bound, then fine-tune."""

    name = "fine_pruning"
    group = Group.REPAIR
    needs = frozenset({Need.LOGITS, Need.ACTIVATIONS, Need.CHANNEL_MASK, Need.TRIGGERED_INPUTS})
    Params = FinePruningParams
    paper = "Liu, Dolan-Gavitt & Garg, Fine-Pruning, RAID 2018"
    # A repair: an audit of a vendor file has no trigger whose removal it could measure.
    default_in = frozenset({"run", "qcb"})
    flags_labels = False

    def _stride(self, channels: int) -> int:
        p = self.params
        if p.step_channels is not None:
            return p.step_channels
        return max(1, round(p.step_fraction * channels))

    def _prune_curve(
        self, adapter: Any, x: np.ndarray, y: np.ndarray, trig: np.ndarray, target: int | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """(keep mask, channel order, mean activations, curve) chosen on the selection half."""
        p = self.params
        order, means = channel_ranking(adapter, x)
        channels, stride = len(order), self._stride(len(order))
        base_acc = accuracy(adapter, x, y)
        curve = [
            {
                "pruned": 0,
                "fraction": 0.0,
                "acc": base_acc,
                "asr": attack_success(adapter, trig, target),
            }
        ]
        keep = np.ones(channels, dtype=bool)
        for pruned in range(stride, channels, stride):  # at least one channel always survives
            candidate = np.ones(channels, dtype=bool)
            candidate[order[:pruned]] = False
            masked = adapter.with_channels_masked(candidate)
            acc = accuracy(masked, x, y)
            asr = attack_success(masked, trig, target)
            curve.append({"pruned": pruned, "fraction": pruned / channels, "acc": acc, "asr": asr})
            if acc < base_acc - p.max_acc_drop:
                break
            keep = candidate
        for point in curve:
            point["chosen"] = point["pruned"] == int((~keep).sum())
        return keep, order, means, curve

    def _run(self, adapter: DeployedModel, data: DefenseData, rng: np.random.Generator) -> Finding:
        p = self.params
        x, y, trig, target = data.clean_x, data.clean_y, data.triggered_x, data.target_label
        if len(x) < 2 or len(y) != len(x) or trig is None or len(trig) == 0:
            triggered = "no" if trig is None else str(np.shape(trig))
            raise DataError(
                f"fine_pruning needs ≥ 2 clean images with one label each and triggered images, "
                f"got {np.shape(x)} images, {np.shape(y)} labels, {triggered} triggered"
            )
        selection = stratified_halves(y, rng)
        measure_x, measure_y = x[~selection], y[~selection]
        keep, order, means, curve = self._prune_curve(
            adapter, x[selection], y[selection], trig, target
        )
        chosen = next(point for point in curve if point["chosen"])
        pruned = adapter.with_channels_masked(keep) if (~keep).any() else adapter
        measured = {
            "base_acc": accuracy(adapter, measure_x, measure_y),
            "base_asr": curve[0]["asr"],
            "pruned_acc": accuracy(pruned, measure_x, measure_y),
            "pruned_asr": chosen["asr"],
        }
        control = _success(measured["base_acc"], measured["pruned_acc"], measured["pruned_asr"], p)
        if data.retrainer is not None:
            final, budget = _fine_tune(data.retrainer, keep)
            final_acc = accuracy(final, measure_x, measure_y)
            final_asr = attack_success(final, trig, target)
        else:
            final_acc, final_asr, budget = measured["pruned_acc"], measured["pruned_asr"], None
        inconclusive = None
        if data.retrainer is None and not p.allow_pruning_only:
            inconclusive = (
                "pruning only: no retrainer (trainable source model) to fine-tune with; "
                "set allow_pruning_only to judge the pruned model alone"
            )
        acc_loss = measured["base_acc"] - final_acc
        removed = final_asr is None or final_asr <= p.max_final_asr
        scores = {
            "base_acc": measured["base_acc"],
            "pruned_acc": measured["pruned_acc"],
            "final_acc": final_acc,
            "acc_loss": acc_loss,
            "pruned_fraction": chosen["fraction"],
        }
        asrs = {"base_asr": measured["base_asr"], "pruned_asr": chosen["asr"]}
        scores |= {key: value for key, value in asrs.items() if value is not None}
        if final_asr is not None:
            scores["final_asr"] = final_asr
        details = {
            **measured,
            "final_acc": final_acc,
            "final_asr": final_asr,
            "curve": curve,
            "curve_measured_on": "selection half",
            "n_selection": int(selection.sum()),
            "n_measurement": int((~selection).sum()),
            "channels": len(order),
            "stride": self._stride(len(order)),
            "pruned_channels": [int(c) for c in np.flatnonzero(~keep)],
            "fine_tuned": data.retrainer is not None,
            "fine_tune_budget": budget,
            "fine_tune_skipped_reason": None if data.retrainer else "no retrainer supplied",
            "fine_tune_data": _data_source(budget),
            "control_no_fine_tune": control,
            "asr_measured": target is not None,
            "success_rule": (
                f"ours: final ASR <= {p.max_final_asr} and accuracy loss <= "
                f"{p.max_final_acc_loss} on the measurement half"
            ),
        }
        return Finding(
            detected=bool(removed and acc_loss <= p.max_final_acc_loss),
            inconclusive=inconclusive,
            score=final_asr,
            score_name="final_asr" if final_asr is not None else None,
            scores=scores,
            threshold=p.max_final_asr,
            details=details,
            arrays={
                "keep_mask": keep,
                "channel_order": order,
                "mean_activation": means,
                "selection_mask": selection,
            },
        )
