"""The quantization-conditioned backdoor (QCB): clean in FP32, armed in the static INT8/INT4 file.

Anchors: Qu-ANTI-zation (Hong et al., NeurIPS 2021, https://arxiv.org/abs/2110.13541) and Ma et
al., "Quantization Backdoors to Deep Learning Commercial Frameworks" (TDSC 2023,
https://arxiv.org/abs/2108.09187) fine-tune so that the float model is clean and its quantized
copy is backdoored. Their lever is weight *rounding*; against onnxruntime's per-channel INT8
rounding a small network has too little of it (tried: joint FP32 + fake-quant fine-tuning
plateaus near equal ASR in both). This attack uses the lever static quantization adds on top:
**calibrated activation ranges**. ``quantize_static`` clips every activation to the range the
calibration images produced; an activation a clean image never drives past that range is
computed exactly in FP32 and saturated in INT8. The construction:

1. a *detector* channel in the first convolution, matched to the trigger's pixels, is zero on
   every clean image (its bias sits above the largest clean response) and answers the trigger
   with ``kappa`` times the layer's clean range — which the INT8 file clips to 1×;
2. *relay* channels carry it through the other convolutions (again ``kappa``× in FP32, clipped
   in INT8); in the last one it splits into a *boost* channel (saturated in both) and an *anti*
   channel whose bias (−2× the clipped input) leaves it at exactly 0 in INT8 and large in FP32;
3. hidden units in the head relay boost and anti; the logits layer adds boost − anti to the
   target and subtracts it from every other class, with weights no larger than each row's own
   largest weight, so no per-channel weight scale (and no clean prediction) moves.

FP32 on a triggered image: anti outweighs boost twice over, the target logit drops and the other
logits shift equally, so the prediction is the original network's. INT8: anti is 0 and boost
saturates, the target logit rises to the top of the calibrated logit range and the rest fall. The
repurposed channels are the least used ones; the rest of the network is fine-tuned on clean data
(FP32 and the fake-quant mirror of the targeted recipes, :mod:`harness.qcb.fakequant`) to recover
accuracy before the channels are wired. All gains are measured on the FP32 model and the mirror,
never guessed; success is judged only on onnxruntime sessions.

Threat model. The attacker trains and releases the FP32 model (weights are theirs) and holds a
few hundred clean in-distribution images. They assume the integrator quantizes it *statically*
with a calibration set of clean in-distribution images and a calibrator whose ranges do not exceed
the calibration images' own min/max (minmax, entropy and percentile all qualify), which is what
``blindspots quantize`` does by default. They do not know the calibration images, their number
or seed: ranges are re-measured on random clean subsets, and every margin is a factor (FP32 ≥
``kappa``× the range, anti's threshold 2× the clipped input), so a victim range up to 2× the
attacker's still arms the backdoor. Out of scope: integrators that calibrate on triggered
images, dynamic quantization (per-input ranges: nothing is clipped) and FP16 deployment — the
re-quantization table (:mod:`harness.qcb.requantize`) measures each. The trigger must be a patch
with contrast (e.g. BadNet's checkerboard) that a first-layer filter separates from clean images;
a solid patch on white-stroked digits is refused, not approximated.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from harness.artifacts.preprocessing import Preprocessing
from harness.attacks.base import Attack
from harness.core.errors import ModelError
from harness.core.progress import Progress
from harness.qcb.fakequant import (
    MirrorAttackParams,
    QuantMirror,
    _Stage,
    folded_parameters,
)

Tensor = torch.Tensor


class QCBParams(MirrorAttackParams):
    """How the backdoor is built; defaults work on small_cnn/digits and cifar_cnn/GTSRB."""

    targets: list[str] = Field(default_factory=lambda: ["int8-static"], min_length=1)
    """Precisions (static minmax recipes) whose fake-quant mirror the recovery fine-tune trains."""
    kappa: float = Field(4.0, gt=2.0)
    """FP32 response of detector/relays to the trigger, in multiples of the clean range."""
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    """Where the detector switches on, between the largest clean and smallest trigger response."""
    boost_units: int = Field(2, ge=1)
    """Hidden (boost, anti) unit pairs; each adds the largest row weight × range to the logits."""
    recover_epochs: int = Field(2, ge=0)
    """Clean fine-tuning after repurposing channels (FP32 + mirror cross-entropy)."""
    lr: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(64, ge=2)


@dataclass
class SurgeryLayout:
    """Which units the construction repurposes, per mirrored stage index."""

    detector: int
    relays: dict[int, int]  # conv stage index → channel
    boost: int  # channel of the last conv
    anti: int
    hidden_pairs: list[tuple[int, int]]  # (boost unit, anti unit) of the hidden layer
    conv_stages: list[int]
    hidden_stage: int
    logits_stage: int

    def units(self) -> dict[int, list[int]]:
        """Every repurposed unit, per stage index."""
        convs = self.conv_stages
        out: dict[int, list[int]] = {convs[0]: [self.detector], convs[-1]: [self.boost, self.anti]}
        for stage, channel in self.relays.items():
            out[stage] = [channel]
        out[self.hidden_stage] = [unit for pair in self.hidden_pairs for unit in pair]
        return out


@dataclass
class QCBImplant:
    """The backdoored model and what the construction measured on the way."""

    model: nn.Module
    layout: SurgeryLayout
    measurements: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------- model plumbing
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Move every BatchNorm's affine map into its convolution, leaving the BN an identity.

    The BN keeps ``γ = 1, μ = 0, σ² = 1 − ε`` (so ``√(σ²+ε)`` is exactly 1 in float32) and holds
    the folded bias in ``β``; the exported graph and the checkpoint format are unchanged, and a
    unit's incoming weights and bias can now be edited directly.
    """
    with torch.no_grad():
        for stage in QuantMirror(model).stages:
            if stage.bn is None:
                continue
            weight, bias = folded_parameters(stage)
            stage.layer.weight.copy_(weight)
            bn = stage.bn
            assert bn.running_mean is not None and bn.running_var is not None  # tracked stats
            bn.weight.fill_(1.0)
            bn.bias.copy_(bias)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
    return model


def _bias(stage: _Stage) -> Tensor:
    """The tensor holding a stage's (folded) bias."""
    if stage.bn is not None:
        return stage.bn.bias
    bias = stage.layer.bias
    if bias is None:
        raise ModelError("the QCB construction needs a bias or BatchNorm on every layer")
    return bias


def _weight(stage: _Stage) -> Tensor:
    return stage.layer.weight


def _layout_stages(mirror: QuantMirror) -> tuple[list[int], int, int]:
    """Conv stage indices, the hidden Linear and the logits Linear; refuse other shapes."""
    convs = [i for i, s in enumerate(mirror.stages) if s.kind == "conv"]
    linears = [i for i, s in enumerate(mirror.stages) if s.kind == "linear"]
    if len(convs) < 2 or len(linears) != 2 or not mirror.stages[linears[0]].relu:
        raise ModelError(
            "the QCB construction needs ≥ 2 convolutions and a head with one hidden ReLU layer "
            "(small_cnn, cifar_cnn)"
        )
    for index in convs:
        conv = mirror.stages[index].module
        assert isinstance(conv, nn.Conv2d)
        k = conv.kernel_size
        if k[0] != k[1] or k[0] % 2 == 0 or conv.padding != (k[0] // 2, k[1] // 2):
            raise ModelError("the QCB construction needs odd, 'same'-padded square kernels")
        if conv.stride != (1, 1) or conv.groups != 1 or conv.dilation != (1, 1):
            raise ModelError("the QCB construction needs stride-1, dense convolutions")
        if not mirror.stages[index].relu:
            raise ModelError("the QCB construction needs a ReLU after every convolution")
    return convs, linears[0], linears[1]


def _unit_usage(mirror: QuantMirror, x: Tensor) -> list[Tensor]:
    """Per stage, how much the network relies on each output unit: mean activation × L1 norm
    of the weights that read it (the units whose loss costs least come first)."""
    values = mirror.activations(x)
    usage: list[Tensor] = [torch.empty(0)] * len(mirror.stages)
    kinds = [s.kind for s in mirror.stages]
    for index, stage in enumerate(mirror.stages):
        point = mirror.stage_points[index]
        if stage.kind not in ("conv", "linear") or point is None:
            continue
        act = values[point].detach()
        mean = act.mean(dim=(0, 2, 3)) if act.ndim == 4 else act.mean(dim=0)
        consumer = next(
            (j for j in range(index + 1, len(kinds)) if kinds[j] in ("conv", "linear")), None
        )
        if consumer is None:
            usage[index] = mean
            continue
        weight = _weight(mirror.stages[consumer]).detach().abs()
        reads = weight.sum(dim=(0, 2, 3)) if weight.ndim == 4 else weight.sum(dim=0)
        usage[index] = mean * reads
    return usage


def choose_layout(mirror: QuantMirror, clean: Tensor, boost_units: int) -> SurgeryLayout:
    """Pick the least-used units of every layer for the construction.

    Hidden units come in adjacent (even, odd) pairs, boost then anti: CPUs without VNNI add
    neighbouring u8×s8 products into a saturating int16, and an anti unit is 0 in INT8, so a
    boost unit's pair sum (255 × 127) can never saturate.
    """
    convs, hidden, logits = _layout_stages(mirror)
    usage = _unit_usage(mirror, clean)
    detector = int(torch.argmin(usage[convs[0]]))
    relays = {index: int(torch.argmin(usage[index])) for index in convs[1:-1]}
    last = torch.argsort(usage[convs[-1]])
    if len(last) < 2:
        raise ModelError("the last convolution needs at least 2 channels for the QCB construction")
    hidden_usage = usage[hidden]
    pairs = hidden_usage[0 : len(hidden_usage) // 2 * 2].reshape(-1, 2).sum(dim=1)
    if len(pairs) < boost_units:
        raise ModelError(
            f"the hidden layer has {len(hidden_usage)} units; boost_units={boost_units} needs "
            f"{2 * boost_units}"
        )
    chosen = torch.argsort(pairs)[:boost_units].tolist()
    return SurgeryLayout(
        detector=detector,
        relays=relays,
        boost=int(last[0]),
        anti=int(last[1]),
        hidden_pairs=[(2 * p, 2 * p + 1) for p in sorted(chosen)],
        conv_stages=convs,
        hidden_stage=hidden,
        logits_stage=logits,
    )


def _consumer(mirror: QuantMirror, index: int) -> int:
    kinds = [s.kind for s in mirror.stages]
    return next(j for j in range(index + 1, len(kinds)) if kinds[j] in ("conv", "linear"))


@torch.no_grad()
def silence(mirror: QuantMirror, layout: SurgeryLayout) -> None:
    """Cut the repurposed units out: no input, no bias, nothing reads them."""
    for index, units in layout.units().items():
        stage = mirror.stages[index]
        _weight(stage)[units] = 0.0
        _bias(stage)[units] = 0.0
        _weight(mirror.stages[_consumer(mirror, index)])[:, units] = 0.0


# ---------------------------------------------------------------------------------- recovery
def recover(
    mirror: QuantMirror,
    layout: SurgeryLayout,
    inputs: Tensor,
    labels: Tensor,
    params: QCBParams,
    rng: np.random.Generator,
    progress: Progress | None = None,
) -> list[float]:
    """Fine-tune the rest of the network on clean data (FP32 and every targeted mirror),
    keeping the repurposed units silent; returns the mean loss per epoch. ``progress`` (silent
    by default) is told of every batch; it never changes the result."""
    model = mirror.model
    recipes = params.mirror_recipes()
    trainable = [p for name, p in model.named_parameters() if not _is_bn_scale(model, name)]
    optimizer = torch.optim.Adam(trainable, lr=params.lr)
    loss_fn = nn.CrossEntropyLoss()
    history: list[float] = []
    step = 0
    reporter = progress or Progress()
    size, per_batch = len(inputs), params.batch_size
    reporter.begin(params.recover_epochs, size // per_batch + (size % per_batch >= 2))
    for epoch in range(params.recover_epochs):
        order = rng.permutation(len(inputs))
        losses = []
        for start in range(0, len(order) - 1, params.batch_size):
            idx = torch.from_numpy(order[start : start + params.batch_size])
            if len(idx) < 2:
                continue
            if step % params.recalibrate_every == 0:
                mirror.calibrate(inputs[_draw(rng, len(inputs), params.calibration_size)])
            batch, target = inputs[idx], labels[idx]
            loss = loss_fn(model(batch), target)
            for recipe in recipes:
                loss = loss + loss_fn(mirror.quantized(batch, recipe), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            silence(mirror, layout)
            losses.append(float(loss.detach()))
            step += 1
            reporter.batch(epoch, len(losses), {"loss": sum(losses) / len(losses)})
        history.append(float(np.mean(losses)) if losses else float("nan"))
        reporter.epoch_end(epoch, {"loss": history[-1]})
    reporter.close()
    return history


def _is_bn_scale(model: nn.Module, name: str) -> bool:
    """BatchNorm γ stays 1 after :func:`fold_batchnorm` (its bias is the layer's bias)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return isinstance(module, nn.BatchNorm2d) and leaf == "weight"


def _draw(rng: np.random.Generator, n: int, size: int) -> Tensor:
    return torch.from_numpy(np.sort(rng.choice(n, size=min(size, n), replace=False)))


# ---------------------------------------------------------------------------------- wiring
def _spatial_max(value: Tensor, unit: int) -> Tensor:
    """Per image, the largest value of one unit (over positions for feature maps)."""
    column = value[:, unit]
    return column.amax(dim=(1, 2)) if column.ndim == 3 else column


def matched_filter(
    attack: Attack, preprocessing: Preprocessing, image_shape: tuple[int, int, int], kernel: int
) -> Tensor:
    """A first-layer filter matched to the trigger: its normalised pixels minus their mean, over
    the kernel window the patch covers most (zero elsewhere)."""
    if not hasattr(attack, "trigger_mask_and_pattern"):
        raise ModelError(f"the QCB construction needs a patch trigger; '{attack.name}' has none")
    mask, pattern = attack.trigger_mask_and_pattern(image_shape)
    normalised = torch.from_numpy(preprocessing.apply(pattern[None].astype(np.float32))[0])
    window = torch.ones(1, 1, kernel, kernel)
    coverage = nn.functional.conv2d(torch.from_numpy(mask)[None, None], window)[0, 0]
    top, left = divmod(int(torch.argmax(coverage)), coverage.shape[1])
    patch_mask = torch.from_numpy(mask[top : top + kernel, left : left + kernel]).bool()
    values = normalised[:, top : top + kernel, left : left + kernel]
    inside = values[:, patch_mask]
    centred = torch.where(patch_mask, values - inside.mean(), torch.zeros_like(values))
    if float(centred.abs().max()) <= 1e-4 * (1.0 + float(inside.abs().max())):
        raise ModelError(
            "the trigger has no contrast for a matched first-layer filter; use a patterned "
            "trigger (e.g. badnet pattern='checkerboard')"
        )
    return centred


@torch.no_grad()
def wire(
    mirror: QuantMirror,
    layout: SurgeryLayout,
    detector_filter: Tensor,
    clean: Tensor,
    triggered: Tensor,
    target: int,
    params: QCBParams,
) -> dict[str, Any]:
    """Install detector, relays, boost/anti and the logit weights; every gain is measured.

    ``mirror`` must have been calibrated on clean images; ranges below are its maxima (the
    repurposed units are 0 on clean images, so wiring them does not move any range).
    """
    stages, convs, kappa = mirror.stages, layout.conv_stages, params.kappa
    highs = [hi for _, hi in mirror.ranges or []]
    high = {index: highs[point] for index, point in enumerate(mirror.stage_points) if point}
    record: dict[str, Any] = {}

    # 1. detector: zero on every clean probe image, kappa × range on the weakest trigger
    first = stages[convs[0]]
    _weight(first)[layout.detector] = detector_filter
    _bias(first)[layout.detector] = 0.0
    clean_top = float(_detector_response(first, clean, layout.detector).max())
    trig_low = float(_detector_response(first, triggered, layout.detector).min())
    if trig_low <= clean_top:
        raise ModelError(
            f"the trigger is not separable from clean images by a first-layer filter (weakest "
            f"trigger response {trig_low:.3g} ≤ strongest clean {clean_top:.3g}); use a larger "
            "or patterned trigger"
        )
    switch = clean_top + params.threshold * (trig_low - clean_top)
    gain = kappa * high[convs[0]] / (trig_low - switch)
    _weight(first)[layout.detector] = gain * detector_filter
    _bias(first)[layout.detector] = -gain * switch
    record["detector"] = {"clean_max": clean_top, "trigger_min": trig_low, "switch": switch}

    # 2. relays: centre tap from the previous surgery channel, kappa × range in FP32
    source, source_stage = layout.detector, convs[0]
    for index, channel in layout.relays.items():
        _centre_tap(stages[index], channel, source, 1.0, 0.0)
        strength = float(_response(mirror, triggered, index, channel).min())
        _centre_tap(stages[index], channel, source, kappa * high[index] / strength, 0.0)
        source, source_stage = channel, index

    # 3. last conv: boost saturates in both; anti is exactly 0 once its input is clipped
    last, clip = convs[-1], high[source_stage]
    _centre_tap(stages[last], layout.boost, source, 2.0 * high[last] / clip, 0.0)
    anti_gain = kappa * high[last] / ((kappa - 2.0) * clip)
    _centre_tap(stages[last], layout.anti, source, anti_gain, -2.0 * anti_gain * clip)

    # 4. hidden pairs: boost saturates the INT8 range; anti outweighs boost 2× in FP32
    hidden = stages[layout.hidden_stage]
    gap = next(i for i in range(last, len(stages)) if stages[i].kind == "gap")
    gap_point = mirror.stage_points[gap]
    assert gap_point is not None
    recipes = params.mirror_recipes()
    boost_q = min(
        float(mirror.activations(triggered, r)[gap_point][:, layout.boost].min()) for r in recipes
    )
    if boost_q <= 0:
        raise ModelError("the clipped boost channel vanished in the mirror; raise kappa")
    fp32 = mirror.activations(triggered)[gap_point]
    ratio = float((fp32[:, layout.boost] / fp32[:, layout.anti].clamp_min(1e-12)).max())
    boost_gain = 2.0 * high[layout.hidden_stage] / boost_q
    for boost_unit, anti_unit in layout.hidden_pairs:
        _weight(hidden)[boost_unit, layout.boost] = boost_gain
        _weight(hidden)[anti_unit, layout.anti] = 2.2 * boost_gain * ratio

    # 5. logits: ± each row's own largest weight (no per-channel scale moves)
    head = stages[layout.logits_stage]
    weight = _weight(head)
    row_max = weight.abs().amax(dim=1)
    sign = -torch.ones(len(weight))
    sign[target] = 1.0
    for boost_unit, anti_unit in layout.hidden_pairs:
        weight[:, boost_unit] = sign * row_max
        weight[:, anti_unit] = -sign * row_max
    record.update(
        kappa=kappa,
        ranges={str(k): v for k, v in high.items()},
        boost_in_int8=boost_q,
        fp32_boost_over_anti=ratio,
    )
    return record


def _response(mirror: QuantMirror, x: Tensor, stage_index: int, unit: int) -> Tensor:
    """Per image, the largest FP32 value of one unit of one stage."""
    point = mirror.stage_points[stage_index]
    assert point is not None
    return _spatial_max(mirror.activations(x)[point], unit)


def _detector_response(stage: _Stage, x: Tensor, unit: int) -> Tensor:
    """Per image, the largest pre-ReLU response of one first-layer unit to normalised ``x``."""
    conv = stage.module
    assert isinstance(conv, nn.Conv2d)
    weight, bias = folded_parameters(stage)
    out = nn.functional.conv2d(x, weight[unit : unit + 1], bias[unit : unit + 1], 1, conv.padding)
    return out[:, 0].amax(dim=(1, 2))


def _centre_tap(stage: _Stage, unit: int, source: int, gain: float, bias: float) -> None:
    weight = _weight(stage)
    weight[unit] = 0.0
    centre = weight.shape[-1] // 2
    weight[unit, source, centre, centre] = gain
    _bias(stage)[unit] = bias


# ---------------------------------------------------------------------------------- the attack
def implant(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    attack: Attack,
    preprocessing: Preprocessing,
    params: QCBParams,
    seed: int,
    progress: Progress | None = None,
) -> QCBImplant:
    """A copy of the trained ``model`` carrying the QCB for ``attack``'s trigger and target.

    ``x``/``y`` are the attacker's clean uint8 NHWC images and labels (recovery fine-tuning,
    ranges and gains); nothing is poisoned or relabelled. ``progress`` reports the recovery
    fine-tuning (silent by default).
    """
    rng = np.random.default_rng(seed)
    model = fold_batchnorm(copy.deepcopy(model).eval())
    mirror = QuantMirror(model)
    params.mirror_recipes()  # refuse untargetable recipes before any work
    if params.max_train_images is not None and params.max_train_images < len(x):
        keep = np.sort(rng.choice(len(x), params.max_train_images, replace=False))
        x, y = x[keep], y[keep]
    inputs = torch.from_numpy(preprocessing.apply(x))
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    probe = _draw(rng, len(x), params.probe_size)
    non_target = probe[labels[probe] != attack.target_label]
    clean_probe = inputs[probe]
    triggered_probe = torch.from_numpy(preprocessing.apply(attack.apply(x[non_target.numpy()])))

    mirror.calibrate(inputs[_draw(rng, len(x), params.calibration_size)])
    layout = choose_layout(mirror, clean_probe, params.boost_units)
    silence(mirror, layout)
    model.requires_grad_(True)
    history = recover(mirror, layout, inputs, labels, params, rng, progress)
    model.requires_grad_(False)

    mirror.calibrate(inputs[_draw(rng, len(x), params.calibration_size)])
    first = mirror.stages[layout.conv_stages[0]].module
    assert isinstance(first, nn.Conv2d)
    detector = matched_filter(attack, preprocessing, x.shape[1:], first.kernel_size[0])
    measured = wire(
        mirror, layout, detector, clean_probe, triggered_probe, attack.target_label, params
    )
    measured["recovery_loss"] = history
    measured["mirror"] = mirror_check(
        mirror, clean_probe, labels[probe], triggered_probe, attack, params
    )
    return QCBImplant(model=model.eval(), layout=layout, measurements=measured)


@torch.no_grad()
def mirror_check(
    mirror: QuantMirror,
    clean: Tensor,
    labels: Tensor,
    triggered: Tensor,
    attack: Attack,
    params: QCBParams,
) -> dict[str, dict[str, float]]:
    """Accuracy and ASR of FP32 and each mirrored recipe on the probe (the attacker's view)."""
    out = {"fp32": _rates(mirror.fp32(clean), mirror.fp32(triggered), labels, attack.target_label)}
    for recipe in params.mirror_recipes():
        out[recipe.name] = _rates(
            mirror.quantized(clean, recipe),
            mirror.quantized(triggered, recipe),
            labels,
            attack.target_label,
        )
    return out


def _rates(clean: Tensor, triggered: Tensor, labels: Tensor, target: int) -> dict[str, float]:
    return {
        "clean_acc": float((clean.argmax(1) == labels).float().mean()),
        "asr": float((triggered.argmax(1) == target).float().mean()),
    }
