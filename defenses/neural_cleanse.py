"""Neural Cleanse (Wang et al., IEEE S&P 2019): reverse-engineer a trigger per label, flag outliers.

For every label the defense searches the smallest pixel-space trigger (a mask ``m`` in [0, 1]
over H×W and a pattern ``p`` in [0, 255] over H×W×C) that sends clean images to that label when
stamped as ``x' = (1 - m)·x + m·p``. A backdoor target needs a much smaller mask than a clean
label, so the L1 norms of the best masks are screened with the median absolute deviation.

Fidelity to the authors' released optimiser (``visualizer.py``), because the cost schedule is
what makes the norms comparable across labels:

- mask and pattern live in tanh space (``m = tanh(a)/(2-ε)+0.5``,
  ``p = (tanh(b)/(2-ε)+0.5)·255``), so every stamped image stays in range without clipping;
- loss = cross-entropy(target) + cost·L1(mask), Adam(lr 0.1, betas 0.5/0.9), random init;
- one *step* is one pass over ``n_samples`` clean images in mini-batches of ``batch_size``;
- cost starts at 0, is set to ``init_cost`` after ``patience`` steps with attack success ≥ 0.99,
  then multiplied by 2 after ``patience`` successful steps and divided by 2**1.5 after
  ``patience`` failing ones; the smallest-norm mask seen at a successful step is kept; a label
  stops early after ``5·patience`` steps without a norm improvement once its cost has moved
  both up and down.

What differs: all labels are optimised in one batched pass (a leading label dimension on the
mask/pattern tensors, a per-label cost vector), since on a small model the per-call overhead
dominates and labels are independent (Adam is element-wise, the loss a sum over labels). The
per-label loss is ``mean CE + cost·L1``; the authors' Keras loss is the batch *sum* of
``CE + cost·L1``, i.e. the same objective scaled by the batch size, to which Adam is invariant. The
gradients come from :meth:`~harness.adapter.RuntimeAdapter.gradient_oracle`, a torch replica of
the deployed ONNX graph (quantized arithmetic included). The replica must agree with
onnxruntime (parity gate) or the cell is ``not_applicable`` — an FP32 surrogate would audit a
different model. Each reversed trigger's attack success is re-measured on the onnxruntime
session itself, on clean images the optimiser never saw.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from defenses.base import (
    DEFENSES,
    Defense,
    DefenseData,
    Finding,
    Group,
    Need,
    NotApplicable,
    label_verdict,
)
from harness.errors import DataError, ModelError

MAD_CONSISTENCY = 1.4826
"""Scales the MAD to the standard deviation of a normal distribution (the paper's constant)."""

TANH_EPSILON = 1e-7
"""Keras' ``K.epsilon()``, which the authors' tanh parametrisation divides by ``2 - ε``."""


class NeuralCleanseParams(BaseModel):
    """Defaults are the authors' GTSRB settings; the harness lowers the budgets on CPU."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1000, ge=1, description="optimisation steps (passes over n_samples)")
    batch_size: int = Field(32, ge=1)
    n_samples: int = Field(1000, ge=1, description="clean images the optimiser uses")
    n_eval: int = Field(
        500, ge=1, description="held-out clean images for the onnxruntime attack-success check"
    )
    lr: float = Field(0.1, gt=0)
    beta1: float = Field(0.5, ge=0, lt=1)
    beta2: float = Field(0.9, ge=0, lt=1)
    init_cost: float = Field(1e-3, gt=0)
    attack_success_threshold: float = Field(0.99, gt=0, le=1)
    patience: int = Field(5, ge=1)
    cost_multiplier: float = Field(2.0, gt=1)
    early_stop: bool = True
    early_stop_threshold: float = Field(1.0, gt=0)
    early_stop_patience: int | None = Field(
        None, ge=1, description="steps without improvement before stopping; 5·patience if unset"
    )
    anomaly_threshold: float = Field(2.0, gt=0)
    parity_samples: int = Field(256, ge=1)
    parity_threshold: float = Field(0.995, gt=0, le=1)
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads while optimising (restored afterwards)"
    )


def mad_anomaly_index(norms: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``|norm - median| / (1.4826·MAD)`` per label, with the median and the scaled MAD.

    A zero MAD (more than half the norms identical) makes any deviating label infinitely
    anomalous and the others 0, instead of dividing by zero.
    """
    norms = np.asarray(norms, dtype=np.float64)
    median = float(np.median(norms))
    deviation = np.abs(norms - median)
    mad = MAD_CONSISTENCY * float(np.median(deviation))
    if mad > 0:
        return deviation / mad, median, mad
    return np.where(deviation > 0, np.inf, 0.0), median, mad


def flag_small_norm_outliers(norms: np.ndarray, threshold: float = 2.0) -> list[int]:
    """Labels whose norm lies below the median with an anomaly index above ``threshold``.

    Only small norms matter: an infected label is one that is *easy* to reach.
    """
    norms = np.asarray(norms, dtype=np.float64)
    index, median, _ = mad_anomaly_index(norms)
    return [int(k) for k in np.flatnonzero((norms < median) & (index > threshold))]


@dataclass
class ReversedTriggers:
    """Per-label outcome of the batched optimisation (leading dimension = label)."""

    masks: np.ndarray  # (L, H, W) in [0, 1]
    patterns: np.ndarray  # (L, H, W, C) in [0, 255]
    norms: np.ndarray  # (L,) L1 norm of each mask
    reached: np.ndarray  # (L,) bool: a mask reached the attack-success threshold
    replica_success: np.ndarray  # (L,) replica attack success of the step the mask was kept at
    steps_run: np.ndarray  # (L,) steps before early stop (or the budget)
    final_cost: np.ndarray  # (L,)


class _CostSchedule:
    """The authors' per-label cost / early-stop state machine, vectorised over labels."""

    def __init__(self, labels: int, p: NeuralCleanseParams) -> None:
        self.p = p
        self.up = p.cost_multiplier
        self.down = p.cost_multiplier**1.5
        self.es_patience = p.early_stop_patience or 5 * p.patience
        self.cost = np.zeros(labels)
        self.set_counter = np.zeros(labels, dtype=int)
        self.up_counter = np.zeros(labels, dtype=int)
        self.down_counter = np.zeros(labels, dtype=int)
        self.up_flag = np.zeros(labels, dtype=bool)
        self.down_flag = np.zeros(labels, dtype=bool)
        self.es_counter = np.zeros(labels, dtype=int)
        self.es_best = np.full(labels, np.inf)

    def update(self, active: np.ndarray, success: np.ndarray, reg_best: np.ndarray) -> np.ndarray:
        """Advance the labels in ``active`` by one step; return the labels that stop now."""
        p = self.p
        stop = np.zeros_like(active)
        if p.early_stop:
            found = active & np.isfinite(reg_best)
            stalled = reg_best >= p.early_stop_threshold * self.es_best
            self.es_counter = np.where(
                found, np.where(stalled, self.es_counter + 1, 0), self.es_counter
            )
            self.es_best = np.where(active, np.minimum(reg_best, self.es_best), self.es_best)
            stop = active & self.up_flag & self.down_flag & (self.es_counter >= self.es_patience)
        live = active & ~stop

        waiting = live & (self.cost == 0) & success
        self.set_counter = np.where(
            waiting, self.set_counter + 1, np.where(live, 0, self.set_counter)
        )
        start = waiting & (self.set_counter >= p.patience)
        self.cost[start] = p.init_cost
        self.up_counter[start] = 0
        self.down_counter[start] = 0
        self.up_flag[start] = False
        self.down_flag[start] = False

        self.up_counter = np.where(live, np.where(success, self.up_counter + 1, 0), self.up_counter)
        self.down_counter = np.where(
            live, np.where(success, 0, self.down_counter + 1), self.down_counter
        )
        raise_cost = live & (self.up_counter >= p.patience)
        lower_cost = live & ~raise_cost & (self.down_counter >= p.patience)
        self.up_counter[raise_cost] = 0
        self.cost[raise_cost] *= self.up
        self.up_flag |= raise_cost
        self.down_counter[lower_cost] = 0
        self.cost[lower_cost] /= self.down
        self.down_flag |= lower_cost
        return stop


REPLICA_CHUNK_IMAGES = 128
"""Images per replica forward/backward; much larger chunks spill the CPU cache (2-3x slower)."""


def _from_tanh(param: torch.Tensor) -> torch.Tensor:
    """Map unconstrained parameters into [0, 1] (the authors' tanh box constraint).

    In float32, ``tanh = -1`` gives ``-1/(2-ε) + 0.5 ≈ -6e-8``: clamp so masks and patterns are
    valid images exactly (the clamp is inactive everywhere else and passes gradients there).
    """
    return (torch.tanh(param) / (2 - TANH_EPSILON) + 0.5).clamp(0.0, 1.0)


def _to_tanh(unit: torch.Tensor) -> torch.Tensor:
    return torch.atanh((unit - 0.5) * (2 - TANH_EPSILON))


def stamp(x: np.ndarray | torch.Tensor, mask, pattern):
    """``(1 - mask)·x + mask·pattern`` for NHWC pixels, an (H, W) mask and (H, W, C) pattern."""
    return (1 - mask[..., None]) * x + mask[..., None] * pattern


def reverse_engineer(
    logits_fn,
    images: np.ndarray,
    num_classes: int,
    params: NeuralCleanseParams,
    generator: torch.Generator,
) -> ReversedTriggers:
    """Run the authors' optimisation for every label at once.

    ``logits_fn`` maps a float NHWC tensor of pixels in [0, 255] to differentiable logits.
    """
    n, h, w, c = images.shape
    labels = num_classes
    x_all = torch.from_numpy(images.astype(np.float32))
    mask_param = _to_tanh(torch.rand((labels, h, w), generator=generator, dtype=torch.float64))
    pattern_param = _to_tanh(
        torch.rand((labels, h, w, c), generator=generator, dtype=torch.float64)
    )
    mask_param = mask_param.float().requires_grad_(True)
    pattern_param = pattern_param.float().requires_grad_(True)
    optimizer = torch.optim.Adam(
        [mask_param, pattern_param], lr=params.lr, betas=(params.beta1, params.beta2)
    )
    schedule = _CostSchedule(labels, params)
    active = np.ones(labels, dtype=bool)
    reg_best = np.full(labels, np.inf)
    best_mask = np.zeros((labels, h, w), dtype=np.float32)
    best_pattern = np.zeros((labels, h, w, c), dtype=np.float32)
    best_success = np.zeros(labels)
    steps_run = np.zeros(labels, dtype=int)

    for _ in range(params.steps):
        idx = torch.from_numpy(np.flatnonzero(active))
        a = len(idx)
        cost = torch.from_numpy(schedule.cost[active]).float()
        order = torch.randperm(n, generator=generator)
        hits = torch.zeros(a, dtype=torch.float64)
        reg_sum = torch.zeros(a, dtype=torch.float64)
        for start in range(0, n, params.batch_size):
            batch = x_all[order[start : start + params.batch_size]]
            b = len(batch)
            optimizer.zero_grad(set_to_none=True)
            # Labels own disjoint rows of the parameters, so their gradients can be accumulated
            # chunk by chunk: replica activations stay cache-sized (2-2.5x faster per step than
            # one labels x batch call), and the Adam step is the same single step as before.
            for part in torch.arange(a).split(max(1, REPLICA_CHUNK_IMAGES // b)):
                rows = idx[part]
                k = len(rows)
                mask = _from_tanh(mask_param[rows])
                pattern = _from_tanh(pattern_param[rows]) * 255.0
                stamped = stamp(batch[None], mask[:, None], pattern[:, None])  # (k, b, H, W, C)
                logits = logits_fn(stamped.reshape(k * b, h, w, c)).reshape(k, b, -1)
                targets = rows[:, None].expand(k, b)
                ce = torch.nn.functional.cross_entropy(
                    logits.reshape(k * b, -1), targets.reshape(-1), reduction="none"
                ).reshape(k, b)
                reg = mask.sum(dim=(1, 2))
                (ce.mean(dim=1) + cost[part] * reg).sum().backward()
                with torch.no_grad():
                    hits[part] += (logits.argmax(dim=2) == targets).sum(dim=1).double()
                    reg_sum[part] += reg.detach().double() * b
            optimizer.step()
        success_rate = np.zeros(labels)
        avg_reg = np.full(labels, np.inf)
        success_rate[active] = (hits / n).numpy()
        avg_reg[active] = (reg_sum / n).numpy()
        steps_run[active] += 1
        success = active & (success_rate >= params.attack_success_threshold)

        improved = success & (avg_reg < reg_best)
        if improved.any():
            with torch.no_grad():
                rows = torch.from_numpy(improved)
                best_mask[improved] = _from_tanh(mask_param[rows]).numpy()
                best_pattern[improved] = (_from_tanh(pattern_param[rows]) * 255.0).numpy()
            reg_best[improved] = avg_reg[improved]
            best_success[improved] = success_rate[improved]

        active &= ~schedule.update(active, success, reg_best)
        if not active.any():
            break

    reached = np.isfinite(reg_best)
    with torch.no_grad():  # the authors keep the last state when no mask ever succeeded
        rows = torch.from_numpy(~reached)
        best_mask[~reached] = _from_tanh(mask_param[rows]).numpy()
        best_pattern[~reached] = (_from_tanh(pattern_param[rows]) * 255.0).numpy()
    return ReversedTriggers(
        masks=best_mask,
        patterns=best_pattern,
        norms=np.abs(best_mask).sum(axis=(1, 2)).astype(np.float64),
        reached=reached,
        replica_success=best_success,
        steps_run=steps_run,
        final_cost=schedule.cost.copy(),
    )


def ort_attack_success(
    adapter: Any, images: np.ndarray, labels: np.ndarray, triggers: ReversedTriggers
) -> np.ndarray:
    """Per label, the fraction of held-out images of *other* labels the deployed session sends
    to that label once stamped with its reversed trigger (NaN when no such image exists)."""
    result = np.full(len(triggers.masks), np.nan)
    pixels = images.astype(np.float32)
    for label, (mask, pattern) in enumerate(zip(triggers.masks, triggers.patterns, strict=True)):
        others = labels != label
        if others.any():
            stamped = stamp(pixels[others], mask, pattern).astype(np.float32)
            result[label] = float((adapter.predict(stamped) == label).mean())
    return result


def _split(
    data: DefenseData, params: NeuralCleanseParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint optimisation / held-out evaluation indices into ``data.clean_x``."""
    x, y = data.clean_x, data.clean_y
    if x.ndim != 4 or len(x) < 2 or len(y) != len(x):
        raise DataError(
            f"neural_cleanse needs ≥2 clean NHWC images with one label each, got images "
            f"{x.shape} and labels {np.shape(y)}"
        )
    order = rng.permutation(len(x))
    n_eval = min(params.n_eval, len(x) // 2)
    n_opt = min(params.n_samples, len(x) - n_eval)
    return order[:n_opt], order[n_opt : n_opt + n_eval], order


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Small per-label batches gain nothing from many threads on a shared CPU; restore after."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _report_dict(report: Any) -> dict[str, Any]:
    if is_dataclass(report):
        raw = asdict(report)
    elif isinstance(report, BaseModel):
        raw = report.model_dump()
    else:
        raw = dict(vars(report))
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in raw.items()}


@DEFENSES.register("neural_cleanse")
class NeuralCleanse(Defense):
    """Trigger reverse-engineering per label + MAD outlier test on the mask norms."""

    name = "neural_cleanse"
    group = Group.MODEL_INSPECTION
    needs = frozenset({Need.LOGITS, Need.GRADIENTS})
    Params = NeuralCleanseParams
    paper = "Wang et al., Neural Cleanse, IEEE S&P 2019"

    def _run(self, adapter: Any, data: DefenseData, rng: np.random.Generator) -> Finding:
        p: NeuralCleanseParams = self.params  # type: ignore[assignment]
        opt_idx, eval_idx, order = _split(data, p, rng)
        try:
            oracle = adapter.gradient_oracle()
        except ModelError as exc:  # an op the replica cannot reproduce: no faithful gradients
            raise NotApplicable(f"no gradient oracle for this graph: {exc}") from exc
        parity_images = data.clean_x[order[: p.parity_samples]]
        parity = oracle.parity(parity_images, threshold=p.parity_threshold)
        parity_info = _report_dict(parity)
        if not parity.passed:
            raise NotApplicable(f"no faithful gradients for this graph: {parity.summary()}")

        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        with _torch_threads(p.torch_threads):
            triggers = reverse_engineer(
                oracle.logits, data.clean_x[opt_idx], data.num_classes, p, generator
            )
        ort_success = ort_attack_success(
            adapter, data.clean_x[eval_idx], data.clean_y[eval_idx], triggers
        )

        index, median, mad = mad_anomaly_index(triggers.norms)
        flagged = flag_small_norm_outliers(triggers.norms, p.anomaly_threshold)
        below = triggers.norms < median
        score = float(index[below].max()) if below.any() else 0.0
        labels = range(data.num_classes)
        scores = {f"l1_norm_label_{k}": float(triggers.norms[k]) for k in labels}
        scores |= {f"anomaly_index_label_{k}": float(index[k]) for k in labels}
        details = {
            "gradient_path": "onnx_replica",
            "parity": parity_info,
            "l1_norms": triggers.norms.tolist(),
            "anomaly_indices": index.tolist(),
            "median_norm": median,
            "mad": mad,
            "reached_attack_threshold": triggers.reached.tolist(),
            "replica_attack_success": triggers.replica_success.tolist(),
            "ort_attack_success": [None if np.isnan(v) else float(v) for v in ort_success],
            "steps_run": triggers.steps_run.tolist(),
            "final_cost": triggers.final_cost.tolist(),
            "n_optimisation_images": len(opt_idx),
            "n_eval_images": len(eval_idx),
        }
        return Finding(
            detected=label_verdict(flagged, data.target_label),
            score=score,
            score_name="max_anomaly_index_below_median",
            scores=scores,
            flagged_labels=flagged,
            threshold=p.anomaly_threshold,
            details=details,
            arrays={"masks": triggers.masks, "patterns": triggers.patterns},
        )
