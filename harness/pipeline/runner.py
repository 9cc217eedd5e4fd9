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
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import sklearn
import torch

from defenses.fanout import LabelMap
from exporters.onnx_export import export_onnx
from exporters.quantization import quantize_all
from harness import __version__
from harness.artifacts.preprocessing import Preprocessing
from harness.artifacts.sidecar import sidecar_path
from harness.attacks.base import build_attack
from harness.core.atomic import atomic_write_json, atomic_write_text, remove_partials
from harness.core.determinism import float_kernel_record
from harness.core.errors import BlindspotsError
from harness.core.progress import ProgressMode
from harness.core.runlock import RunLock
from harness.core.sampling import stable_seed
from harness.data.base import ImageDataset, load_dataset
from harness.pipeline.config import ExperimentConfig, input_fingerprint
from harness.pipeline.evaluate import (
    CellRepair,
    DefensePlan,
    DefensePools,
    EvaluationImages,
    TrainingImages,
    calibration_draw,
    cell_defense_data,
    defense_pools,
    defense_training_images,
    evaluate_artifact,
    evaluation_images,
)
from harness.pipeline.store import ResultStore, cell_id, read_json
from harness.runtime.adapter import RuntimeAdapter
from harness.runtime.kernels import cpu_isa_flags, probe_host
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
    """The test images and the defenders' pools of one seed, shared by all of its cells."""

    images: EvaluationImages
    pools: DefensePools


def git_provenance() -> dict[str, Any]:
    """The commit of the checkout this code runs from and whether its tree had uncommitted changes.

    Protocol v1 (docs/protocol.md §1) asks every table to name the commit that produced it; the
    version number alone does not change between commits. Both are ``None`` when the code does not
    run from a git checkout of this project (an installed wheel, a container without ``.git``).
    """
    package = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(package), *args],  # never take the index lock
            capture_output=True,
            text=True,
            timeout=10,
        )
        if done.returncode:
            raise OSError(done.stderr.strip())
        return done.stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != package.parent:
            return {"git_commit": None, "git_dirty": None}  # some other repository's checkout
        return {
            "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain")),
        }
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def environment() -> dict[str, Any]:
    """Provenance recorded with every report: versions, commit and the CPU's INT8 instruction sets."""

    return {
        "blindspots": __version__,
        **git_provenance(),
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

    dataset = load_dataset(config.dataset_name, config.data_location, **config.dataset_options)
    attack = build_attack(config.attack_name, config.attack_params)
    attack.validate_for(dataset.image_shape, dataset.num_classes)
    preprocessing = Preprocessing.from_images(dataset.x_train)
    rng = np.random.default_rng(stable_seed("poison", seed))
    poisoned = attack.poison(dataset.x_train, dataset.y_train, rng)
    # clean images: the vendor calibrates on clean data
    calibration = calibration_draw(dataset.x_train, config.calibration_size, seed)

    fingerprint = data_fingerprint or input_fingerprint(config.dataset_name, config.data_location)
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


def evaluation_sets(config: ExperimentConfig, models: SeedModels) -> EvaluationSets:
    """Test images for accuracy / ASR and the defenses' held-out pools, drawn per seed."""
    return EvaluationSets(
        images=evaluation_images(models.dataset, models.attack, config.eval_limit),
        pools=defense_pools(
            models.dataset,
            models.attack,
            models.seed,
            config.defense_clean_size,
            models.poison_mask,
        ),
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


def _defense_training_images(
    config: ExperimentConfig, models: SeedModels, is_poisoned: bool
) -> TrainingImages:
    """The training images AC / SS analyse (capped by ``defense_train_size``) and their mask."""
    ds = models.dataset
    if is_poisoned:
        x, y, mask = models.poisoned_x, models.poisoned_y, models.poison_mask
    else:
        x, y, mask = ds.x_train, ds.y_train, np.zeros(len(ds.x_train), dtype=bool)
    return defense_training_images(x, y, config.defense_train_size, models.seed, mask)


def evaluate_cell(
    config: ExperimentConfig,
    models: SeedModels,
    sets: EvaluationSets,
    is_poisoned: bool,
    precision: str,
    log: Log,
    label_map: LabelMap | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One cell's record (metrics, defenses, provenance) and its arrays; writes nothing.

    A quantized cell gets its FP32 file as ``DefenseData.reference``, so the deployment
    differential check runs in sweeps too. ``label_map``: where per-label defense tasks run
    (``DefenseData.label_map``; a Dask sweep spreads a cell's Neural Cleanse over its cluster).
    """
    ds, attack, paths = models.dataset, models.attack, models.artifacts[is_poisoned]
    pools = sets.pools
    record = cell_identity(config, models, is_poisoned, precision)

    def open_artifact(path: Path) -> RuntimeAdapter:
        return RuntimeAdapter.from_path(
            path, threads=config.threads, kernel_profile=config.int8_kernels
        )

    reference = open_artifact(paths["fp32-reference"])
    if is_poisoned not in models.fp32_predictions:
        models.fp32_predictions[is_poisoned] = reference.predict(sets.images.x)
    path = paths[precision]
    data = cell_defense_data(
        ds.num_classes,
        pools,
        training=_defense_training_images(config, models, is_poisoned),
        target_label=attack.target_label if is_poisoned else None,
        poison_rate=attack.poison_rate,
        repair=CellRepair(
            state_path=models.states[is_poisoned],
            artifact_path=path,
            precision=precision,
            calibration_images=models.calibration,
            epochs=config.finetune_epochs,
            seed=models.seed,
            threads=config.threads,
            kernel_profile=config.int8_kernels,
        ),
        reference=None if precision == "fp32" else reference,
        label_map=label_map,
    )
    plan = DefensePlan(config.defenses, config.defense_params, models.seed)
    evaluation = evaluate_artifact(
        open_artifact(path),
        sets.images,
        models.fp32_predictions[is_poisoned],
        data,
        plan,
        cell_id(record),
        log,
    )
    record.update(evaluation.fields)
    record.update(
        artifacts={
            "onnx": str(path),
            "sidecar": str(sidecar_path(path)),
            "state": str(models.states[is_poisoned]),
        },
        timings={**models.timings[is_poisoned], **evaluation.fields["timings"]},
    )
    return record, evaluation.arrays


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
