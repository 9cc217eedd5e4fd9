"""The experiment runner: data → attack → train → export → quantize → adapter → metrics/defenses.

It is the only stage that writes results. Each finished cell (model × precision) goes to the
:class:`~harness.store.ResultStore` at once, so a crash loses nothing finished and a rerun
resumes. Trained weights and exported artifacts are cached under ``artifacts/<training key>``
(the key hashes everything that determines the weights), so changing only the defenses or their
parameters reuses the models.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
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
from harness.adapter import RuntimeAdapter
from harness.attacks.base import build_attack
from harness.config import ExperimentConfig
from harness.data.base import ImageDataset, load_dataset
from harness.determinism import float_kernel_record
from harness.errors import BlindspotsError
from harness.kernels import other_profile, probe_host, profile_record
from harness.metrics import accuracy, agreement, attack_success_rate
from harness.preprocessing import Preprocessing
from harness.retrain import FinePruneRetrainer
from harness.sampling import stable_seed
from harness.store import ResultStore, cell_id
from harness.training import TrainConfig, checkpoint_meta, load_model, save_state, train_model

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


def prepare_seed(config: ExperimentConfig, seed: int, out: Path, log: Log) -> SeedModels:
    """Poison, train (poisoned + clean control), export and quantize — cached by training key."""

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

    root = out / "artifacts" / config.training_key(seed)
    train_cfg = TrainConfig(
        model=config.model, seed=seed, num_threads=config.threads, **config.training.model_dump()
    )
    states: dict[bool, Path] = {}
    artifacts: dict[bool, dict[str, Path]] = {}
    timings: dict[bool, dict[str, float]] = {}
    variants = [True, False] if config.clean_control else [True]
    for is_poisoned in variants:
        kind = "poisoned" if is_poisoned else "clean"
        folder = root / kind
        state = folder / "model.pt"
        timing: dict[str, float] = {}
        x, y = (poisoned.x, poisoned.y) if is_poisoned else (dataset.x_train, dataset.y_train)
        if state.is_file():
            model, _ = load_model(state)
            log(f"seed {seed}: reusing trained {kind} model {state}")
        else:
            started = time.perf_counter()
            model = train_model(
                x, y, dataset.num_classes, preprocessing, train_cfg, desc=f"train {kind} s{seed}"
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
            (folder / "export.json").write_text(report.model_dump_json(indent=2))
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


def evaluate_seed(
    config: ExperimentConfig, models: SeedModels, store: ResultStore, log: Log
) -> None:
    """Evaluate every (poisoned/clean × precision) cell not already in the store."""

    ds, attack = models.dataset, models.attack
    x_test, y_test = ds.x_test, ds.y_test
    if config.eval_limit is not None:
        x_test, y_test = x_test[: config.eval_limit], y_test[: config.eval_limit]
    triggered_x, _ = attack.triggered_test_set(x_test, y_test)
    pool_idx, rest_idx = _split_for_defenses(config, models)
    defense_clean_x, defense_clean_y = ds.x_test[pool_idx], ds.y_test[pool_idx]
    rest_nontarget = rest_idx[ds.y_test[rest_idx] != attack.target_label]
    defense_triggered = attack.apply_for_test(
        ds.x_test[rest_nontarget[: config.defense_clean_size]]
    )
    # Fine-Pruning's fine-tuning set: clean training images the defender holds, disjoint from
    # the held-out images every defense is measured on (tuning on those would inflate accuracy).
    tune_rng = np.random.default_rng(stable_seed("finetune", models.seed))
    clean_train = np.flatnonzero(~models.poison_mask)
    tune_idx = np.sort(
        tune_rng.choice(
            clean_train, min(config.defense_clean_size, len(clean_train)), replace=False
        )
    )
    done = store.done()
    for is_poisoned, paths in models.artifacts.items():
        fp32_pred: np.ndarray | None = None  # computed only if a cell of this model is to run
        train_x, train_y = (
            (models.poisoned_x, models.poisoned_y) if is_poisoned else (ds.x_train, ds.y_train)
        )
        mask = models.poison_mask if is_poisoned else np.zeros(len(ds.x_train), dtype=bool)
        if config.defense_train_size is not None and config.defense_train_size < len(train_x):
            rng = np.random.default_rng(stable_seed("defense-train", models.seed))
            keep = np.sort(rng.choice(len(train_x), config.defense_train_size, replace=False))
            train_x, train_y, mask = train_x[keep], train_y[keep], mask[keep]
        for precision in config.precisions:
            record: dict[str, Any] = {
                "dataset": config.dataset,
                "model": config.model,
                "attack": config.attack,
                "attack_params": attack.describe()["params"],
                "seed": models.seed,
                "poisoned": is_poisoned,
                "precision": precision,
            }
            if cell_id(record) in done:
                log(f"skip {cell_id(record)} (already in the store)")
                continue
            if fp32_pred is None:
                reference = RuntimeAdapter.from_path(
                    paths["fp32-reference"],
                    threads=config.threads,
                    kernel_profile=config.int8_kernels,
                )
                fp32_pred = reference.predict(x_test)
            path = paths[precision]
            started = time.perf_counter()
            adapter = RuntimeAdapter.from_path(
                path, threads=config.threads, kernel_profile=config.int8_kernels
            )
            record.update(
                _clean_and_triggered(adapter, x_test, y_test, triggered_x, fp32_pred, attack)
            )
            eval_s = time.perf_counter() - started
            record.update(
                n_test=len(y_test),
                n_triggered=len(triggered_x),
                per_sample_inference=adapter.runs_per_sample(None),
                kernels=profile_record(config.int8_kernels),
                artifacts={
                    "onnx": str(path),
                    "sidecar": str(sidecar_path(path)),
                    "state": str(models.states[is_poisoned]),
                },
                timings={**models.timings[is_poisoned], "evaluate_s": eval_s},
            )
            data = DefenseData(
                num_classes=ds.num_classes,
                clean_x=defense_clean_x,
                clean_y=defense_clean_y,
                train_x=train_x,
                train_y=train_y,
                poison_mask=mask,
                triggered_x=defense_triggered,
                target_label=attack.target_label if is_poisoned else None,
                poison_rate=attack.poison_rate,
                retrainer=FinePruneRetrainer(
                    state_path=models.states[is_poisoned],
                    precision=precision,
                    source_indices=tune_idx,
                    clean_x=ds.x_train[tune_idx],
                    clean_y=ds.y_train[tune_idx],
                    calibration_images=models.calibration,
                    out_dir=path.parent / "fine_pruned",
                    epochs=config.finetune_epochs,
                    seed=models.seed,
                    threads=config.threads,
                    kernel_profile=config.int8_kernels,
                ),
            )
            results, arrays = run_defenses(config, models.seed, adapter, data, cell_id(record), log)
            record["defenses"] = results
            if precision != "fp32" and probe_host().profiles_differ:
                record["kernel_drift"] = _kernel_drift(
                    config,
                    models.seed,
                    path,
                    (x_test, y_test, triggered_x, fp32_pred),
                    attack,
                    data,
                    log,
                )
            store.append(record, arrays)
            log(
                f"{cell_id(record)}: clean_acc={record['clean_acc']:.4f} asr={record['asr']:.4f} "
                f"agreement_fp32={record['agreement_fp32']:.4f}"
            )


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
    :func:`harness.kernels.probe_host`); elsewhere both profiles compute identical numbers.
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


DRIFT_DEFENSE_KEYS = ("status", "detected", "score", "score_name", "flagged_labels", "reason")


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
        verdict = result.status if result.status != "ok" else f"detected={result.detected}"
        log(f"{cell} {name}: {verdict} ({result.wall_time_s:.1f}s)")
    return results, arrays


def _check_output_folder(config: ExperimentConfig, out: Path) -> None:
    """Refuse to mix results of different configs in one store (resume needs the same config)."""
    previous = out / "config.json"
    if not previous.is_file() or not (out / "results.jsonl").is_file():
        return
    if json.loads(previous.read_text()) != json.loads(config.model_dump_json()):
        raise BlindspotsError(
            f"{out} holds results of a different config; use a new --out folder "
            "(or delete results.jsonl to start over)"
        )


def run_experiment(config: ExperimentConfig, out: str | Path, log: Log = print) -> ResultStore:
    """Run every seed of ``config`` into ``out`` and return the store (report built separately)."""
    out = Path(out)
    config.check_plugins()
    _check_output_folder(config, out)
    store = ResultStore(out)
    (out / "config.json").write_text(config.model_dump_json(indent=2))
    (out / "environment.json").write_text(json.dumps(environment(), indent=2))
    for seed in config.seeds:
        models = prepare_seed(config, seed, out, log)
        evaluate_seed(config, models, store, log)
    return store
