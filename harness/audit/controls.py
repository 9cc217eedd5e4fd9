"""How often would this verdict fire on a clean model? The project's own controls say.

A verdict against a fixed threshold tells an auditor little about whether to act on it: on
GTSRB, Neural Cleanse flagged 1–2 of 5 of the project's clean controls. So each audit verdict
is read against a *reference*: a JSON file made by ``tools/control_reference.py`` from models
this project trained on one dataset with one model family — clean controls, and the same
recipe poisoned — each put through this very audit at one budget. It records, per model, per
artifact precision and per defense, the audit's verdict, its suspects and the defense's
model-level score. From it an audit reports beside each verdict:

* the **false-alarm rate**: clean controls that the same defense, at the same budget, on an
  artifact of the same precision, called ``suspicious`` (Wilson 95% interval; inconclusive
  runs counted apart, never as alarms);
* the **detection rate** on the reference's poisoned models (the planted target among the
  suspects), same conditions;
* the audited score's **percentile** among the clean controls' scores (ties count one half),
  so a score just under the threshold reads as "higher than 9 in 10 clean models" rather than
  as "clean".

A reference applies only to the dataset, model family and budget it was measured on: a
different architecture may sit elsewhere entirely. The audit uses one only when the auditor
names the family (``--model-family``) and a reference for that dataset, family and budget is at
hand (packaged under ``harness/audit/references/`` or passed with ``--controls``); otherwise
each verdict says that no rate is known, and why. Nothing here changes a verdict.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.core.errors import BlindspotsError
from harness.report.primary import wilson_rate
from harness.report.stats import auroc

REFERENCE_SCHEMA = 1
PACKAGED = "references"
"""Folder of :mod:`harness.audit` holding the references shipped with the package."""

SUSPICIOUS = "suspicious"
INCONCLUSIVE = "inconclusive"
DECIDED = {SUSPICIOUS, "clean"}


class ControlEntry(BaseModel):
    """One defense's audit reading of one artifact of one reference model."""

    model_config = ConfigDict(extra="forbid")

    verdict: str
    suspected_labels: list[int] = Field(default_factory=list)
    score: float | None = None
    score_name: str | None = None


class ControlModel(BaseModel):
    """One model of a reference: its seed, whether it is poisoned (and where), and its audit."""

    model_config = ConfigDict(extra="forbid")

    seed: int
    poisoned: bool
    target_label: int | None = None
    artifacts: dict[str, dict[str, ControlEntry]]
    """Precision of the audited artifact → defense → entry."""


class ControlReference(BaseModel):
    """A file of ``tools/control_reference.py``: one dataset, model family and audit budget."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = Field(REFERENCE_SCHEMA, alias="schema")
    dataset: str
    model_family: str
    budget: str
    attack: dict[str, Any]
    provenance: dict[str, Any]
    models: list[ControlModel]

    def matches(self, dataset: str, family: str, budget: str) -> bool:
        return (self.dataset, self.model_family, self.budget) == (dataset, family, budget)


def load_reference(path: str | Path) -> ControlReference:
    """Read one reference file; a missing or malformed one is a one-line error."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        return ControlReference.model_validate(raw)
    except FileNotFoundError:
        raise BlindspotsError(f"--controls file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BlindspotsError(f"--controls {path} is not JSON: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BlindspotsError(
            f"--controls {path} is not a control reference: {where}: {first['msg']}"
        ) from None


def packaged_references() -> list[ControlReference]:
    """The references shipped in ``harness/audit/references/`` (sorted by file name)."""
    folder = resources.files("harness.audit") / PACKAGED
    if not folder.is_dir():
        return []
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".json")), key=lambda f: f.name)
    return [ControlReference.model_validate(json.loads(f.read_text())) for f in files]


def find_reference(
    references: list[ControlReference], dataset: str, family: str | None, budget: str
) -> tuple[ControlReference | None, str | None]:
    """The reference for this audit, or why there is none (the reason is shown to the reader)."""
    if family is None:
        return None, "the model family is not stated (--model-family), so no clean controls apply"
    for reference in references:
        if reference.matches(dataset, family, budget):
            return reference, None
    known = sorted({f"{r.dataset}/{r.model_family}/{r.budget}" for r in references})
    listed = ", ".join(known) if known else "none"
    return None, (
        f"no clean controls measured for dataset {dataset}, family {family}, budget {budget} "
        f"(known: {listed})"
    )


def percentile(score: float, scores: list[float]) -> float:
    """Share of ``scores`` below ``score``, ties counting one half (a mid-rank percentile): the
    AUROC of that one score against them, with the report's tie rule."""
    return auroc([score], scores)


def control_context(
    reference: ControlReference, precision: str, defense: str, score: float | None
) -> dict[str, Any]:
    """What the reference says about one verdict: rates on its models and the score's rank.

    Only models audited at the same artifact precision by the same defense count; a defense
    the reference never ran there yields ``{"none_known": why}``.
    """
    clean, poisoned = [], []
    for model in reference.models:
        entry = model.artifacts.get(precision, {}).get(defense)
        if entry is not None:
            (poisoned if model.poisoned else clean).append((model, entry))
    if not clean:
        return {
            "none_known": f"the reference has no clean control audited by {defense} at {precision}"
        }
    alarms = [e for _, e in clean if e.verdict in DECIDED]
    if not alarms:
        ran = sum(e.verdict == INCONCLUSIVE for _, e in clean)
        why = (
            f"{ran} of the reference's {len(clean)} clean controls were inconclusive and none "
            "decided"
            if ran
            else f"the reference never ran {defense} at {precision} (not applicable or failed "
            f"on all {len(clean)} clean controls)"
        )
        return {"none_known": why}
    hits = [(m, e) for m, e in poisoned if e.verdict in DECIDED]
    context: dict[str, Any] = {
        "reference": f"{reference.dataset}/{reference.model_family}/{reference.budget}",
        "false_alarm": wilson_rate(
            sum(e.verdict == SUSPICIOUS for e in alarms),
            len(alarms),
            sum(e.verdict == INCONCLUSIVE for _, e in clean),
        ),
        "detection": wilson_rate(
            sum(e.verdict == SUSPICIOUS and m.target_label in e.suspected_labels for m, e in hits),
            len(hits),
            sum(e.verdict == INCONCLUSIVE for _, e in poisoned),
        )
        if poisoned
        else None,
        "score_percentile": None,
        "n_clean_scores": 0,
    }
    scores = [e.score for _, e in clean if e.score is not None]
    context["n_clean_scores"] = len(scores)
    if score is not None and scores:
        context["score_percentile"] = percentile(score, scores)
    return context


def describe(context: dict[str, Any] | None) -> str:
    """One line for audit.md / audit.html: the false-alarm rate, detection rate, percentile."""
    if not context:
        return "—"
    if "none_known" in context:
        return f"none known: {context['none_known']}"
    fa = context["false_alarm"]
    parts = [f"false alarms {fa['k']}/{fa['n']} clean controls"]
    if fa["inconclusive"]:
        parts[-1] += f" (+{fa['inconclusive']} inconclusive)"
    det = context.get("detection")
    if det and (det["n"] or det["inconclusive"]):
        parts.append(f"detected {det['k']}/{det['n']} poisoned")
    if context.get("caveat"):
        parts.append(context["caveat"])
    if context.get("score_percentile") is not None:
        parts.append(
            f"score at the {100 * context['score_percentile']:.0f}th percentile of "
            f"{context['n_clean_scores']} clean scores"
        )
    return f"{'; '.join(parts)} [{context['reference']}]"


def controls_cell(context: dict[str, Any] | None) -> str:
    """The verdict table's clean-control column: rates and percentile, or why none is known."""
    return describe(context)


def controls_note(controls: dict[str, Any] | None) -> str:
    """Under the verdict table: which reference the last column reads, or why there is none."""
    if not controls:
        return "No clean-control reference was consulted."
    if "none_known" in controls:
        return f"Clean controls: none known — {controls['none_known']}."
    prov = controls.get("provenance") or {}
    made = ", ".join(
        str(v) for v in (prov.get("date"), prov.get("git_commit", "")[:12], prov.get("cpu")) if v
    )
    return (
        f"Clean controls: reference `{controls['reference']}` ({controls['models']} models"
        f"{', ' + made if made else ''}): how often the same check at the same budget fired on "
        "the project's own clean models of this dataset and family, how often it named the "
        "target on their poisoned twins, and where this score ranks among the clean ones. It "
        "applies to that family only."
    )


def summary_table(reference: ControlReference) -> str:
    """Markdown: per defense and artifact precision, what the reference's models got.

    Clean controls: false alarms / decided runs (+ inconclusive); poisoned models: target named
    / decided runs (+ inconclusive). Checks that never ran on a precision are left out.
    BENCHMARKS.md quotes this table (a test keeps the two equal).
    """
    rows = []
    precisions = sorted({p for m in reference.models for p in m.artifacts})
    defenses = sorted({d for m in reference.models for e in m.artifacts.values() for d in e})
    for defense in defenses:
        for precision in precisions:
            context = control_context(reference, precision, defense, None)
            if "none_known" in context:
                continue
            fa, det = context["false_alarm"], context["detection"]

            def cell(rate: dict[str, Any] | None) -> str:
                if not rate:
                    return "—"
                extra = f" (+{rate['inconclusive']} inconclusive)" if rate["inconclusive"] else ""
                return f"{rate['k']}/{rate['n']}{extra}"

            rows.append(f"| {defense} | {precision} | {cell(fa)} | {cell(det)} |")
    head = [
        "| check | artifact precision | false alarms on clean controls | target named on "
        "poisoned models |",
        "|---|---|---|---|",
    ]
    return "\n".join(head + rows) + "\n"
