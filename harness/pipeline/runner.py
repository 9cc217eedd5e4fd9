"""The experiment runner: data → attack → train → export → quantize → adapter → metrics/defenses.

It is the only stage that writes results. Each finished cell (model × precision) goes to the
:class:`~harness.pipeline.store.ResultStore` at once, so a crash loses nothing finished and a rerun
resumes. Trained weights and exported artifacts are cached under ``artifacts/<training key>``
(the key hashes everything that determines the weights), so changing only the defenses or their
parameters reuses the models.

The steps are public so a sweep (:mod:`harness.pipeline.sweep`) can run them as separate tasks on
separate workers: :func:`prepare_seed` trains and quantizes one model variant (or finds it in
the cache), :func:`evaluate_cell` computes one cell's record without writing anything. Every
record carries its content id under ``"cell"`` (:meth:`ExperimentConfig.cell_key`).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import sklearn
import torch

from defenses.base import DefenseData, build_defense
from exporters.onnx_export import export_onnx
from exporters.quantizers import cpu_isa_flags, quantize_all, sidecar_path
from harness import __version__
from harness.artifacts.preprocessing import Preprocessing
from harness.attacks.base import build_attack
from harness.core.atomic import atomic_write_json, atomic_write_text, remove_partials
from harness.core.determinism import float_kernel_record
from harness.core.errors import BlindspotsError
from harness.core.metrics import accuracy, agreement, attack_success_rate
from harness.core.progress import ProgressMode
from harness.core.runlock import RunLock
from harness.core.sampling import stable_seed
from harness.data.base import ImageDataset, load_dataset
from harness.pipeline.config import ExperimentConfig, input_fingerprint
from harness.pipeline.retrain import FinePruneRetrainer
from harness.pipeline.store import ResultStore, cell_id, read_json
from harness.runtime.adapter import RuntimeAdapter
from harness.runtime.kernels import other_profile, probe_host, profile_record
from harness.training.loop import (
    TrainConfig,
    checkpoint_meta,
    load_model,
    save_state,
    set_aside_if_corrupt,
    train_model,
)

Log = Callable[[str], None]


@dataclass
class SeedModels:
    """Everything one seed produced before evaluation."""

    seed: int
    dataset: ImageDataset
    preprocessing: Preprocessing
    attack: Any
    poisoned_x: np.ndarray
    poisoned_y: np.ndarray
    poison_mask: np.ndarray
    calibration: np.ndarray
    states: dict[bool, Path]
    artifacts: dict[bool, dict[str, Path]]
    timings: dict[bool, dict[str, float]]
    data_fingerprint: str
    fp32_predictions: dict[bool, np.ndarray] = field(default_factory=dict)
    """Per variant, computed on first use: every cell's ``agreement_fp32`` compares with it."""


@dataclass(frozen=True)
class EvaluationSets:
    """The test and defense inputs of one seed, shared by all of its cells."""

    x_test: np.ndarray
    y_test: np.ndarray
    triggered_x: np.ndarray
    defense_clean_x: np.ndarray
    defense_clean_y: np.ndarray
    defense_triggered: np.ndarray
    tune_idx: np.ndarray


def environment() -> dict[str, Any]:
    """Provenance recorded with every report: versions and the CPU's INT8 instruction sets."""

    return {
        "blindspots": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "scikit_learn": sklearn.__version__,
        "cpu_isa": cpu_isa_flags(),
        "int8_kernels": probe_host().as_dict(),
        "float_kernels": float_kernel_record(),
    }


def prepare_seed(
    config: ExperimentConfig,
    seed: int,
    out: Path,
    log: Log,
    variants: Sequence[bool] | None = None,
    *,
    data_fingerprint: str | None = None,
    progress: ProgressMode = True,
) -> SeedModels:
    """Poison, train, export and quantize — cached by training key.

    ``variants`` picks the models (True: poisoned, False: clean control); by default the
    poisoned one and, if the config asks for it, the clean control. ``progress`` reports
    training per batch (:func:`harness.core.progress.progress_for`; parallel workers use
    ``"lines"``).
    """

    dataset = load_dataset(config.dataset, config.data_root, **config.dataset_options)
    attack = build_attack(config.attack, config.attack_params)
    attack.validate_for(dataset.image_shape, dataset.num_classes)
    preprocessing = Preprocessing.from_images(dataset.x_train)
    rng = np.random.default_rng(stable_seed("poison", seed))
    poisoned = attack.poison(dataset.x_train, dataset.y_train, rng)
    calib_rng = np.random.default_rng(stable_seed("calibration", seed))
    calib_idx = calib_rng.choice(
        len(dataset.x_train), size=min(config.calibration_size, len(dataset.x_train)), replace=False
    )
    calibration = dataset.x_train[
        np.sort(calib_idx)
    ]  # clean images: the vendor calibrates on clean data

    fingerprint = data_fingerprint or input_fingerprint(config.dataset, config.data_root)
    root = out / "artifacts" / config.training_key(seed, fingerprint)
    train_cfg = TrainConfig(
        model=config.model, seed=seed, num_threads=config.threads, **config.training.model_dump()
    )
    states: dict[bool, Path] = {}
    artifacts: dict[bool, dict[str, Path]] = {}
    timings: dict[bool, dict[str, float]] = {}
    if variants is None:
        variants = [True, False] if config.clean_control else [True]
    for is_poisoned in variants:
        kind = "poisoned" if is_poisoned else "clean"
        folder = root / kind
        state = folder / "model.pt"
        timing: dict[str, float] = {}
        x, y = (poisoned.x, poisoned.y) if is_poisoned else (dataset.x_train, dataset.y_train)
        aside = set_aside_if_corrupt(state)  # a damaged cache entry is retrained, not fatal
        if aside is not None:
            log(f"seed {seed}: cached {kind} model {state} is damaged; kept as {aside.name}")
        if state.is_file():
            model, _ = load_model(state)
            log(f"seed {seed}: reusing trained {kind} model {state}")
        else:
            started = time.perf_counter()
            model = train_model(
                x,
                y,
                dataset.num_classes,
                preprocessing,
                train_cfg,
                progress=progress,
                desc=f"train {kind} s{seed}",
            )
            timing["train_s"] = time.perf_counter() - started
            meta = checkpoint_meta(
                train_cfg,
                dataset.num_classes,
                dataset.image_shape[2],
                preprocessing,
                attack=attack.describe(),
                poisoned=is_poisoned,
            )
            save_state(model, state, meta)
        exported = folder / "exported.onnx"  # the torch export every precision is made from
        started = time.perf_counter()
        if not (exported.is_file() and (folder / "export.json").is_file()):  # parity passed
            report = export_onnx(
                model,
                exported,
                dataset.x_test[:256],
                preprocessing,
                metadata={"blindspots.source": kind},
            )
            atomic_write_text(folder / "export.json", report.model_dump_json(indent=2))
        timing["export_s"] = time.perf_counter() - started
        paths, quantize_timings = quantize_all(
            exported, folder, config.precisions, calibration, reuse_existing=True
        )
        timing.update(quantize_timings)
        paths["fp32-reference"] = exported
        states[is_poisoned], artifacts[is_poisoned], timings[is_poisoned] = state, paths, timing
    return SeedModels(
        seed=seed,
        dataset=dataset,
        preprocessing=preprocessing,
        attack=attack,
        poisoned_x=poisoned.x,
        poisoned_y=poisoned.y,
        poison_mask=poisoned.poison_mask,
        calibration=calibration,
        states=states,
        artifacts=artifacts,
        timings=timings,
        data_fingerprint=fingerprint,
    )


def _split_for_defenses(
    config: ExperimentConfig, models: SeedModels
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of test images given to defenses (held out) and of the rest."""
    n = len(models.dataset.x_test)
    rng = np.random.default_rng(stable_seed("defense-split", models.seed))
    size = min(config.defense_clean_size, n // 2)
    order = rng.permutation(n)
    return np.sort(order[:size]), np.sort(order[size:])


def evaluation_sets(config: ExperimentConfig, models: SeedModels) -> EvaluationSets:
    """Test images for accuracy / ASR and the defenses' held-out pools, drawn per seed."""
    ds, attack = models.dataset, models.attack
    x_test, y_test = ds.x_test, ds.y_test
    if config.eval_limit is not None:
        x_test, y_test = x_test[: config.eval_limit], y_test[: config.eval_limit]
    triggered_x, _ = attack.triggered_test_set(x_test, y_test)
    pool_idx, rest_idx = _split_for_defenses(config, models)
    rest_nontarget = rest_idx[ds.y_test[rest_idx] != attack.target_label]
    # Fine-Pruning's fine-tuning set: clean training images the defender holds, disjoint from
    # the held-out images every defense is measured on (tuning on those would inflate accuracy).
    tune_rng = np.random.default_rng(stable_seed("finetune", models.seed))
    clean_train = np.flatnonzero(~models.poison_mask)
    tune_idx = np.sort(
        tune_rng.choice(
            clean_train, min(config.defense_clean_size, len(clean_train)), replace=False
        )
    )
    return EvaluationSets(
        x_test=x_test,
        y_test=y_test,
        triggered_x=triggered_x,
        defense_clean_x=ds.x_test[pool_idx],
        defense_clean_y=ds.y_test[pool_idx],
        defense_triggered=attack.apply_for_test(
            ds.x_test[rest_nontarget[: config.defense_clean_size]]
        ),
        tune_idx=tune_idx,
    )


def cell_identity(
    config: ExperimentConfig, models: SeedModels, is_poisoned: bool, precision: str
) -> dict[str, Any]:
    """The fields that name a cell in the store, plus its content id under ``"cell"``."""
    return {
        "cell": config.cell_key(models.seed, is_poisoned, precision, models.data_fingerprint),
        "dataset": config.dataset,
        "model": config.model,
        "attack": config.attack,
        "attack_params": models.attack.describe()["params"],
        "seed": models.seed,
        "poisoned": is_poisoned,
        "precision": precision,
    }


def evaluate_seed(
    config: ExperimentConfig, models: SeedModels, store: ResultStore, log: Log
) -> None:
    """Evaluate every (poisoned/clean × precision) cell not already in the store."""
    sets = evaluation_sets(config, models)
    done = store.done()
    for is_poisoned in models.artifacts:
        for precision in config.precisions:
            name = cell_id(cell_identity(config, models, is_poisoned, precision))
            if name in done:
                log(f"skip {name} (already in the store)")
                continue
            record, arrays = evaluate_cell(config, models, sets, is_poisoned, precision, log)
            store.append(record, arrays)
            log(
                f"{name}: clean_acc={record['clean_acc']:.4f} asr={record['asr']:.4f} "
                f"agreement_fp32={record['agreement_fp32']:.4f}"
            )


def _defense_training_set(
    config: ExperimentConfig, models: SeedModels, is_poisoned: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training images AC / SS analyse (capped by ``defense_train_size``) and their mask."""
    ds = models.dataset
    train_x, train_y = (
        (models.poisoned_x, models.poisoned_y) if is_poisoned else (ds.x_train, ds.y_train)
    )
    mask = models.poison_mask if is_poisoned else np.zeros(len(ds.x_train), dtype=bool)
    if config.defense_train_size is not None and config.defense_train_size < len(train_x):
        rng = np.random.default_rng(stable_seed("defense-train", models.seed))
        keep = np.sort(rng.choice(len(train_x), config.defense_train_size, replace=False))
        train_x, train_y, mask = train_x[keep], train_y[keep], mask[keep]
    return train_x, train_y, mask


def evaluate_cell(
    config: ExperimentConfig,
    models: SeedModels,
    sets: EvaluationSets,
    is_poisoned: bool,
    precision: str,
    log: Log,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One cell's record (metrics, defenses, provenance) and its arrays; writes nothing."""
    ds, attack, paths = models.dataset, models.attack, models.artifacts[is_poisoned]
    record = cell_identity(config, models, is_poisoned, precision)
    if is_poisoned not in models.fp32_predictions:
        reference = RuntimeAdapter.from_path(
            paths["fp32-reference"], threads=config.threads, kernel_profile=config.int8_kernels
        )
        models.fp32_predictions[is_poisoned] = reference.predict(sets.x_test)
    fp32_pred = models.fp32_predictions[is_poisoned]
    path = paths[precision]
    started = time.perf_counter()
    adapter = RuntimeAdapter.from_path(
        path, threads=config.threads, kernel_profile=config.int8_kernels
    )
    record.update(
        _clean_and_triggered(adapter, sets.x_test, sets.y_test, sets.triggered_x, fp32_pred, attack)
    )
    eval_s = time.perf_counter() - started
    record.update(
        n_test=len(sets.y_test),
        n_triggered=len(sets.triggered_x),
        per_sample_inference=adapter.runs_per_sample(None),
        kernels=profile_record(config.int8_kernels),
        artifacts={
            "onnx": str(path),
            "sidecar": str(sidecar_path(path)),
            "state": str(models.states[is_poisoned]),
        },
        timings={**models.timings[is_poisoned], "evaluate_s": eval_s},
    )
    train_x, train_y, mask = _defense_training_set(config, models, is_poisoned)
    data = DefenseData(
        num_classes=ds.num_classes,
        clean_x=sets.defense_clean_x,
        clean_y=sets.defense_clean_y,
        train_x=train_x,
        train_y=train_y,
        poison_mask=mask,
        triggered_x=sets.defense_triggered,
        target_label=attack.target_label if is_poisoned else None,
        poison_rate=attack.poison_rate,
        retrainer=FinePruneRetrainer(
            state_path=models.states[is_poisoned],
            precision=precision,
            source_indices=sets.tune_idx,
            clean_x=ds.x_train[sets.tune_idx],
            clean_y=ds.y_train[sets.tune_idx],
            calibration_images=models.calibration,
            out_dir=path.parent / "fine_pruned",
            epochs=config.finetune_epochs,
            seed=models.seed,
            threads=config.threads,
            kernel_profile=config.int8_kernels,
        ),
    )
    name = cell_id(record)
    results, arrays = run_defenses(config, models.seed, adapter, data, name, log)
    record["defenses"] = results
    if precision != "fp32" and probe_host().profiles_differ:
        record["kernel_drift"] = _kernel_drift(
            config,
            models.seed,
            path,
            (sets.x_test, sets.y_test, sets.triggered_x, fp32_pred),
            attack,
            data,
            log,
        )
    return record, arrays


def _clean_and_triggered(
    adapter: Any,
    x_test: np.ndarray,
    y_test: np.ndarray,
    triggered_x: np.ndarray,
    fp32_pred: np.ndarray,
    attack: Any,
) -> dict[str, float]:
    """Clean accuracy, attack success and top-1 agreement with FP32 of one adapter."""
    pred = adapter.predict(x_test)
    return {
        "clean_acc": accuracy(pred, y_test),
        "asr": attack_success_rate(adapter.predict(triggered_x), attack.target_label),
        "agreement_fp32": agreement(pred, fp32_pred),
    }


def _kernel_drift(
    config: ExperimentConfig,
    seed: int,
    path: Path,
    test_sets: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    attack: Any,
    data: Any,
    log: Log,
) -> dict[str, Any]:
    """The same cell under the other INT8 kernel profile: what this host's kernels change.

    Only called where the host's default kernels differ from int32-exact arithmetic (measured by
    :func:`harness.runtime.kernels.probe_host`); elsewhere both profiles compute identical numbers.
    """

    profile = other_profile(config.int8_kernels)
    adapter = RuntimeAdapter.from_path(path, threads=config.threads, kernel_profile=profile)
    x_test, y_test, triggered_x, fp32_pred = test_sets
    drift: dict[str, Any] = {"kernels": profile_record(profile)}
    drift.update(_clean_and_triggered(adapter, x_test, y_test, triggered_x, fp32_pred, attack))
    if isinstance(data.retrainer, FinePruneRetrainer):  # the repair ships under this profile too
        data = replace(data, retrainer=replace(data.retrainer, kernel_profile=profile))
    results, _ = run_defenses(config, seed, adapter, data, f"{path.name}@{profile}", log)
    drift["defenses"] = {
        name: {key: res.get(key) for key in DRIFT_DEFENSE_KEYS} for name, res in results.items()
    }
    return drift


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


def run_defenses(
    config: ExperimentConfig, seed: int, adapter: Any, data: Any, cell: str, log: Log
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Run the configured defenses on one cell: JSON results plus arrays for the store."""

    results: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for name in config.defenses:
        defense = build_defense(name, config.defense_params.get(name))
        rng = np.random.default_rng(stable_seed("defense", name, seed))
        result = defense.run(adapter, data, rng)
        results[name] = json.loads(result.model_dump_json())
        if result.per_sample_scores is not None:
            arrays[f"{name}.per_sample_scores"] = np.asarray(result.per_sample_scores)
        for key, value in result.arrays.items():
            arrays[f"{name}.{key}"] = np.asarray(value)
        verdict = result.status if result.status != "ok" else f"verdict={result.verdict}"
        log(f"{cell} {name}: {verdict} ({result.wall_time_s:.1f}s)")
    return results, arrays


def _check_output_folder(config: ExperimentConfig, out: Path) -> None:
    """Refuse to mix results of different configs in one store (resume needs the same config)."""
    previous = out / "config.json"
    if not previous.is_file() or not (out / "results.jsonl").is_file():
        return
    if read_json(previous) != json.loads(config.model_dump_json()):
        raise BlindspotsError(
            f"{out} holds results of a different config; use a new --out folder "
            "(or delete results.jsonl to start over)"
        )


def write_run_metadata(config: ExperimentConfig, out: Path) -> None:
    """``config.json`` and ``environment.json`` of a run folder, each replaced atomically."""
    atomic_write_text(out / "config.json", config.model_dump_json(indent=2))
    atomic_write_json(out / "environment.json", environment())


def run_experiment(config: ExperimentConfig, out: str | Path, log: Log = print) -> ResultStore:
    """Run every seed of ``config`` into ``out`` and return the store (report built separately).

    A sweep config (several datasets, models or attacks) runs its combinations one after the
    other; ``blindspots sweep run`` runs the same cells on parallel workers. The folder is
    locked for the duration, so a second run on it refuses in one line.
    """
    out = Path(out)
    config.check_plugins()
    with RunLock(out):
        remove_partials(out)  # temporary files of writers killed earlier (we hold the lock)
        _check_output_folder(config, out)
        store = ResultStore(out)
        write_run_metadata(config, out)
        for single in config.expand():
            for seed in config.seeds:
                models = prepare_seed(single, seed, out, log)
                evaluate_seed(single, models, store, log)
    return store
