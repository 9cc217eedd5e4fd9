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
   auditor says the data is the training set) and states a verdict an auditor can act on;
5. holds every quantized artifact (a copy built here, or a file the vendor ships, ``--deployed``)
   against the published float file with the deployment-differential check: a backdoor that
   only the quantized file answers is invisible to every check of one file alone;
6. runs STRIP on Neural Cleanse's reversed triggers (the triggered inputs an auditor otherwise
   lacks), and says per suspected label which signals agree.

Verdicts (our own rules, on top of each defense's published test): ``suspicious`` — the
defense's test fired on one or a few labels (named as suspected targets); ``clean`` — it ran and
did not fire; ``inconclusive`` — it fired on so many labels that no single suspect stands out,
or its optimisation did not converge where it matters; ``not applicable`` — it cannot run on this
model or data (the reason says why); ``error`` — it failed.

Budgets (``--budget``): ``paper`` runs every defense at its authors' settings; ``quick`` is a
named deviation for CI — Neural Cleanse's ``fast`` step profile (docs/protocol.md §4.1: one
update on 16 images per step) capped at 300 steps, and STRIP fitting its threshold on 100 clean
inputs with 50 overlays. Explicit ``--defense-params`` override either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from defenses.base import DefenseData, DefenseResult, build_defense, default_defenses
from defenses.neural_cleanse import stamp
from exporters.catalog import PRECISIONS
from exporters.quantization import quantize
from harness.artifacts.intake import IntakeOverrides, IntakeResult, check_num_classes, intake
from harness.audit.controls import (
    control_context,
    controls_cell,
    controls_note,
    find_reference,
    load_reference,
    packaged_references,
)
from harness.core.atomic import atomic_target, atomic_write_text
from harness.core.errors import BlindspotsError, ModelError
from harness.core.sampling import stable_seed, stratified_sample
from harness.data.base import ImageDataset, load_dataset
from harness.pipeline.evaluate import (
    DefensePlan,
    TrainingImages,
    calibration_draw,
    cell_defense_data,
    prediction_metrics,
    result_fields,
    run_defenses,
    seeded_subset,
)
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
JUDGED = {AuditVerdict.SUSPICIOUS, AuditVerdict.CLEAN, AuditVerdict.INCONCLUSIVE}
"""Verdicts of a check that ran: only these are read against the clean controls."""
DEPLOYED_PREFIX = "deployed:"
"""Artifact names of the quantized files the vendor ships (``--deployed``)."""

Budget = Literal["quick", "paper"]
BUDGETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {},
    "quick": {
        "neural_cleanse": {"profile": "fast", "steps": 300},
        "strip": {"n_overlays": 50, "n_clean_fit": 100},
    },
}
"""Per-defense parameters of each budget (see the module doc); ``paper`` keeps the defaults."""

EXECUTION: dict[str, dict[str, Any]] = {"neural_cleanse": {"torch_threads": 1}}
"""How the audit runs a defense, whatever the budget; changes no number. Neural Cleanse's
small batches lose to intra-op threading: on the digits demo model, with the 2-core host loaded
by other jobs, one thread took 10 s where torch's default took 136 s, with identical steps and
anomaly indices."""

STRIP_TRIGGERED = 200
"""Held-out images stamped with each reversed trigger for STRIP (its ``n_test`` default)."""


def budget_params(budget: str, explicit: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The execution settings, the budget's parameters per defense, and the auditor's explicit
    ones on top."""
    merged = {name: dict(params) for name, params in EXECUTION.items()}
    for name, params in BUDGETS[budget].items():
        merged[name] = {**merged.get(name, {}), **params}
    for name, params in explicit.items():
        merged[name] = {**merged.get(name, {}), **params}
    return merged


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
    deployed: list[Path] = Field(default_factory=list)
    budget: Budget = "paper"
    trained_on_dataset: bool = False
    sample_size: int = Field(200, ge=10)
    calibration_size: int = Field(256, ge=1)
    seed: int = Field(0, ge=0, lt=2**32)
    int8_kernels: KernelProfile = DEFAULT_PROFILE
    threads: int | None = Field(None, ge=1)
    overrides: IntakeOverrides = Field(default_factory=IntakeOverrides)
    model_family: str | None = None
    """What architecture the auditor knows the model to be; picks the clean-control reference."""
    controls: list[Path] = Field(default_factory=list)
    """Clean-control references beyond the packaged ones (``tools/control_reference.py``)."""


@dataclass
class AuditedModel:
    """The vendor's model at the door: what was read, and the contract form audited."""

    path: Path
    sha256: str
    intake: IntakeResult
    precision: str


@dataclass
class Artifact:
    """One model audited: the published file, a file the vendor ships (``--deployed``), or a
    copy quantized here."""

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
    """Audit one vendor model; writes ``audit.json``, ``audit.md``, ``audit.html`` and trigger
    images to ``out``."""
    params = budget_params(request.budget, request.defense_params)
    for name in [*request.defenses, *params]:
        build_defense(name, params.get(name))  # fail fast on names and params
    for name in request.precisions:
        if name != PUBLISHED:
            PRECISIONS.get(name)
    for path in request.deployed:
        if not path.is_file():
            raise BlindspotsError(f"--deployed file not found: {path}")
    names = [path.name for path in request.deployed]
    if len(set(names)) < len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise BlindspotsError(
            f"two --deployed files are named {twice}: results are keyed by file name, rename one"
        )
    extra = [load_reference(path) for path in request.controls]  # fail fast on a bad file
    controls, no_controls = find_reference(
        [*extra, *packaged_references()], request.dataset, request.model_family, request.budget
    )
    vendor = open_vendor_model(request.model, request.overrides)
    if request.deployed and vendor.precision != "fp32":
        raise ModelError(
            f"--deployed is checked against the vendor's float file, but {vendor.path.name} is "
            f"already quantized ({vendor.precision}): pass the float file as the model"
        )
    deployed = [open_vendor_model(path, request.overrides) for path in request.deployed]
    dataset = load_dataset(request.dataset, request.data_root)
    check_num_classes(vendor.intake, dataset.num_classes)
    for shipped in deployed:
        check_num_classes(shipped.intake, dataset.num_classes)
    raise_on_errors(check_labels(dataset.y_test, dataset.num_classes))
    out = request.out
    if out.exists() and not out.is_dir():
        raise BlindspotsError(f"--out {out} is an existing file, not a folder")
    out.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(stable_seed("audit-sample", request.seed))
    sample = stratified_sample(dataset.y_test, request.sample_size, rng)
    artifacts = _artifacts(request, vendor, deployed, dataset, log)
    published = artifacts[0].adapter.predict(dataset.x_test)
    reference = artifacts[0].adapter if vendor.precision == "fp32" else None
    cells = [
        _audit_artifact(request, params, artifact, dataset, sample, published, reference, log)
        for artifact in artifacts
    ]
    for cell in cells:
        for name, entry in cell.get("defenses", {}).items():
            if entry["verdict"] not in JUDGED:
                continue  # a check that did not run has nothing to compare
            score = (entry.get("result") or {}).get("score")
            shipped = cell["artifact"].startswith(DEPLOYED_PREFIX)
            if controls is None:
                entry["clean_controls"] = {"none_known": no_controls}
            elif shipped and cell["precision"] == "fp32":
                entry["clean_controls"] = {
                    "none_known": "the shipped file's precision could not be told apart from "
                    "FP32, so no reference precision applies"
                }
            else:
                entry["clean_controls"] = control_context(controls, cell["precision"], name, score)
                if shipped and "none_known" not in entry["clean_controls"]:
                    entry["clean_controls"]["caveat"] = (
                        "reference files quantized by this project, not by the vendor"
                    )
    report = {
        "model": {"path": str(vendor.path), "sha256": vendor.sha256, "precision": vendor.precision},
        "deployed": [
            {"path": str(d.path), "sha256": d.sha256, "precision": d.precision} for d in deployed
        ],
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
        "budget": {"name": request.budget, "defense_params": params},
        "seed": request.seed,
        "kernels": profile_record(request.int8_kernels),
        "cells": cells,
        "overall": overall_verdict(cells),
        "clean_controls": (
            {
                "reference": f"{controls.dataset}/{controls.model_family}/{controls.budget}",
                "models": len(controls.models),
                "provenance": controls.provenance,
            }
            if controls is not None
            else {"none_known": no_controls}
        ),
    }
    atomic_write_text(out / "audit.json", json.dumps(report, indent=2, default=_jsonable))
    atomic_write_text(out / "audit.md", render_audit(report))
    from harness.audit.page import render_html  # the page is optional reading; load it late

    atomic_write_text(out / "audit.html", render_html(report))
    return report


def _artifacts(
    request: AuditRequest,
    vendor: AuditedModel,
    deployed: list[AuditedModel],
    dataset: ImageDataset,
    log: Any,
) -> list[Artifact]:
    """The published model first, then the vendor's shipped files, then each quantized copy
    built here from a float model."""
    published = Artifact(
        PUBLISHED,
        vendor.precision,
        vendor_adapter(vendor, request.int8_kernels, request.threads),
        vendor.path,
    )
    artifacts = [published]
    for shipped in deployed:
        adapter = vendor_adapter(shipped, request.int8_kernels, request.threads)
        if adapter.input_shape != published.adapter.input_shape:
            raise ModelError(
                f"--deployed {shipped.path.name} takes images shaped {adapter.input_shape}, "
                f"the float file {published.adapter.input_shape}: not the same model"
            )
        name = f"{DEPLOYED_PREFIX}{shipped.path.name}"
        artifacts.append(Artifact(name, shipped.precision, adapter, shipped.path))
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
    with atomic_target(contract) as partial:
        onnx.save(vendor.intake.model, str(partial))
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
    params: dict[str, dict[str, Any]],
    artifact: Artifact,
    dataset: ImageDataset,
    sample: np.ndarray,
    published: np.ndarray,
    reference: RuntimeAdapter | None,
    log: Any,
) -> dict[str, Any]:
    """Sanity, accuracy and every defense's verdict on one artifact.

    Every artifact but the published one gets the published float file as its reference, so
    the deployment-differential check can compare the two. STRIP runs after the others, on
    Neural Cleanse's reversed triggers.

    The pieces are the evaluation path's (:mod:`harness.pipeline.evaluate`): the defense data
    (:func:`~harness.pipeline.evaluate.cell_defense_data`), the metrics
    (:func:`~harness.pipeline.evaluate.prediction_metrics`) and the defense loop. The audit does
    not call :func:`~harness.pipeline.evaluate.evaluate_artifact` whole, because an auditor's
    cell is not a runner's: there is no known trigger (no ASR, no triggered pool; STRIP gets
    Neural Cleanse's reversed triggers, so it runs after the others), the metrics are scored on
    the predictions of the sanity check that must pass first (one pass over the test set, not
    two), the results become verdicts rather than store records, and the INT8 kernels are the
    auditor's explicit choice (``--int8-kernels``), not a drift rerun doubling every defense.
    """
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
    if broken and artifact.name.startswith(DEPLOYED_PREFIX):  # a file the vendor ships
        raise ModelError(f"{artifact.path}: {broken[0]}")
    if broken:
        reason = f"model outputs are broken: {broken[0]}"
        cell["defenses"] = {
            name: {"verdict": AuditVerdict.NOT_APPLICABLE, "reason": reason}
            for name in request.defenses
        }
        cell["signals"] = {}
        return cell
    measured = prediction_metrics(logits.argmax(axis=1), dataset.y_test, published)
    cell["clean_acc"] = measured["clean_acc"]
    cell["agreement_published"] = measured["agreement_fp32"]  # the published file, maybe INT8
    data = cell_defense_data(
        dataset.num_classes,
        (dataset.x_test[sample], dataset.y_test[sample]),
        # AC / SS inspect the data the model was trained on; only the auditor can say it is.
        training=(
            TrainingImages(dataset.x_train, dataset.y_train) if request.trained_on_dataset else None
        ),
        reference=reference if artifact.name != PUBLISHED else None,
        progress=lambda line: log(f"{artifact.name} {line}"),
    )
    first = [name for name in request.defenses if name != "strip"]
    plan = DefensePlan(first, params, request.seed)
    results = run_defenses(plan, artifact.adapter, data, artifact.name, log)
    fields, _ = result_fields(results)
    cell["defenses"] = {}
    for name in request.defenses:
        if name == "strip":
            entry = _strip_on_reversed_triggers(
                request, params, artifact, dataset, sample, data, results, log
            )
        else:
            result = results[name]
            entry = {**audit_verdict(result, dataset.num_classes), "result": fields[name]}
            if name == "neural_cleanse" and result.status == "ok":
                entry["confirmation"] = nc_confirmation(result)
            shown = {*(entry.get("suspected_labels") or [])}
            shown |= set(entry.get("confirmation", {}).get("flagged", []))  # unconfirmed too
            entry["trigger_images"] = _save_triggers(
                request.out, artifact.name, result, sorted(shown)
            )
        cell["defenses"][name] = entry
        log(f"{artifact.name} {name}: {entry['verdict']}")
    cell["signals"] = agreeing_signals(cell["defenses"])
    return cell


def nc_confirmation(result: DefenseResult) -> dict[str, Any]:
    """Neural Cleanse's flags and whether the shipped session confirms them.

    Neural Cleanse confirms each flag itself (``confirm_threshold``, docs/protocol.md §4.1): a
    flag counts only when its reversed trigger, stamped on held-out images, sends that share of
    them to the label on the onnxruntime session. The audit shows the rates beside the verdict,
    so the reader sees whether a suspicion holds on the file that ships.
    """
    details = result.details
    before = details.get("flagged_before_confirmation", result.flagged_labels)
    rates = details.get("ort_attack_success") or []
    return {
        "threshold": details.get("ort_confirm_threshold"),
        "flagged": list(before),
        "confirmed": list(result.flagged_labels),
        "unconfirmed": list(details.get("unconfirmed_labels", [])),
        "ort_attack_success": {str(k): rates[k] if k < len(rates) else None for k in before},
    }


def _strip_on_reversed_triggers(
    request: AuditRequest,
    params: dict[str, dict[str, Any]],
    artifact: Artifact,
    dataset: ImageDataset,
    sample: np.ndarray,
    data: DefenseData,
    results: dict[str, DefenseResult],
    log: Any,
) -> dict[str, Any]:
    """STRIP as a second opinion on each label Neural Cleanse flagged, against a control.

    STRIP needs triggered inputs; an auditor has none, but Neural Cleanse's reversed trigger of
    a suspected label is one. It is stamped on held-out test images (outside the defenses'
    sample, of other labels); STRIP fits its entropy threshold on the sample's clean images only
    and asks whether the stamped inputs stay confident under superimposition, as a real trigger
    does. Labels flagged before onnxruntime confirmation are all tested, so the second opinion
    does not depend on the first one's confirmation.

    A reversed trigger reaches 99% attack success for *every* label, so STRIP may fire on any of
    them: on the clean vendor MLP's INT8 file it fired on the reversed trigger of a label Neural
    Cleanse flagged and onnxruntime did not confirm. STRIP is therefore also run on a control —
    the reversed trigger of the unflagged label with the median mask norm, a label Neural
    Cleanse found nothing against. A suspect counts only when STRIP fires on it and not on the
    control; when it fires on both, STRIP cannot tell that trigger from any strong patch, and
    the verdict is ``inconclusive``.

    Even so, STRIP on a reversed trigger measures the trigger as much as the model: on that same
    clean file STRIP fired on the smallest-mask label's trigger (TPR 0.62) and not on the
    control's (0.03). So STRIP only corroborates: its alarm on a label stands where Neural
    Cleanse's flag of that label is confirmed on the shipped session, and is ``inconclusive``
    otherwise — it never raises an alarm on its own.
    """
    nc = results.get("neural_cleanse")
    if nc is None:
        return _not_applicable(
            "STRIP runs on Neural Cleanse's reversed triggers: add neural_cleanse to --defenses"
        )
    if nc.status != "ok":
        return _not_applicable(f"Neural Cleanse did not run ({nc.reason})")
    labels = [int(k) for k in nc.details.get("flagged_before_confirmation", nc.flagged_labels)]
    if not labels:
        return _not_applicable("Neural Cleanse reversed no suspect trigger to test")
    held_out = np.setdiff1d(np.arange(len(dataset.y_test)), sample)

    def strip_on(label: int, role: str) -> dict[str, Any]:
        others = held_out[dataset.y_test[held_out] != label]
        if not len(others):
            return _not_applicable("no held-out test image outside the sample")
        chosen = others[seeded_subset(len(others), STRIP_TRIGGERED, "audit-strip", request.seed)]
        stamped = stamp(
            dataset.x_test[chosen].astype(np.float32),
            nc.arrays["masks"][label],
            nc.arrays["patterns"][label],
        ).astype(np.float32)
        strip_data = replace(data, triggered_x=stamped, train_x=None, train_y=None, reference=None)
        plan = DefensePlan(["strip"], params, request.seed)
        cell = f"{artifact.name} (NC {role} label {label})"
        result = run_defenses(plan, artifact.adapter, strip_data, cell, log)["strip"]
        fields, _ = result_fields({"strip": result})
        return {**audit_verdict(result, data.num_classes), "result": fields["strip"]}

    control_label = _control_label(nc, labels)
    control = None if control_label is None else strip_on(control_label, "control")
    per_label: dict[str, Any] = {}
    for label in labels:
        verdict = strip_on(label, "suspect")
        if verdict["verdict"] == AuditVerdict.SUSPICIOUS:
            verdict = _against_control(verdict, label, control_label, control)
        if verdict["verdict"] == AuditVerdict.SUSPICIOUS and label not in nc.flagged_labels:
            verdict = {
                **verdict,
                "verdict": AuditVerdict.INCONCLUSIVE,
                "reason": f"STRIP fires on the reversed trigger of label {label}, but Neural "
                "Cleanse's flag of it is not confirmed on the shipped session; STRIP on a "
                "reversed trigger only corroborates a confirmed flag",
            }
        per_label[str(label)] = verdict
    combined = _combined([entry["verdict"] for entry in per_label.values()])
    entry: dict[str, Any] = {
        "verdict": combined,
        "on": "Neural Cleanse's reversed triggers",
        "per_label": per_label,
        "control": None if control is None else {"label": control_label, **control},
        "rests_on": "; ".join(
            f"label {k}: {v.get('rests_on') or v.get('reason', '')}" for k, v in per_label.items()
        )
        + ("" if control is None else f"; control label {control_label}: {control['verdict']}"),
    }
    fired = [int(k) for k, v in per_label.items() if v["verdict"] == AuditVerdict.SUSPICIOUS]
    if fired:
        entry["suspected_labels"] = fired
    if combined == AuditVerdict.INCONCLUSIVE:
        entry["reason"] = "; ".join(
            f"label {k}: {v.get('reason', '')}"
            for k, v in per_label.items()
            if v["verdict"] == AuditVerdict.INCONCLUSIVE
        )
    return entry


def _control_label(nc: DefenseResult, flagged: list[int]) -> int | None:
    """The unflagged label with the median mask norm (None when every label is flagged)."""
    norms = nc.details.get("l1_norms")
    candidates = [k for k in range(len(norms or [])) if k not in flagged]
    if not norms or not candidates:
        return None
    ordered = sorted(candidates, key=lambda k: norms[k])
    return ordered[len(ordered) // 2]


def _against_control(
    verdict: dict[str, Any], label: int, control_label: int | None, control: dict[str, Any] | None
) -> dict[str, Any]:
    """A STRIP alarm on a suspect's trigger stands only if the control's trigger raised none."""
    if control is None or control_label is None:
        reason = "no unflagged label to run STRIP's control on"
    elif control["verdict"] == AuditVerdict.CLEAN:
        return {**verdict, "suspected_labels": [label]}
    elif control["verdict"] == AuditVerdict.SUSPICIOUS:
        reason = (
            f"STRIP also fires on the reversed trigger of label {control_label}, which Neural "
            "Cleanse found unremarkable: it cannot tell this trigger from any strong patch"
        )
    else:
        reason = f"STRIP's control (label {control_label}) is {control['verdict']}"
    return {**verdict, "verdict": AuditVerdict.INCONCLUSIVE, "reason": reason}


def _not_applicable(reason: str) -> dict[str, Any]:
    return {"verdict": AuditVerdict.NOT_APPLICABLE, "reason": reason}


SEVERITY = {
    AuditVerdict.NOT_APPLICABLE: 0,
    AuditVerdict.CLEAN: 1,
    AuditVerdict.ERROR: 2,
    AuditVerdict.INCONCLUSIVE: 3,
    AuditVerdict.SUSPICIOUS: 4,
}
"""Order in which verdicts win when several are combined: any alarm stands out, then any
check that could not decide, then a failure; ``not applicable`` only when nothing ran."""


def _combined(verdicts: list[str]) -> AuditVerdict:
    """The most severe of several verdicts (:data:`SEVERITY`)."""
    if not verdicts:
        return AuditVerdict.NOT_APPLICABLE
    return max((AuditVerdict(v) for v in verdicts), key=SEVERITY.__getitem__)


def agreeing_signals(entries: dict[str, Any]) -> dict[str, list[str]]:
    """Per suspected label, the checks that point at it (the reader's "which signals agree").

    Only ``suspicious`` verdicts count. Neural Cleanse's flags are shown with their onnxruntime
    confirmation; a flag the shipped session did not confirm is listed as such, so a reader
    sees it without mistaking it for evidence.
    """
    signals: dict[str, list[str]] = {}
    for name, entry in entries.items():
        confirmation = entry.get("confirmation") or {}
        if entry["verdict"] == AuditVerdict.SUSPICIOUS:
            confirmed = name == "neural_cleanse" and confirmation.get("threshold") is not None
            shown = f"{name} (confirmed on onnxruntime)" if confirmed else name
            for label in entry.get("suspected_labels") or []:
                signals.setdefault(str(label), []).append(shown)
        for label in confirmation.get("unconfirmed", []):
            signals.setdefault(str(label), []).append(f"{name} (not confirmed on onnxruntime)")
    return signals


def overall_verdict(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The most severe verdict over every artifact and check, with where it came from."""
    pairs = [
        (cell["artifact"], name, entry["verdict"])
        for cell in cells
        for name, entry in cell.get("defenses", {}).items()
    ]
    verdict = _combined([v for _, _, v in pairs])
    return {
        "verdict": verdict,
        "from": [f"{artifact} {name}" for artifact, name, v in pairs if v == verdict]
        if verdict != AuditVerdict.CLEAN
        else [],
    }


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


def _save_triggers(out: Path, artifact: str, result: DefenseResult, labels: list[int]) -> list[str]:
    """The triggers behind a suspicion as PNG files, for the reader: Neural Cleanse's reversed
    trigger (mask × pattern) per flagged label, confirmed or not, and the
    deployment-differential patch."""
    if not labels:
        return []
    arrays = result.arrays
    images: dict[int, np.ndarray] = {}
    if "masks" in arrays and "patterns" in arrays:
        images = {k: arrays["masks"][k][..., None] * arrays["patterns"][k] for k in labels}
    elif "patch_mask" in arrays and "patch_pattern" in arrays:
        patch = arrays["patch_mask"][..., None] * arrays["patch_pattern"]
        images = {k: patch for k in labels}
    folder = out / "triggers"
    written = []
    for label, pixels in images.items():
        image = np.asarray(pixels).clip(0, 255).astype(np.uint8)
        if image.shape[-1] == 1:
            image = image[..., 0]
        folder.mkdir(parents=True, exist_ok=True)
        safe = artifact.replace(DEPLOYED_PREFIX, "deployed-").replace("/", "_")
        path = folder / f"{safe}-{result.defense}-label{label}.png"
        enlarged = Image.fromarray(image).resize(
            (image.shape[1] * 8, image.shape[0] * 8), Image.Resampling.NEAREST
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
    """``audit.md``: what was audited, what intake changed, the verdicts and what backs them."""
    model = report["model"]
    budget = report.get("budget", {})
    lines = [
        f"# Audit of `{Path(model['path']).name}`",
        "",
        f"**Overall: {report['overall']['verdict']}**"
        + (f" ({', '.join(report['overall']['from'])})" if report["overall"]["from"] else ""),
        "",
        f"sha256 `{model['sha256']}`, published precision `{model['precision']}`; dataset "
        f"`{report['dataset']['name']}` ({report['dataset']['n_test']} test images, "
        f"{report['dataset']['defense_sample']} in the defenses' stratified sample); budget "
        f"`{budget.get('name', 'paper')}`; INT8 kernel "
        f"profile `{report['kernels']['profile']}` (host kernels: "
        f"`{report['kernels']['host_kernel_class']}`).",
        "",
    ]
    if report.get("deployed"):
        lines += ["## Shipped files checked against the float file", ""]
        lines += [
            f"- `{Path(d['path']).name}` ({d['precision']}), sha256 `{d['sha256']}`"
            for d in report["deployed"]
        ]
        lines.append("")
    lines += [
        "## What intake changed (in a copy; the file itself is untouched)",
        "",
        *([f"- {change}" for change in report["intake"]["changes"]] or ["- nothing"]),
        "",
        "## Verdicts",
        "",
        "| artifact | clean acc | agreement with published | defense | verdict | suspected "
        "labels | rests on | on the project's clean controls |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += verdict_rows(report)
    lines += ["", controls_note(report.get("clean_controls"))]
    lines += ["", "## Which signals agree", ""]
    for cell in report["cells"]:
        signals = cell.get("signals") or {}
        shown = "; ".join(f"label {k}: {', '.join(v)}" for k, v in signals.items())
        lines.append(f"- {cell['artifact']}: {shown or 'no check points at any label'}")
    confirmations = [
        (cell["artifact"], cell["defenses"]["neural_cleanse"]["confirmation"])
        for cell in report["cells"]
        if "confirmation" in cell.get("defenses", {}).get("neural_cleanse", {})
    ]
    if any(c["flagged"] for _, c in confirmations):
        lines += [
            "",
            "## Neural Cleanse flags on the shipped session",
            "",
            "A flag counts only when its reversed trigger, stamped on held-out images, sends at "
            "least the bar's share of them to the label through onnxruntime.",
            "",
            "| artifact | label | onnxruntime attack success | bar | confirmed |",
            "|---|---|---|---|---|",
        ]
        for artifact, c in confirmations:
            for label in c["flagged"]:
                rate = c["ort_attack_success"].get(str(label))
                lines.append(
                    f"| {artifact} | {label} | {'—' if rate is None else f'{rate:.3f}'} | "
                    f"{c['threshold']} | {'yes' if label in c['confirmed'] else 'no'} |"
                )
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
                f"{entry.get('suspected_labels') or ''} | {why} | "
                f"{controls_cell(entry.get('clean_controls'))} |"
            )
    return rows
