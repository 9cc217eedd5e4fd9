"""One evaluation path: the draws, the metrics and the defense loop every caller shares.

The runner, the QCB pipeline, the vendor audit, ``blindspots evaluate`` and the benches all
measure deployed artifacts the same way, so they call the functions here instead of keeping
their own copies. Copies drift: before this module existed the audit drew its calibration images
*with* replacement, QCB cells dropped the defenses' per-sample scores and fine-tuned on a
hard-coded 500 images, and the benches rebuilt the runner's held-out split by hand.

What lives here, in the order a cell needs it:

* **Draws** — every random subset is a seeded draw *without* replacement from its own named
  stream (:func:`harness.core.sampling.stable_seed`), sorted, so two callers asking for the same
  thing get the same images and adding a draw never shifts another one.
* **Test and defense sets** — the test images for accuracy and attack success, the defenses'
  held-out clean pool, the triggered pool (disjoint from the clean one), Fine-Pruning's
  fine-tuning images and the AC/SS training subset.
* **A cell's defense data** — :func:`cell_defense_data` turns those sets, the cell's repair
  (Fine-Pruning's retrainer), its FP32 reference and the label fan-out into the
  :class:`~defenses.base.DefenseData` every defense reads; runner, QCB, audit, ``evaluate`` and
  the benches build it here, not by hand.
* **Metrics** — clean accuracy, attack success and top-1 agreement with the FP32 file
  (:func:`measure` runs the model; :func:`prediction_metrics` scores predictions already made).
* **Defenses** — each defense built from its name and parameters and run with its own seeded
  generator; results become JSON fields plus arrays for the store.
* **A cell** — :func:`evaluate_artifact`: metrics, defenses and, where this host's INT8 kernels
  differ from int32-exact arithmetic, the same cell rerun under the host's kernels.

Writing results is the callers' business (the store, ``audit.json``): this module computes and
returns, so a worker process can evaluate a cell and hand the record back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from defenses.base import DefenseData, DefenseResult, build_defense
from defenses.deployed import DeployedModel
from defenses.fanout import LabelMap
from harness.core.kernel_profiles import KernelProfile
from harness.core.metrics import accuracy, agreement, attack_success_rate
from harness.core.sampling import stable_seed
from harness.data.base import ImageDataset
from harness.pipeline.retrain import FinePruneRetrainer
from harness.runtime.adapter import RuntimeAdapter
from harness.runtime.kernels import other_profile, probe_host, profile_record

Log = Callable[[str], None]

DRIFT_DEFENSE_KEYS = (
    "status",
    "verdict",
    "verdict_reason",
    "detected",
    "score",
    "score_name",
    "flagged_labels",
    "reason",
)
"""What a kernel-drift rerun keeps of each defense result: the decision, not its arrays."""


# ----------------------------------------------------------------------------------- draws
def seeded_subset(n: int, size: int, *stream: object) -> np.ndarray:
    """``min(size, n)`` distinct indices of ``range(n)``, sorted, drawn from a named stream."""
    rng = np.random.default_rng(stable_seed(*stream))
    return np.sort(rng.choice(n, size=min(size, n), replace=False))


def calibration_draw(images: np.ndarray, size: int, seed: int, stream: str = "calibration"):
    """The images a quantizer calibrates on: distinct, clean, drawn per seed.

    Without replacement: a duplicated image weighs twice in the activation ranges and one fewer
    distinct image is seen (the audit drew with replacement until the paths were merged).
    """
    return images[seeded_subset(len(images), size, stream, seed)]


def defense_split(n_test: int, clean_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Test-set indices given to defenses as held-out clean images, and the rest (sorted).

    At most half the test set goes to the pool, so the triggered pool drawn from the rest is
    never empty.
    """
    order = np.random.default_rng(stable_seed("defense-split", seed)).permutation(n_test)
    size = min(clean_size, n_test // 2)
    return np.sort(order[:size]), np.sort(order[size:])


# ------------------------------------------------------------------------------ evaluation sets
@dataclass(frozen=True)
class EvaluationImages:
    """The images accuracy and attack success are measured on."""

    x: np.ndarray
    y: np.ndarray
    triggered: np.ndarray
    """``x`` without the target class, stamped with the trigger."""
    target_label: int


@dataclass(frozen=True)
class DefensePools:
    """The defender's images of one seed, shared by every cell of that seed."""

    clean_x: np.ndarray
    clean_y: np.ndarray
    triggered_x: np.ndarray
    """Held-out non-target test images stamped with the trigger, disjoint from ``clean_x``."""
    tune_x: np.ndarray
    tune_y: np.ndarray
    """Fine-Pruning's fine-tuning images (see :func:`defense_pools` for where they come from)."""
    tune_idx: np.ndarray
    """Indices of the fine-tuning images in the split ``tune_source`` names."""
    tune_source: Literal["held_out", "training"]


def evaluation_images(
    dataset: ImageDataset, attack: Any, eval_limit: int | None = None
) -> EvaluationImages:
    """The test split (its first ``eval_limit`` images) and its triggered copy."""
    x, y = dataset.x_test, dataset.y_test
    if eval_limit is not None:
        x, y = x[:eval_limit], y[:eval_limit]
    triggered, _ = attack.triggered_test_set(x, y)
    return EvaluationImages(x, y, triggered, attack.target_label)


def defense_pools(
    dataset: ImageDataset,
    attack: Any,
    seed: int,
    clean_size: int,
    poison_mask: np.ndarray | None = None,
    tune_size: int | None = None,
) -> DefensePools:
    """Held-out clean and triggered pools and Fine-Pruning's fine-tuning draw of one seed.

    Fine-tuning images (``tune_size``, by default ``clean_size``) are, as the paper and
    docs/protocol.md v1 (§4.5) have it, *held-out* clean test images the defender holds:
    disjoint from the clean pool every defense measures on and from the images whose triggered
    copies measure attack success. Where the test split cannot spare that many (the embedded
    digits set), they are clean *training* images instead (``poison_mask`` marks the others),
    and ``tune_source`` says so — Fine-Pruning records it as a deviation.
    """
    pool, rest = defense_split(len(dataset.x_test), clean_size, seed)
    rest_nontarget = rest[dataset.y_test[rest] != attack.target_label]
    stamped = rest_nontarget[:clean_size]
    tune_size = clean_size if tune_size is None else tune_size
    spare = np.setdiff1d(rest, stamped)
    source: Literal["held_out", "training"]
    if len(spare) >= tune_size:
        source = "held_out"
        tune = spare[seeded_subset(len(spare), tune_size, "finetune", seed)]
        tune_x, tune_y = dataset.x_test[tune], dataset.y_test[tune]
    else:
        source = "training"
        clean_train = (
            np.arange(len(dataset.x_train)) if poison_mask is None else np.flatnonzero(~poison_mask)
        )
        tune = clean_train[seeded_subset(len(clean_train), tune_size, "finetune", seed)]
        tune_x, tune_y = dataset.x_train[tune], dataset.y_train[tune]
    return DefensePools(
        clean_x=dataset.x_test[pool],
        clean_y=dataset.y_test[pool],
        triggered_x=attack.apply_for_test(dataset.x_test[stamped]),
        tune_x=tune_x,
        tune_y=tune_y,
        tune_idx=tune,
        tune_source=source,
    )


def defense_training_subset(n_train: int, size: int | None, seed: int) -> np.ndarray | None:
    """Indices of the training images AC / SS analyse, or ``None`` for all of them."""
    if size is None or size >= n_train:
        return None
    return seeded_subset(n_train, size, "defense-train", seed)


@dataclass(frozen=True)
class TrainingImages:
    """The training images AC / SS analyse, as the model saw them (possibly poisoned)."""

    x: np.ndarray
    y: np.ndarray
    poison_mask: np.ndarray | None = None
    """Ground truth over ``x`` where it is known (the runner's poisoning); ``None`` otherwise."""


def defense_training_images(
    x: np.ndarray,
    y: np.ndarray,
    size: int | None,
    seed: int,
    poison_mask: np.ndarray | None = None,
) -> TrainingImages:
    """``x``/``y`` (and the mask) cut to :func:`defense_training_subset`'s seeded draw."""
    keep = defense_training_subset(len(x), size, seed)
    if keep is None:
        return TrainingImages(x, y, poison_mask)
    return TrainingImages(x[keep], y[keep], None if poison_mask is None else poison_mask[keep])


# --------------------------------------------------------------------- a cell's defense data
@dataclass(frozen=True)
class CellRepair:
    """What Fine-Pruning's repair of one cell needs besides the fine-tuning images.

    The checkpoint it fine-tunes and how the repaired model ships again: the cell's own
    precision, calibration images and INT8 kernels. The repaired files are written in
    ``fine_pruned/`` beside the cell's artifact.
    """

    state_path: Path
    artifact_path: Path
    precision: str
    calibration_images: np.ndarray
    epochs: int
    seed: int
    threads: int | None
    kernel_profile: KernelProfile


def cell_defense_data(
    num_classes: int,
    held_out: DefensePools | tuple[np.ndarray, np.ndarray],
    *,
    training: TrainingImages | None = None,
    target_label: int | None = None,
    poison_rate: float | None = None,
    repair: CellRepair | None = None,
    reference: DeployedModel | None = None,
    label_map: LabelMap | None = None,
    progress: Callable[[str], None] | None = None,
) -> DefenseData:
    """The :class:`~defenses.base.DefenseData` of one cell: every caller builds it here.

    ``held_out``: a seed's :class:`DefensePools` (clean and triggered pools, and Fine-Pruning's
    fine-tuning images), or a clean ``(x, y)`` sample alone where no trigger is known (the
    audit). ``training``: what AC / SS analyse, ``None`` where nobody knows what the model was
    trained on. ``repair``: Fine-Pruning's retrainer is built from it and the pools' fine-tuning
    images (it needs pools). ``reference``: the FP32 file the artifact was made from, ``None``
    when the artifact is that file. ``label_map``: where Neural Cleanse's per-label tasks run
    (``None``: in this process). ``progress``: where a long defense reports how far it is
    (the audit passes its log; sweeps leave it silent, one line per cell is enough there).
    """
    if isinstance(held_out, DefensePools):
        clean_x, clean_y, triggered_x = held_out.clean_x, held_out.clean_y, held_out.triggered_x
    else:
        (clean_x, clean_y), triggered_x = held_out, None
    retrainer = None
    if repair is not None:
        if not isinstance(held_out, DefensePools):
            raise ValueError("a repair fine-tunes on the pools' held-out images: pass the pools")
        retrainer = FinePruneRetrainer(
            state_path=repair.state_path,
            precision=repair.precision,
            clean_x=held_out.tune_x,
            clean_y=held_out.tune_y,
            calibration_images=repair.calibration_images,
            out_dir=repair.artifact_path.parent / "fine_pruned",
            epochs=repair.epochs,
            seed=repair.seed,
            threads=repair.threads,
            kernel_profile=repair.kernel_profile,
            source_indices=held_out.tune_idx,
            data_source=held_out.tune_source,
        )
    return DefenseData(
        num_classes=num_classes,
        clean_x=clean_x,
        clean_y=clean_y,
        train_x=None if training is None else training.x,
        train_y=None if training is None else training.y,
        poison_mask=None if training is None else training.poison_mask,
        triggered_x=triggered_x,
        target_label=target_label,
        poison_rate=poison_rate,
        retrainer=retrainer,
        reference=reference,
        label_map=label_map,
        progress=progress,
    )


# ----------------------------------------------------------------------------------- metrics
def measure(
    adapter: RuntimeAdapter,
    tests: EvaluationImages,
    reference_predictions: np.ndarray | None,
) -> dict[str, float]:
    """Clean accuracy, attack success and top-1 agreement with the FP32 file of one artifact.

    Agreement is left out when there is no FP32 file to agree with (a vendor file on its own).
    """
    return prediction_metrics(
        adapter.predict(tests.x),
        tests.y,
        reference_predictions,
        triggered_predictions=adapter.predict(tests.triggered),
        target_label=tests.target_label,
    )


def prediction_metrics(
    predictions: np.ndarray,
    labels: np.ndarray,
    reference_predictions: np.ndarray | None = None,
    *,
    triggered_predictions: np.ndarray | None = None,
    target_label: int | None = None,
) -> dict[str, float]:
    """:func:`measure`'s numbers from predictions already made.

    ``clean_acc`` always; ``asr`` where triggered predictions and a target are given;
    ``agreement_fp32`` (top-1 agreement) where there are reference predictions. The audit
    scores the predictions of its sanity check with it, and has no trigger.
    """
    measured = {"clean_acc": accuracy(predictions, labels)}
    if triggered_predictions is not None and target_label is not None:
        measured["asr"] = attack_success_rate(triggered_predictions, target_label)
    if reference_predictions is not None:
        measured["agreement_fp32"] = agreement(predictions, reference_predictions)
    return measured


# ---------------------------------------------------------------------------------- defenses
@dataclass(frozen=True)
class DefensePlan:
    """Which defenses a cell runs, with which parameters, under which seed."""

    names: Sequence[str]
    params: Mapping[str, Mapping[str, Any]]
    seed: int


def run_defense(
    name: str,
    params: Mapping[str, Any] | None,
    seed: int,
    adapter: Any,
    data: DefenseData,
) -> DefenseResult:
    """One defense on one model, with the generator every caller derives from (name, seed)."""
    defense = build_defense(name, dict(params or {}))
    return defense.run(adapter, data, np.random.default_rng(stable_seed("defense", name, seed)))


def run_defenses(
    plan: DefensePlan, adapter: Any, data: DefenseData, cell: str, log: Log
) -> dict[str, DefenseResult]:
    """Every defense of ``plan`` on one model, logged as it finishes."""
    results: dict[str, DefenseResult] = {}
    for name in plan.names:
        result = run_defense(name, plan.params.get(name), plan.seed, adapter, data)
        shown = result.status if result.status != "ok" else f"verdict={result.verdict}"
        log(f"{cell} {name}: {shown} ({result.wall_time_s:.1f}s)")
        results[name] = result
    return results


def result_fields(
    results: Mapping[str, DefenseResult],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Defense results as JSON fields plus the arrays the store keeps beside them.

    Per-sample scores are kept for every caller: the report's ROC curves and any later
    re-thresholding read them, and a cell without them cannot be re-analysed.
    """
    fields: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for name, result in results.items():
        fields[name] = json.loads(result.model_dump_json())
        if result.per_sample_scores is not None:
            arrays[f"{name}.per_sample_scores"] = np.asarray(result.per_sample_scores)
        for key, value in result.arrays.items():
            arrays[f"{name}.{key}"] = np.asarray(value)
    return fields, arrays


# ------------------------------------------------------------------------------------ a cell
@dataclass(frozen=True)
class ArtifactEvaluation:
    """What :func:`evaluate_artifact` measured: record fields and arrays for the store."""

    fields: dict[str, Any]
    arrays: dict[str, np.ndarray]


def evaluate_artifact(
    adapter: RuntimeAdapter,
    tests: EvaluationImages,
    reference_predictions: np.ndarray | None,
    data: DefenseData,
    plan: DefensePlan,
    cell: str,
    log: Log,
    *,
    both_profiles: bool = False,
) -> ArtifactEvaluation:
    """One deployed artifact: metrics, every planned defense, and the host-kernel rerun.

    ``adapter`` runs under the cell's INT8 kernel profile. Where this host's default kernels
    compute something else than int32-exact arithmetic (:func:`probe_host`), a quantized cell is
    measured and its defenses rerun under the other profile too (``kernel_drift``): the numbers
    a user of this CPU would see. ``both_profiles`` also records the metrics under both profiles
    in ``profiles`` for every cell (the QCB's acceptance table reads them).
    ``reference_predictions``: the FP32 file's, or ``None`` where there is none to agree with
    (``blindspots evaluate`` of a file on its own).
    """
    started = time.perf_counter()
    fields: dict[str, Any] = dict(measure(adapter, tests, reference_predictions))
    fields.update(
        n_test=len(tests.y),
        n_triggered=len(tests.triggered),
        per_sample_inference=adapter.runs_per_sample(None),
        kernels=profile_record(adapter.kernel_profile),
        timings={"evaluate_s": time.perf_counter() - started},
    )
    other: RuntimeAdapter | None = None
    if both_profiles:
        other = adapter.under_profile(other_profile(adapter.kernel_profile))
        fields["profiles"] = {
            adapter.kernel_profile: {
                k: fields[k] for k in ("clean_acc", "asr", "agreement_fp32") if k in fields
            },
            other.kernel_profile: measure(other, tests, reference_predictions),
        }
    results = run_defenses(plan, adapter, data, cell, log)
    fields["defenses"], arrays = result_fields(results)
    if adapter.precision != "fp32" and probe_host().profiles_differ:
        other = other or adapter.under_profile(other_profile(adapter.kernel_profile))
        fields["kernel_drift"] = kernel_drift(
            other, tests, reference_predictions, data, plan, cell, log
        )
    return ArtifactEvaluation(fields, arrays)


def kernel_drift(
    adapter: RuntimeAdapter,
    tests: EvaluationImages,
    reference_predictions: np.ndarray | None,
    data: DefenseData,
    plan: DefensePlan,
    cell: str,
    log: Log,
) -> dict[str, Any]:
    """The same cell under another INT8 kernel profile: what this host's kernels change.

    Only worth calling where the host's default kernels differ from int32-exact arithmetic;
    elsewhere both profiles compute identical numbers. A Fine-Pruning repair ships under the
    profile too, so its retrainer is switched along.
    """
    profile: KernelProfile = adapter.kernel_profile
    drift: dict[str, Any] = {"kernels": profile_record(profile)}
    drift.update(measure(adapter, tests, reference_predictions))
    if isinstance(data.retrainer, FinePruneRetrainer):
        data = replace(data, retrainer=replace(data.retrainer, kernel_profile=profile))
    results = run_defenses(plan, adapter, data, f"{cell}@{profile}", log)
    fields, _ = result_fields(results)
    drift["defenses"] = {
        name: {key: result.get(key) for key in DRIFT_DEFENSE_KEYS}
        for name, result in fields.items()
    }
    return drift
