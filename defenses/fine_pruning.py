"""Fine-Pruning (Liu, Dolan-Gavitt & Garg, RAID 2018): prune dormant channels, then fine-tune.

Backdoor behaviour tends to live in last-layer convolutional channels that stay quiet on clean
inputs. The defense ranks the last convolutional layer's channels by their mean activation on
clean data, prunes them from the least active upwards until clean accuracy falls more than
``max_acc_drop`` below the unpruned model, keeps the last mask within that bound, and
fine-tunes the pruned model on clean data.

Pruning is graph surgery on the deployed artifact
(:meth:`~harness.adapter.RuntimeAdapter.with_channels_masked`), so every point of the pruning
curve is measured with the arithmetic that ships (INT8/INT4 included). Fine-tuning needs the
trainable source: the runner passes ``DefenseData.retrainer`` (keep mask → adapter of the
fine-tuned, re-exported, re-quantized model). Without it the result is pruning only, and the
details say so.

Verdict (a repair defense, see :mod:`defenses.base`): ``detected`` means the repair worked —
final attack success ≤ ``max_final_asr`` with clean accuracy at most ``max_final_acc_loss``
below the unpruned model. On clean controls (no target label) there is no attack success to
measure: ASR is reported as ``None`` and success only asks that accuracy survives the repair.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from defenses.base import DEFENSES, Defense, DefenseData, Finding, Group, Need
from harness import metrics
from harness.errors import DataError


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


@DEFENSES.register("fine_pruning")
class FinePruning(Defense):
    """Prune dormant last-conv channels within an accuracy bound, then fine-tune if possible."""

    name = "fine_pruning"
    group = Group.REPAIR
    needs = frozenset({Need.LOGITS, Need.ACTIVATIONS, Need.CHANNEL_MASK, Need.TRIGGERED_INPUTS})
    Params = FinePruningParams
    paper = "Liu, Dolan-Gavitt & Garg, Fine-Pruning, RAID 2018"

    def _stride(self, channels: int) -> int:
        p: FinePruningParams = self.params  # type: ignore[assignment]
        if p.step_channels is not None:
            return p.step_channels
        return max(1, round(p.step_fraction * channels))

    def _run(self, adapter: Any, data: DefenseData, rng: np.random.Generator) -> Finding:
        p: FinePruningParams = self.params  # type: ignore[assignment]
        x, y, trig, target = data.clean_x, data.clean_y, data.triggered_x, data.target_label
        if len(x) == 0 or len(y) != len(x) or trig is None or len(trig) == 0:
            raise DataError(
                f"fine_pruning needs clean images with one label each and triggered images, got "
                f"{np.shape(x)} images, {np.shape(y)} labels, {np.shape(trig)} triggered"
            )
        order, means = channel_ranking(adapter, x)
        channels = len(order)
        base_acc = accuracy(adapter, x, y)
        base_asr = attack_success(adapter, trig, target)
        floor = base_acc - p.max_acc_drop

        curve = [{"pruned": 0, "fraction": 0.0, "acc": base_acc, "asr": base_asr}]
        keep = np.ones(channels, dtype=bool)
        pruned_point = curve[0]
        stride = self._stride(channels)
        for pruned in range(stride, channels, stride):  # at least one channel always survives
            candidate = np.ones(channels, dtype=bool)
            candidate[order[:pruned]] = False
            masked = adapter.with_channels_masked(candidate)
            acc = accuracy(masked, x, y)
            point = {
                "pruned": pruned,
                "fraction": pruned / channels,
                "acc": acc,
                "asr": attack_success(masked, trig, target),
            }
            curve.append(point)
            if acc < floor:
                break
            keep, pruned_point = candidate, point

        if data.retrainer is not None:
            final_adapter = data.retrainer(keep.copy())
            final_acc = accuracy(final_adapter, x, y)
            final_asr = attack_success(final_adapter, trig, target)
            fine_tuned, why = True, None
        else:
            final_acc, final_asr = pruned_point["acc"], pruned_point["asr"]
            fine_tuned = False
            why = "no retrainer: the trainable source model was not supplied (pruning only)"

        acc_loss = base_acc - final_acc
        removed = final_asr is None or final_asr <= p.max_final_asr
        success = bool(removed and acc_loss <= p.max_final_acc_loss)
        scores = {
            "base_acc": base_acc,
            "pruned_acc": pruned_point["acc"],
            "final_acc": final_acc,
            "acc_loss": acc_loss,
            "pruned_fraction": pruned_point["fraction"],
        }
        asrs = {"base_asr": base_asr, "pruned_asr": pruned_point["asr"], "final_asr": final_asr}
        scores |= {key: value for key, value in asrs.items() if value is not None}
        details = {
            "curve": curve,
            "channels": channels,
            "stride": stride,
            "pruned_channels": [int(c) for c in np.flatnonzero(~keep)],
            "fine_tuned": fine_tuned,
            "fine_tune_skipped_reason": why,
            "asr_measured": target is not None,
            "base_acc": base_acc,
            "base_asr": base_asr,
            "pruned_acc": pruned_point["acc"],
            "pruned_asr": pruned_point["asr"],
            "final_acc": final_acc,
            "final_asr": final_asr,
        }
        return Finding(
            detected=success,
            score=final_asr,
            score_name="final_asr" if final_asr is not None else None,
            scores=scores,
            threshold=p.max_final_asr,
            details=details,
            arrays={"keep_mask": keep, "channel_order": order, "mean_activation": means},
        )
