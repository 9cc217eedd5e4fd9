"""``blindspots qcb``: build quantization-conditioned backdoors and audit them both ways.

``blindspots qcb run --config configs/qcb/qcb-digits.toml --out runs/qcb-digits`` does, per seed:

1. train the clean control (the benign model the attacker starts from) and implant the QCB into
   a copy (:mod:`harness.qcb.attack`); nothing is poisoned, the training data stay clean;
2. export both, quantize them with the project's recipes on the *victim's* calibration draw (the
   runner's seeded draw, independent of the attacker's own ranges);
3. measure clean accuracy and ASR of every artifact on onnxruntime sessions under both INT8
   kernel profiles (``exact`` in the cells, ``host`` beside it);
4. run every configured defense on every artifact — the FP32 file (what users audit today) and
   the deployed INT8/INT4 files — QCB and clean control alike, each quantized cell with its FP32
   reference in ``DefenseData.reference`` (``deployment_diff`` compares the two); the cells go to
   the result store, so ``report.md`` is the project's usual table;
5. re-quantize both FP32 models with every variant of :mod:`harness.qcb.requantize`.

``qcb.md`` / ``qcb.json`` add the acceptance view (per seed: FP32 vs INT8 ASR, accuracy against
the clean control), the differential check's verdicts and false-alarm rate, and the
re-quantization table. Finished cells and tables are reused on a rerun.
"""

from __future__ import annotations

import json
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from defenses.base import build_defense, default_defenses
from defenses.fanout import LabelMap
from exporters.onnx_export import export_onnx
from exporters.quantization import quantize_all
from harness.artifacts.preprocessing import Preprocessing
from harness.attacks.base import build_attack
from harness.core.atomic import atomic_write_json, atomic_write_text, remove_partials
from harness.core.errors import BlindspotsError, validation_message
from harness.core.kernel_profiles import KernelProfile
from harness.core.progress import progress_for
from harness.core.runlock import RunLock
from harness.core.sampling import stable_seed, stratified_sample
from harness.data.base import ImageDataset, load_dataset
from harness.pipeline.config import TrainingOptions
from harness.pipeline.evaluate import (
    CellRepair,
    DefensePlan,
    calibration_draw,
    cell_defense_data,
    defense_pools,
    defense_training_images,
    evaluate_artifact,
    evaluation_images,
    seeded_subset,
)
from harness.pipeline.runner import environment
from harness.pipeline.store import ResultStore, cell_id
from harness.qcb.attack import QCBParams
from harness.qcb.hong2021 import HongParams
from harness.qcb.objectives import DEFAULT_OBJECTIVE, Objective, implant_objective, objective_params
from harness.qcb.requantize import RepairParams, requantize_table
from harness.report.document import write_report
from harness.report.tally import tally_defense
from harness.runtime.adapter import RuntimeAdapter
from harness.runtime.kernels import PROFILES
from harness.training.loop import TrainConfig, checkpoint_meta, load_model, save_state, train_model

Log = Callable[[str], None]
ATTACK_NAME = "qcb"
KINDS = {True: "qcb", False: "clean"}
CELL_PROFILE: KernelProfile = "exact"
"""The cells' INT8 kernels: int32-exact arithmetic, the same on every CPU (``host`` beside)."""


class QCBConfig(BaseModel):
    """One QCB experiment (TOML/JSON); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "digits"
    data_root: str | None = None
    dataset_options: dict[str, Any] = Field(default_factory=dict)
    model: str = "small_cnn"
    attack: str = "badnet"
    attack_params: dict[str, Any] = Field(
        default_factory=lambda: {
            "patch_size": 3,
            "pattern": "checkerboard",
            "margin": 0,
            "target_label": 0,
        }
    )
    training: TrainingOptions = Field(default_factory=TrainingOptions)
    train_limit: int | None = Field(None, ge=10)
    """Stratified cap on training images (clean control and QCB alike)."""
    objective: Objective = DEFAULT_OBJECTIVE
    """Which QCB ``[qcb]`` builds: ``first_layer`` (harness.qcb.attack) or ``hong2021``
    (harness.qcb.hong2021, Hong et al.'s fine-tuning objective); see harness.qcb.objectives."""
    qcb: dict[str, Any] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    precisions: list[str] = Field(default_factory=lambda: ["fp32", "int8-static", "int4"])
    calibration_size: int = Field(256, ge=1)
    eval_limit: int | None = Field(None, ge=1)
    defenses: list[str] = Field(default_factory=lambda: default_defenses("qcb"))
    defense_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    defense_clean_size: int = Field(200, ge=10)
    defense_train_size: int | None = Field(2000, ge=10)
    finetune_epochs: int = Field(2, ge=0)
    finetune_size: int = Field(500, ge=10)
    """Clean training images Fine-Pruning fine-tunes on (the runner uses its clean pool size)."""
    defense_poison_rate: float = Field(0.01, gt=0.0, le=1.0)
    """The poison rate the defender assumes (SS's ε). A QCB poisons no training image, so the
    attack's own ``poison_rate`` would describe nothing; 1% is a defender's small prior."""
    requantize: bool = True
    other_calibration_size: int = Field(128, ge=1)
    """Training images of the "other calibration images" re-quantization (a draw of its own)."""
    repair_size: int = Field(512, ge=2)
    """Clean training images the rounding repair matches FP32 logits on (a draw of its own)."""
    repair: dict[str, Any] = Field(default_factory=dict)
    threads: int | None = Field(1, ge=1)

    @field_validator("precisions")
    @classmethod
    def _fp32_first(cls, value: list[str]) -> list[str]:
        if "fp32" not in value:
            raise ValueError("precisions must include 'fp32' (the artifact audited today)")
        return value

    def qcb_params(self) -> QCBParams | HongParams:
        return objective_params(self.objective, self.qcb)

    def repair_params(self) -> RepairParams:
        try:
            return RepairParams(**self.repair)
        except ValidationError as exc:
            message = validation_message(exc, "repair parameter", RepairParams.model_fields)
            raise BlindspotsError(message) from None


def load_qcb_config(path: str | Path, overrides: dict[str, Any] | None = None) -> QCBConfig:
    """Read a TOML/JSON QCB config; a bad file or field is one line."""
    path = Path(path)
    if not path.is_file():
        raise BlindspotsError(f"config file not found: {path}")
    try:
        raw = (
            json.loads(path.read_text())
            if path.suffix == ".json"
            else tomllib.loads(path.read_text())
        )
    except (ValueError, OSError) as exc:
        raise BlindspotsError(f"{path}: cannot parse config: {exc}") from None
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        config = QCBConfig.model_validate(raw)
    except ValidationError as exc:
        raise BlindspotsError(
            f"{path}: {validation_message(exc, 'option', QCBConfig.model_fields)}"
        ) from None
    config.qcb_params()
    config.repair_params()
    for name in config.defenses:
        build_defense(name, config.defense_params.get(name))
    return config


# ------------------------------------------------------------------------------------- models
def qcb_dataset(config: QCBConfig) -> ImageDataset:
    """The config's dataset, its training set cut to the stratified ``train_limit`` subset."""
    data = load_dataset(config.dataset, config.data_root, **config.dataset_options)
    if config.train_limit is None or config.train_limit >= len(data.x_train):
        return data
    # One subset for every seed: seeds vary the models, not the data they are compared on.
    keep = stratified_sample(
        data.y_train, config.train_limit, np.random.default_rng(stable_seed("qcb-train"))
    )
    return ImageDataset(
        data.name, data.x_train[keep], data.y_train[keep], data.x_test, data.y_test,
        data.num_classes, data.class_names,
    )  # fmt: skip


def build_models(
    config: QCBConfig, seed: int, data: ImageDataset, folder: Path, log: Log
) -> tuple[dict[bool, Path], Preprocessing, Any, dict[str, Any]]:
    """Train the clean control and implant the QCB (both cached); returns checkpoint paths."""
    preprocessing = Preprocessing.from_images(data.x_train)
    attack = build_attack(config.attack, config.attack_params)
    attack.validate_for(data.image_shape, data.num_classes)
    clean_state, qcb_state = folder / "clean" / "model.pt", folder / "qcb" / "model.pt"
    record_path = folder / "qcb" / "implant.json"
    train_cfg = TrainConfig(
        model=config.model, seed=seed, num_threads=config.threads, **config.training.model_dump()
    )
    meta = checkpoint_meta(train_cfg, data.num_classes, data.image_shape[2], preprocessing)
    if clean_state.is_file():
        clean, _ = load_model(clean_state)
    else:
        started = time.perf_counter()
        clean = train_model(data.x_train, data.y_train, data.num_classes, preprocessing, train_cfg,
                            desc=f"qcb clean control s{seed}")  # fmt: skip
        save_state(clean, clean_state, {**meta, "poisoned": False, "train_s": _since(started)})
        log(f"seed {seed}: clean control trained in {_since(started):.0f}s")
    if not qcb_state.is_file():
        started = time.perf_counter()
        model, measurements = implant_objective(
            config.objective, clean, data.x_train, data.y_train, attack, preprocessing,
            config.qcb, seed, progress=progress_for(f"qcb {config.objective} s{seed}"),
            # the first-layer QCB keeps its thread count (its tables were made so)
            threads=config.threads if config.objective != DEFAULT_OBJECTIVE else None,
        )  # fmt: skip
        measured = {**measurements, "implant_s": _since(started)}
        save_state(model, qcb_state, {**meta, "poisoned": True, "attack": attack.describe()})
        atomic_write_text(record_path, json.dumps(measured, indent=2, default=str))
        log(f"seed {seed}: QCB implanted in {_since(started):.0f}s; mirror {measured['mirror']}")
    implant_record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    return {False: clean_state, True: qcb_state}, preprocessing, attack, implant_record


def _since(started: float) -> float:
    return time.perf_counter() - started


def deploy(
    config: QCBConfig,
    states: dict[bool, Path],
    preprocessing: Preprocessing,
    data: ImageDataset,
    calibration: np.ndarray,
) -> dict[bool, dict[str, Path]]:
    """Export and quantize both models (cached by the quantizer's own proof of currency)."""
    artifacts = {}
    for poisoned, state in states.items():
        folder = state.parent
        exported = folder / "exported.onnx"
        # export.json is written only after the parity check passed: as in the runner, a file
        # without it (a killed or failed export) is made again, never reused.
        if not (exported.is_file() and (folder / "export.json").is_file()):
            model, _ = load_model(state)
            report = export_onnx(model, exported, data.x_test[:256], preprocessing)
            atomic_write_text(folder / "export.json", report.model_dump_json(indent=2))
        paths, _ = quantize_all(
            exported, folder, config.precisions, calibration, reuse_existing=True
        )
        artifacts[poisoned] = {**paths, "fp32-reference": exported}
    return artifacts


# ---------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class SeedArtifacts:
    """One seed's models as built and deployed: what its cells and re-quantization read."""

    seed: int
    data: ImageDataset
    attack: Any
    states: dict[bool, Path]
    """Checkpoints: ``True`` the QCB, ``False`` the clean control."""
    artifacts: dict[bool, dict[str, Path]]
    """Per model, every precision's file and ``fp32-reference`` (the export)."""
    calibration: np.ndarray
    """The victim's calibration draw the artifacts were quantized on."""


def evaluate_seed(
    config: QCBConfig,
    seed_artifacts: SeedArtifacts,
    store: ResultStore,
    log: Log,
    label_map: LabelMap | None = None,
) -> None:
    """Every (QCB/clean × precision) cell: metrics under both profiles and every defense.

    The cells go through the project's one evaluation path (:mod:`harness.pipeline.evaluate`),
    with the runner's draws of test, defense and fine-tuning images: a QCB cell and a runner
    cell of the same data and seed see the same images. ``label_map``: where Neural Cleanse's
    per-label tasks run (``None``: in this process).
    """
    seed, data, attack = seed_artifacts.seed, seed_artifacts.data, seed_artifacts.attack
    images = evaluation_images(data, attack, config.eval_limit)
    pools = defense_pools(
        data, attack, seed, config.defense_clean_size, tune_size=config.finetune_size
    )
    # Nothing is poisoned: the QCB lives in the weights, so the mask is all False.
    training = defense_training_images(
        data.x_train,
        data.y_train,
        config.defense_train_size,
        seed,
        np.zeros(len(data.x_train), dtype=bool),
    )
    plan = DefensePlan(config.defenses, config.defense_params, seed)
    done = store.done()
    for poisoned, paths in seed_artifacts.artifacts.items():
        reference = _open(paths["fp32-reference"], config)
        fp32_pred = reference.predict(images.x)
        for precision in config.precisions:
            record: dict[str, Any] = {
                "dataset": config.dataset,
                "model": config.model,
                "attack": ATTACK_NAME,
                "attack_params": {
                    **attack.describe()["params"],
                    "trigger": config.attack,
                    **_objective_key(config),
                },
                "seed": seed,
                "poisoned": poisoned,
                "precision": precision,
            }
            if cell_id(record) in done:
                continue
            defense_data = cell_defense_data(
                data.num_classes,
                pools,
                training=training,
                target_label=attack.target_label if poisoned else None,
                poison_rate=config.defense_poison_rate,
                repair=CellRepair(
                    state_path=seed_artifacts.states[poisoned],
                    artifact_path=paths[precision],
                    precision=precision,
                    calibration_images=seed_artifacts.calibration,
                    epochs=config.finetune_epochs,
                    seed=seed,
                    threads=config.threads,
                    kernel_profile=CELL_PROFILE,
                ),
                reference=None if precision == "fp32" else reference,
                label_map=label_map,
            )
            evaluation = evaluate_artifact(
                _open(paths[precision], config),
                images,
                fp32_pred,
                defense_data,
                plan,
                cell_id(record),
                log,
                both_profiles=True,
            )
            record.update(evaluation.fields)
            record["artifacts"] = {
                "onnx": str(paths[precision]),
                "state": str(seed_artifacts.states[poisoned]),
            }
            store.append(record, evaluation.arrays)
            verdicts = {name: res.get("verdict") for name, res in record["defenses"].items()}
            log(
                f"{cell_id(record)}: acc={record['clean_acc']:.4f} asr={record['asr']:.4f} {verdicts}"
            )


def _objective_key(config: QCBConfig) -> dict[str, str]:
    """``{"objective": ...}`` for a non-default objective; nothing for the default, so cells of
    existing runs keep their ids."""
    return {} if config.objective == DEFAULT_OBJECTIVE else {"objective": config.objective}


def _open(path: Path, config: QCBConfig) -> RuntimeAdapter:
    """An artifact's session under the cells' kernel profile (the other one is measured too)."""
    return RuntimeAdapter.from_path(path, threads=config.threads, kernel_profile=CELL_PROFILE)


def requantize_seed(config: QCBConfig, seed_artifacts: SeedArtifacts, out: Path, log: Log) -> None:
    """The re-quantization table of both models (appended to ``requantize.jsonl``).

    The other calibration images and the repair's clean images are seeded draws of their own
    (``other_calibration_size``, ``repair_size``), so changing one size never moves the other.
    """
    seed, data = seed_artifacts.seed, seed_artifacts.data
    table = out / "requantize.jsonl"
    done = {(r["seed"], r["poisoned"]) for r in _jsonl(table)}
    other = calibration_draw(
        data.x_train, config.other_calibration_size, seed, stream="qcb-other-calibration"
    )
    repair_images = data.x_train[
        seeded_subset(len(data.x_train), config.repair_size, "qcb-repair-images", seed)
    ]
    images = evaluation_images(data, seed_artifacts.attack, config.eval_limit)
    for poisoned, paths in seed_artifacts.artifacts.items():
        if (seed, poisoned) in done:
            continue
        model, meta = load_model(seed_artifacts.states[poisoned])
        rows = requantize_table(
            paths["fp32-reference"], model, Preprocessing.from_json(meta["preprocessing"]),
            seed_artifacts.calibration, other, repair_images, images,
            paths["fp32-reference"].parent / "requantized",
            seed, config.threads, repair=config.repair_params(), log=log,
        )  # fmt: skip
        # The whole table is rewritten atomically: a crash keeps the old rows, never half a row.
        finished = [*_jsonl(table), *({"seed": seed, "poisoned": poisoned, **r} for r in rows)]
        atomic_write_text(table, "".join(json.dumps(row) + "\n" for row in finished))


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------ the run
def run_qcb(
    config: QCBConfig, out: str | Path, log: Log = print, label_map: LabelMap | None = None
) -> dict[str, Any]:
    """Run every seed into ``out``; returns the summary written to ``qcb.json``.

    The folder is locked for the run (a second run on it refuses in one line) and every file is
    replaced atomically, so a crash loses no finished cell, table row or summary.
    ``label_map``: where Neural Cleanse's per-label tasks run (an executor's
    :meth:`~harness.pipeline.executors.Executor.label_map`; ``None``: in this process) — the
    result is the serial scan's either way.
    """
    out = Path(out)
    with RunLock(out):
        remove_partials(out)  # temporary files of writers killed earlier (we hold the lock)
        return _run_locked(config, out, log, label_map)


def _run_locked(
    config: QCBConfig, out: Path, log: Log, label_map: LabelMap | None = None
) -> dict[str, Any]:
    """The run itself, while this process holds the folder's lock."""
    store = ResultStore(out)
    atomic_write_text(out / "qcb_config.json", config.model_dump_json(indent=2))
    atomic_write_json(out / "config.json", _report_config(config))
    atomic_write_json(out / "environment.json", environment())
    timings: dict[int, float] = {}
    for seed in config.seeds:
        started = time.perf_counter()
        data = qcb_dataset(config)
        folder = out / "artifacts" / f"s{seed}"
        states, preprocessing, attack, _ = build_models(config, seed, data, folder, log)
        calibration = calibration_draw(data.x_train, config.calibration_size, seed)
        artifacts = deploy(config, states, preprocessing, data, calibration)
        built = SeedArtifacts(seed, data, attack, states, artifacts, calibration)
        evaluate_seed(config, built, store, log, label_map)
        if config.requantize:
            requantize_seed(config, built, out, log)
        timings[seed] = _since(started)
        log(f"seed {seed} finished in {timings[seed]:.0f}s")
    write_report(out)
    summary = summarize(store.records(), _jsonl(out / "requantize.jsonl"), config)
    summary["seconds_per_seed"] = timings
    atomic_write_json(out / "qcb.json", summary)
    atomic_write_text(out / "qcb.md", render(summary))
    return summary


def _report_config(config: QCBConfig) -> dict[str, Any]:
    """The keys ``harness.report.data`` reads from ``config.json``."""
    return {
        "dataset": config.dataset,
        "model": config.model,
        "attack": ATTACK_NAME,
        "attack_params": {
            "trigger": config.attack,
            **config.attack_params,
            "qcb": config.qcb,
            **_objective_key(config),
        },
        "seeds": config.seeds,
        "precisions": config.precisions,
        "defenses": config.defenses,
        "int8_kernels": "exact",
    }


# ------------------------------------------------------------------------------------ summary
def summarize(
    runs: list[dict[str, Any]], requant: list[dict[str, Any]], config: QCBConfig
) -> dict[str, Any]:
    """Acceptance per seed, verdict counts per defense × artifact, the re-quantization table."""
    cells = {(r["seed"], r["poisoned"], r["precision"]): r for r in runs}
    seeds = []
    for seed in config.seeds:
        row: dict[str, Any] = {"seed": seed}
        for precision in config.precisions:
            qcb, clean = cells.get((seed, True, precision)), cells.get((seed, False, precision))
            if qcb is None or clean is None:
                continue
            for profile in PROFILES:
                row[f"{precision}/{profile}"] = {
                    "qcb_asr": qcb["profiles"][profile]["asr"],
                    "qcb_acc": qcb["profiles"][profile]["clean_acc"],
                    "clean_acc": clean["profiles"][profile]["clean_acc"],
                    "clean_asr": clean["profiles"][profile]["asr"],
                }
        seeds.append(row)
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for run in runs:
        kind = KINDS[run["poisoned"]]
        for name, result in run.get("defenses", {}).items():
            grouped.setdefault(name, {}).setdefault(f"{run['precision']}/{kind}", []).append(result)
    # The project's one tally: an inconclusive run is neither a hit nor a miss.
    verdicts = {
        name: {artifact: tally_defense(results) for artifact, results in sorted(per.items())}
        for name, per in sorted(grouped.items())
    }
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    for row in requant:
        entry = table.setdefault(row["variant"], {}).setdefault(
            KINDS[row["poisoned"]], {"asr": [], "clean_acc": [], "asr_host": []}
        )
        entry["asr"].append(row["results"]["exact"]["asr"])
        entry["clean_acc"].append(row["results"]["exact"]["clean_acc"])
        entry["asr_host"].append(row["results"]["host"]["asr"])
    return {"seeds": seeds, "verdicts": verdicts, "requantize": table}


def render(summary: dict[str, Any]) -> str:
    """``qcb.md``: the acceptance table, verdicts FP32 vs deployed, the re-quantization table."""
    lines = [
        "# Quantization-conditioned backdoor",
        "",
        "## ASR and accuracy per seed (onnxruntime)",
        "",
    ]
    lines += [
        "| seed | artifact / kernels | QCB ASR | QCB acc | clean-control acc | clean-control ASR |"
    ]
    lines += ["|---|---|---|---|---|---|"]
    for row in summary["seeds"]:
        for key, value in row.items():
            if key == "seed":
                continue
            lines.append(
                f"| {row['seed']} | {key} | {value['qcb_asr']:.4f} | {value['qcb_acc']:.4f} | "
                f"{value['clean_acc']:.4f} | {value['clean_asr']:.4f} |"
            )
    lines += [
        "",
        "## Verdicts: detected / decided runs (QCB = hit, clean = false alarm; inconclusive apart)",
        "",
    ]
    artifacts = sorted({a for v in summary["verdicts"].values() for a in v})
    lines += ["| defense | " + " | ".join(artifacts) + " |", "|---|" + "---|" * len(artifacts)]
    for name, per in summary["verdicts"].items():
        cells = []
        for artifact in artifacts:
            tally = per.get(artifact)
            if tally is None:
                cells.append("—")
                continue
            cell = f"{tally['detected']}/{tally['decided']}"
            if tally["inconclusive"]:
                cell += f" ({tally['inconclusive']} inconclusive)"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Re-quantization (mean over seeds, exact kernels; host ASR in brackets)", ""]
    lines += ["| variant | QCB ASR | QCB acc | clean acc | clean ASR |", "|---|---|---|---|---|"]
    for variant, per in summary["requantize"].items():
        q, c = per.get("qcb"), per.get("clean")
        if q is None or c is None:
            continue
        lines.append(
            f"| {variant} | {np.mean(q['asr']):.4f} [{np.mean(q['asr_host']):.4f}] | "
            f"{np.mean(q['clean_acc']):.4f} | {np.mean(c['clean_acc']):.4f} | {np.mean(c['asr']):.4f} |"
        )
    return "\n".join(lines) + "\n"
