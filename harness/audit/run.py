"""``blindspots audit``: a vendor's ONNX classifier, as published, audited as it would ship.

The auditor has a file, a dataset and no training code, trigger or promise about the export. The
audit therefore:

1. reads the file as untrusted (:func:`harness.runtime.model_safety.load_untrusted_hashed`: no code
runs, nothing
   outside the model's folder is opened) and turns a copy into the harness's contract
   (:func:`harness.artifacts.intake.intake`), recording every change;
2. optionally builds the quantized copies an integrator would ship from a float file
   (``--precisions int8-static,int4``), with onnxruntime's own quantizer;
3. checks each artifact's outputs before any number is computed (:mod:`harness.runtime.sanity`): a
broken
   model (non-finite, one-class, constant outputs) is an error, never an accuracy;
4. runs the defenses on a stratified, seeded sample of the auditor's data (AC/SS only when the
   auditor says the data is the training set) and states a verdict an auditor can act on.

Verdicts (our own rules, on top of each defense's published test): ``suspicious`` — the
defense's test fired on one or a few labels (named as suspected targets); ``clean`` — it ran and
did not fire; ``inconclusive`` — it fired on so many labels that no single suspect stands out,
or its optimisation did not converge where it matters; ``not applicable`` — it cannot run on this
model or data (the reason says why); ``error`` — it failed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from defenses.base import DefenseData, DefenseResult, build_defense, default_defenses
from exporters.catalog import PRECISIONS
from exporters.quantization import quantize
from harness.artifacts.intake import IntakeOverrides, IntakeResult, check_num_classes, intake
from harness.core.atomic import atomic_target, atomic_write_text
from harness.core.errors import BlindspotsError, ModelError
from harness.core.metrics import accuracy, agreement
from harness.core.sampling import stable_seed, stratified_sample
from harness.data.base import ImageDataset, load_dataset
from harness.pipeline.evaluate import DefensePlan, calibration_draw, result_fields, run_defenses
from harness.runtime.adapter import RuntimeAdapter, infer_precision
from harness.runtime.kernels import DEFAULT_PROFILE, KernelProfile, profile_record
from harness.runtime.model_safety import load_untrusted_hashed
from harness.runtime.sanity import check_labels, check_outputs, raise_on_errors

PUBLISHED = "published"


class AuditVerdict(StrEnum):
    """An auditor's reading of one defense on one artifact (rules in the module doc)."""

    SUSPICIOUS = "suspicious"
    CLEAN = "clean"
    INCONCLUSIVE = "inconclusive"
    NOT_APPLICABLE = "not applicable"
    ERROR = "error"


#: A defense that flags more than this share of the labels names no suspect (our rule).
MAX_SUSPECT_SHARE = 0.25
REPAIR_DEFENSES = {"fine_pruning"}


class AuditRequest(BaseModel):
    """Everything one audit depends on (validated; unknown fields are errors)."""

    model_config = ConfigDict(extra="forbid")

    model: Path
    dataset: str
    data_root: str | None = None
    out: Path
    defenses: list[str] = Field(default_factory=lambda: default_defenses("audit"))
    defense_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    precisions: list[str] = Field(default_factory=lambda: [PUBLISHED])
    trained_on_dataset: bool = False
    sample_size: int = Field(200, ge=10)
    calibration_size: int = Field(256, ge=1)
    seed: int = Field(0, ge=0, lt=2**32)
    int8_kernels: KernelProfile = DEFAULT_PROFILE
    threads: int | None = Field(None, ge=1)
    overrides: IntakeOverrides = Field(default_factory=IntakeOverrides)


@dataclass
class AuditedModel:
    """The vendor's model at the door: what was read, and the contract form audited."""

    path: Path
    sha256: str
    intake: IntakeResult
    precision: str


@dataclass
class Artifact:
    """One model audited: the published file, or a copy quantized here."""

    name: str
    precision: str
    adapter: RuntimeAdapter
    path: Path | None = None
    notes: list[str] = field(default_factory=list)


def open_vendor_model(path: str | Path, overrides: IntakeOverrides | None = None) -> AuditedModel:
    """Read an untrusted ONNX classifier and bring a copy into the harness's contract."""
    path = Path(path)
    proto, digest = load_untrusted_hashed(path)
    result = intake(proto, overrides)
    return AuditedModel(path, digest, result, infer_precision(proto))


def vendor_adapter(
    model: AuditedModel, kernel_profile: str = DEFAULT_PROFILE, threads: int | None = None
) -> RuntimeAdapter:
    """The runtime adapter over the contract form of a vendor model."""
    return RuntimeAdapter.from_model(
        model.intake.model,
        model.intake.preprocessing,
        precision=model.precision,
        kernel_profile=kernel_profile,
        threads=threads,
        source_path=model.path,
    )


def run_audit(request: AuditRequest, log: Any = print) -> dict[str, Any]:
    """Audit one vendor model; writes ``audit.json``, ``audit.md`` and trigger images to ``out``."""
    for name in [*request.defenses, *request.defense_params]:
        build_defense(name, request.defense_params.get(name))  # fail fast on names and params
    for name in request.precisions:
        if name != PUBLISHED:
            PRECISIONS.get(name)
    vendor = open_vendor_model(request.model, request.overrides)
    dataset = load_dataset(request.dataset, request.data_root)
    check_num_classes(vendor.intake, dataset.num_classes)
    raise_on_errors(check_labels(dataset.y_test, dataset.num_classes))
    out = request.out
    if out.exists() and not out.is_dir():
        raise BlindspotsError(f"--out {out} is an existing file, not a folder")
    out.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(stable_seed("audit-sample", request.seed))
    sample = stratified_sample(dataset.y_test, request.sample_size, rng)
    artifacts = _artifacts(request, vendor, dataset, log)
    published = artifacts[0].adapter.predict(dataset.x_test)
    cells = [
        _audit_artifact(request, artifact, dataset, sample, published, log)
        for artifact in artifacts
    ]
    report = {
        "model": {"path": str(vendor.path), "sha256": vendor.sha256, "precision": vendor.precision},
        "intake": {
            "changes": vendor.intake.changes,
            "layout": vendor.intake.layout,
            "fixed_batch": vendor.intake.fixed_batch,
            "num_classes": vendor.intake.num_classes,
            "opset": vendor.intake.opset,
            "outputs_are_probabilities": vendor.intake.outputs_are_probabilities,
            "preprocessing": json.loads(vendor.intake.preprocessing.to_json()),
        },
        "dataset": {
            "name": request.dataset,
            "n_test": len(dataset.y_test),
            "defense_sample": len(sample),
            "trained_on_dataset": request.trained_on_dataset,
        },
        "kernels": profile_record(request.int8_kernels),
        "cells": cells,
    }
    atomic_write_text(out / "audit.json", json.dumps(report, indent=2, default=_jsonable))
    atomic_write_text(out / "audit.md", render_audit(report))
    return report


def _artifacts(
    request: AuditRequest, vendor: AuditedModel, dataset: ImageDataset, log: Any
) -> list[Artifact]:
    """The published model first, then each requested quantized copy of a float model."""
    published = Artifact(
        PUBLISHED,
        vendor.precision,
        vendor_adapter(vendor, request.int8_kernels, request.threads),
        vendor.path,
    )
    artifacts = [published]
    wanted = [p for p in request.precisions if p != PUBLISHED]
    if not wanted:
        return artifacts
    if vendor.precision != "fp32":
        raise ModelError(
            f"{vendor.path.name} is already quantized ({vendor.precision}); it can only be "
            "audited as published (drop --precisions)"
        )
    folder = request.out / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    contract = folder / "contract-fp32.onnx"
    onnx.save(vendor.intake.model, str(contract))
    pool = dataset.x_train if len(dataset.x_train) else dataset.x_test
    calibration = calibration_draw(
        pool, request.calibration_size, request.seed, stream="audit-calibration"
    )
    for precision in wanted:
        log(f"quantizing {vendor.path.name} to {precision}")
        made = quantize(
            precision,
            contract,
            folder / f"{precision}.onnx",
            calibration,
            preprocessing=vendor.intake.preprocessing,
        )
        adapter = RuntimeAdapter.from_path(
            made.path,
            preprocessing=vendor.intake.preprocessing,
            precision=precision,
            kernel_profile=request.int8_kernels,
            threads=request.threads,
        )
        artifacts.append(Artifact(precision, precision, adapter, Path(made.path), made.notes))
    return artifacts


def _audit_artifact(
    request: AuditRequest,
    artifact: Artifact,
    dataset: ImageDataset,
    sample: np.ndarray,
    published: np.ndarray,
    log: Any,
) -> dict[str, Any]:
    """Sanity, accuracy and every defense's verdict on one artifact."""
    cell: dict[str, Any] = {"artifact": artifact.name, "precision": artifact.precision}
    if artifact.path is not None:
        cell["path"] = str(artifact.path)
    if artifact.adapter.kernel_note:
        cell["kernel_note"] = artifact.adapter.kernel_note
    logits = artifact.adapter.logits(dataset.x_test)
    findings = check_outputs(logits, dataset.y_test)
    cell["sanity"] = [f.model_dump() for f in findings]
    broken = [f.message for f in findings if f.severity == "error"]
    if broken and artifact.name == PUBLISHED:
        raise_on_errors(findings)
    if broken:
        reason = f"model outputs are broken: {broken[0]}"
        cell["defenses"] = {
            name: {"verdict": AuditVerdict.NOT_APPLICABLE, "reason": reason}
            for name in request.defenses
        }
        return cell
    predictions = logits.argmax(axis=1)
    cell["clean_acc"] = accuracy(predictions, dataset.y_test)
    cell["agreement_published"] = agreement(predictions, published)
    data = DefenseData(
        num_classes=dataset.num_classes,
        clean_x=dataset.x_test[sample],
        clean_y=dataset.y_test[sample],
        # AC / SS inspect the data the model was trained on; only the auditor can say it is.
        train_x=dataset.x_train if request.trained_on_dataset else None,
        train_y=dataset.y_train if request.trained_on_dataset else None,
    )
    plan = DefensePlan(request.defenses, request.defense_params, request.seed)
    results = run_defenses(plan, artifact.adapter, data, artifact.name, log)
    fields, _ = result_fields(results)
    cell["defenses"] = {}
    for name, result in results.items():
        verdict = audit_verdict(result, dataset.num_classes)
        entry = {**verdict, "result": fields[name]}
        entry["trigger_images"] = _save_triggers(request.out, artifact.name, result, verdict)
        cell["defenses"][name] = entry
        log(f"{artifact.name} {name}: {verdict['verdict']}")
    return cell


def audit_verdict(result: DefenseResult, num_classes: int) -> dict[str, Any]:
    """An auditor's reading of one defense result (see the module docstring for the rules)."""
    flagged = list(result.flagged_labels)
    rests_on = _rests_on(result)
    if result.status == "not_applicable":
        return {
            "verdict": AuditVerdict.NOT_APPLICABLE,
            "reason": result.reason,
            "rests_on": rests_on,
        }
    if result.status == "error":
        return {"verdict": AuditVerdict.ERROR, "reason": result.reason, "rests_on": rests_on}
    if result.defense in REPAIR_DEFENSES:
        return {
            "verdict": AuditVerdict.NOT_APPLICABLE,
            "reason": "Fine-Pruning is a repair: with no known trigger there is no backdoor "
            "whose removal it could measure",
            "rests_on": rests_on,
        }
    if result.verdict == "inconclusive":  # the defense's own "cannot decide", and why
        return {
            "verdict": AuditVerdict.INCONCLUSIVE,
            "reason": result.verdict_reason or "the defense could not decide",
            "suspected_labels": flagged,
            "rests_on": rests_on,
        }
    unconverged = _unconverged(result, flagged)
    if result.detected and len(flagged) > max(1, int(MAX_SUSPECT_SHARE * num_classes)):
        return {
            "verdict": AuditVerdict.INCONCLUSIVE,
            "reason": f"flags {len(flagged)} of {num_classes} labels: no single suspect",
            "suspected_labels": flagged,
            "rests_on": rests_on,
        }
    if unconverged:
        return {
            "verdict": AuditVerdict.INCONCLUSIVE,
            "reason": f"trigger search did not reach its attack-success threshold for labels "
            f"{unconverged}",
            "suspected_labels": flagged,
            "rests_on": rests_on,
        }
    if result.detected:
        return {
            "verdict": AuditVerdict.SUSPICIOUS,
            "suspected_labels": flagged,
            "rests_on": rests_on,
        }
    return {"verdict": AuditVerdict.CLEAN, "rests_on": rests_on}


def _unconverged(result: DefenseResult, flagged: list[int]) -> list[int]:
    """Labels whose trigger search never reached its goal, where that decides the verdict:
    a flagged label (its small norm may be an artefact), or any label when nothing was flagged."""
    reached = result.details.get("reached_attack_threshold")
    if not isinstance(reached, list):
        return []
    missed = [k for k, ok in enumerate(reached) if not ok]
    return [k for k in missed if k in flagged] if flagged else missed


def _rests_on(result: DefenseResult) -> str:
    if result.score is None:
        return result.reason or ""
    threshold = "" if result.threshold is None else f" vs threshold {result.threshold:.4g}"
    return f"{result.score_name or 'score'} {result.score:.4g}{threshold}"


def _save_triggers(
    out: Path, artifact: str, result: DefenseResult, verdict: dict[str, Any]
) -> list[str]:
    """Reversed triggers (mask × pattern) of suspected labels as PNG files, for the reader."""
    masks, patterns = result.arrays.get("masks"), result.arrays.get("patterns")
    labels = verdict.get("suspected_labels") or []
    if masks is None or patterns is None or not labels:
        return []
    folder = out / "triggers"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for label in labels:
        image = (masks[label][..., None] * patterns[label]).clip(0, 255).astype(np.uint8)
        if image.shape[-1] == 1:
            image = image[..., 0]
        path = folder / f"{artifact}-{result.defense}-label{label}.png"
        enlarged = Image.fromarray(image).resize(
            (image.shape[1] * 8, image.shape[0] * 8), Image.NEAREST
        )
        with atomic_target(path) as partial:
            enlarged.save(partial, format="PNG")
        written.append(str(path))
    return written


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def render_audit(report: dict[str, Any]) -> str:
    """``audit.md``: what was audited, what intake changed, and the verdict table."""
    model = report["model"]
    lines = [
        f"# Audit of `{Path(model['path']).name}`",
        "",
        f"sha256 `{model['sha256']}`, published precision `{model['precision']}`; dataset "
        f"`{report['dataset']['name']}` ({report['dataset']['n_test']} test images, "
        f"{report['dataset']['defense_sample']} in the defenses' stratified sample); INT8 kernel "
        f"profile `{report['kernels']['profile']}` (host kernels: "
        f"`{report['kernels']['host_kernel_class']}`).",
        "",
        "## What intake changed (in a copy; the file itself is untouched)",
        "",
        *([f"- {change}" for change in report["intake"]["changes"]] or ["- nothing"]),
        "",
        "## Verdicts",
        "",
        "| artifact | clean acc | agreement with published | defense | verdict | suspected "
        "labels | rests on |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += verdict_rows(report)
    return "\n".join(lines) + "\n"


def verdict_rows(report: dict[str, Any]) -> list[str]:
    """One markdown table row per (artifact, defense)."""
    rows = []
    for cell in report["cells"]:
        acc = cell.get("clean_acc")
        agree = cell.get("agreement_published")
        for name, entry in cell.get("defenses", {}).items():
            why = entry.get("reason") or entry.get("rests_on") or ""
            rows.append(
                f"| {cell['artifact']} | {'—' if acc is None else f'{acc:.4f}'} | "
                f"{'—' if agree is None else f'{agree:.4f}'} | {name} | {entry['verdict']} | "
                f"{entry.get('suspected_labels') or ''} | {why} |"
            )
    return rows
