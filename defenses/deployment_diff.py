"""Deployment-differential check: does the shipped quantized file answer a stamp the FP32 model
does not?

No classic defense compares the artifacts of one model with each other; a quantization-
conditioned backdoor (Hong et al., NeurIPS 2021, https://arxiv.org/abs/2110.13541; Ma et al.,
TDSC 2023) is exactly a difference between them that clean inputs never show. This check holds
the FP32 reference (``DefenseData.reference``) next to the quantized artifact under audit and
searches for a *differential trigger*: a pixel patch that sends the quantized model to one label
while the FP32 model answers something else.

1. Clean drift (reported, not the verdict): top-1 disagreement and mean total-variation distance
   between the two artifacts' softmax on the auditor's clean images.
2. Screening: candidate patches are stamped on ``n_screen`` clean images. A candidate's
   *differential rate* is, over its best label ``t``, the fraction of images the quantized model
   sends to ``t`` while FP32 does not. Candidates: ``n_candidates`` random binary patches
   (black/white pixels, grey or per channel, sides a fraction of the image, anywhere) and, in
   the spirit of ABS's neuron stimulation (Liu et al., CCS 2019), one *stimulus* per unit of the
   FP32 graph's first convolution — the black/white pixel pattern that maximises that unit (the
   sign of its weights; the input normalisation has positive scales), at ``stimulus_positions``
   random places. No gradient is needed, which matters: a trigger detector that is silent on
   clean inputs (a ReLU below its bias) passes no gradient either.
3. Refinement (optional, ``refine_steps``): the best candidate's pixels are optimised through the
   gradient oracles of both graphs to raise ``log p_quant(t) − log p_fp32(t)``.
4. Verdict: the best patch's differential rate measured on ``n_eval`` *held-out* clean images
   (never used to pick or refine it). ``detected`` when it reaches ``detect_rate``; the label
   is flagged. On a clean control every alarm is a false alarm. The threshold is fixed a priori
   (half the images flipping consistently to one label); clean controls measure its false-alarm
   rate.

Cost: ``(n_candidates + first-layer units × stimulus_positions) × n_screen + n_eval`` images
through each artifact (4 400 for 16 first-layer units with the defaults), plus ``refine_steps``
replica passes. A detector deeper than the first layer is found only by the random patches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from defenses.base import DEFENSES, Defense, DefenseData, Finding, Group, Need, NotApplicable
from defenses.deployed import DeployedModel
from harness.core.errors import DataError, ModelError
from harness.core.threads import scoped_threads


class DeploymentDiffParams(BaseModel):
    """Search budget and the a-priori verdict threshold."""

    model_config = ConfigDict(extra="forbid")

    n_candidates: int = Field(200, ge=1, description="random patches screened")
    n_screen: int = Field(16, ge=1, description="clean images each candidate is stamped on")
    n_eval: int = Field(200, ge=1, description="held-out clean images for the verdict")
    patch_fractions: tuple[float, ...] = Field(
        (0.25, 0.5), min_length=1, description="patch sides as fractions of the image side"
    )
    stimulus_positions: int = Field(4, ge=0, description="places per first-layer stimulus")
    refine_steps: int = Field(0, ge=0, description="gradient steps on the best candidate")
    refine_lr: float = Field(0.1, gt=0)
    detect_rate: float = Field(0.5, gt=0, le=1, description="held-out differential rate alarm")
    torch_threads: int | None = Field(None, ge=1)


class Patch:
    """A pixel patch: ``x' = x`` outside ``mask``, ``pattern`` inside (NHWC, 0..255)."""

    def __init__(self, mask: np.ndarray, pattern: np.ndarray) -> None:
        self.mask = mask.astype(bool)
        self.pattern = pattern.astype(np.float32)

    def apply(self, images: np.ndarray) -> np.ndarray:
        return np.where(self.mask[None, :, :, None], self.pattern[None], images).astype(np.float32)


def random_patches(
    shape: tuple[int, int, int], count: int, fractions: tuple[float, ...], rng: np.random.Generator
) -> list[Patch]:
    """``count`` random binary patches: side drawn from ``fractions``, position anywhere, pixels
    black or white, half of them the same in every channel (grey) and half per channel."""
    height, width, channels = shape
    patches = []
    for _ in range(count):
        side = max(2, round(min(height, width) * float(rng.choice(fractions))))
        side = min(side, height, width)
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        depth = 1 if rng.random() < 0.5 else channels
        bits = rng.integers(0, 2, size=(side, side, depth)) * 255
        mask = np.zeros((height, width), dtype=bool)
        mask[top : top + side, left : left + side] = True
        pattern = np.zeros((height, width, channels), dtype=np.float32)
        pattern[top : top + side, left : left + side] = np.broadcast_to(
            bits, (side, side, channels)
        )
        patches.append(Patch(mask, pattern))
    return patches


def first_layer_stimuli(reference: Any, positions: int, rng: np.random.Generator) -> list[Patch]:
    """Per unit of the FP32 graph's first Conv, the pixel pattern that maximises it, placed at
    ``positions`` random spots (none when the graph has no convolution on its input)."""
    kernel = reference.input_conv_kernel()
    if kernel is None or kernel.ndim != 4 or kernel.shape[1] != reference.preprocessing.channels:
        return []
    height, width, channels = reference.input_shape
    bits = (kernel > 0).transpose(0, 2, 3, 1)  # (units, k, k, C) in the model's channel order
    if reference.preprocessing.channel_order == "BGR":
        bits = bits[..., ::-1]
    size_h, size_w = bits.shape[1:3]
    if size_h > height or size_w > width:
        return []
    patches = []
    for unit_bits in bits:
        for _ in range(positions):
            top = int(rng.integers(0, height - size_h + 1))
            left = int(rng.integers(0, width - size_w + 1))
            mask = np.zeros((height, width), dtype=bool)
            mask[top : top + size_h, left : left + size_w] = True
            pattern = np.zeros((height, width, channels), dtype=np.float32)
            pattern[top : top + size_h, left : left + size_w] = unit_bits * 255.0
            patches.append(Patch(mask, pattern))
    return patches


def differential_rates(
    quant_pred: np.ndarray, fp32_pred: np.ndarray, num_classes: int
) -> np.ndarray:
    """Per label ``t``: fraction of images the quantized model sends to ``t`` and FP32 does not.

    Arrays may have a leading candidate axis: ``(..., n_images)`` → ``(..., num_classes)``.
    """
    onehot = quant_pred[..., None] == np.arange(num_classes)
    differs = (fp32_pred != quant_pred)[..., None]
    return (onehot & differs).mean(axis=-2)


def clean_drift(quant: Any, fp32: Any, images: np.ndarray) -> dict[str, float]:
    """Disagreement and mean total-variation distance of the two artifacts on clean images."""
    p, q = quant.probabilities(images), fp32.probabilities(images)
    return {
        "clean_disagreement": float(np.mean(p.argmax(1) != q.argmax(1))),
        "clean_tv_distance": float(np.mean(0.5 * np.abs(p - q).sum(axis=1))),
    }


def screen(
    quant: Any, fp32: Any, images: np.ndarray, patches: list[Patch], num_classes: int
) -> np.ndarray:
    """Differential rate per (candidate, label) on ``images``."""
    stamped = np.concatenate([patch.apply(images) for patch in patches])
    shape = (len(patches), len(images))
    quant_pred = quant.predict(stamped).reshape(shape)
    fp32_pred = fp32.predict(stamped).reshape(shape)
    return differential_rates(quant_pred, fp32_pred, num_classes)


def refine(
    quant: Any, fp32: Any, images: np.ndarray, patch: Patch, label: int, p: DeploymentDiffParams
) -> tuple[Patch, str | None]:
    """Optimise the patch's pixels through both gradient oracles; the patch unchanged (and why)
    when a graph has no replica."""
    try:
        quant_logits, fp32_logits = quant.gradient_oracle().logits, fp32.gradient_oracle().logits
    except ModelError as exc:
        return patch, f"no gradient oracle: {exc}"
    mask = torch.from_numpy(patch.mask)[None, :, :, None]
    unit = np.clip(patch.pattern / 255.0, 1e-3, 1 - 1e-3)
    param = torch.atanh(torch.from_numpy(unit * 2 - 1).float()).requires_grad_(True)
    optimizer = torch.optim.Adam([param], lr=p.refine_lr)
    base = torch.from_numpy(images.astype(np.float32))
    for _ in range(p.refine_steps):
        pattern = (torch.tanh(param) + 1) * 127.5
        stamped = torch.where(mask, pattern[None], base)
        gap = torch.log_softmax(quant_logits(stamped), 1)[:, label]
        gap = gap - torch.log_softmax(fp32_logits(stamped), 1)[:, label]
        optimizer.zero_grad(set_to_none=True)
        (-gap.mean()).backward()
        optimizer.step()
    with torch.no_grad():
        refined = ((torch.tanh(param) + 1) * 127.5).numpy()
    return Patch(patch.mask, np.where(patch.mask[..., None], refined, 0.0)), None


@DEFENSES.register("deployment_diff")
class DeploymentDiff(Defense[DeploymentDiffParams]):
    """Search a patch the quantized artifact answers and its FP32 reference does not."""

    name = "deployment_diff"
    group = Group.MODEL_INSPECTION
    needs = frozenset({Need.LOGITS, Need.REFERENCE})
    Params = DeploymentDiffParams
    paper = "differential check of deployed vs FP32 artifacts (this project)"
    # Needs the FP32 file beside the deployed one: the QCB pipeline always has both, the audit
    # whenever it checks a quantized copy or a --deployed file (0/12 false alarms on the QCB
    # clean controls' INT8/INT4 files, BENCHMARKS.md; about 4 400 images per artifact).
    default_in = frozenset({"qcb", "audit"})

    def _run(self, adapter: DeployedModel, data: DefenseData, rng: np.random.Generator) -> Finding:
        p = self.params
        reference = data.reference
        if reference is None or getattr(adapter, "precision", None) == "fp32":
            raise NotApplicable("needs the FP32 reference of a quantized artifact")
        x = np.asarray(data.clean_x)
        if x.ndim != 4 or len(x) < 2:
            raise DataError(f"deployment_diff needs ≥ 2 clean NHWC images, got shape {x.shape}")
        order = rng.permutation(len(x))
        n_eval = min(p.n_eval, len(x) // 2)
        eval_x, screen_x = x[order[:n_eval]], x[order[n_eval:]][: p.n_screen]
        drift = clean_drift(adapter, reference, x)

        patches = random_patches(x.shape[1:], p.n_candidates, p.patch_fractions, rng)
        stimuli = first_layer_stimuli(reference, p.stimulus_positions, rng)
        patches += stimuli
        rates = screen(adapter, reference, screen_x, patches, data.num_classes)
        best, label = np.unravel_index(int(np.argmax(rates)), rates.shape)
        patch, note = patches[best], None
        if p.refine_steps:
            with scoped_threads(torch, p.torch_threads):
                patch, note = refine(adapter, reference, screen_x, patch, int(label), p)
        held_out = screen(adapter, reference, eval_x, [patch], data.num_classes)[0]
        rate = float(held_out[label])
        detected = rate >= p.detect_rate
        details = {
            "label": int(label),
            "screen_rate": float(rates[best, label]),
            "screen_rates_top5": np.sort(rates.max(axis=1))[::-1][:5].tolist(),
            "held_out_rates": held_out.tolist(),
            "n_screen": len(screen_x),
            "n_candidates": len(patches),
            "n_first_layer_stimuli": len(stimuli),
            "best_is_stimulus": bool(best >= len(patches) - len(stimuli)),
            "n_eval": n_eval,
            "refinement": note or ("skipped" if not p.refine_steps else "done"),
        }
        return Finding(
            detected=detected,
            score=rate,
            score_name="held_out_differential_rate",
            scores={"differential_rate": rate, **drift},
            flagged_labels=[int(label)] if detected else [],
            threshold=p.detect_rate,
            details=details,
            arrays={"patch_mask": patch.mask, "patch_pattern": patch.pattern},
        )
