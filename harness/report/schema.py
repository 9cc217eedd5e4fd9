"""``report.json`` as pydantic models: the schema readers rely on, checked on every write.

The report is the project's published interface — tables, plots and other people's scripts read
it — so its shape is declared here rather than implied by the code that builds it.
:func:`harness.report.document.write_report` validates every document against
:class:`ReportDocument` before writing, so a change that drops or retypes a field fails there,
not in a reader's script. ``docs/report.schema.json`` is the JSON Schema generated from these
models (``python -m harness.report.schema > docs/report.schema.json``; a test keeps it current).

Fields the harness adds per defense (``details``, ``params``) or per run (``timings``) stay open
dictionaries; everything a table is computed from is typed. Extra keys are allowed so a newer
writer's document still validates under an older reader, as long as nothing it relied on moved.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = 1


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class DefenseRecord(_Open):
    """One defense on one cell, as :class:`defenses.base.DefenseResult` serialises it.

    Only ``status`` is required, as the result store requires it
    (:class:`harness.pipeline.store.DefenseOutcome`): stores written by earlier versions lack
    some of the other fields, and their reports must still build.
    """

    defense: str | None = None
    group: str | None = None
    status: Literal["ok", "not_applicable", "error"]
    reason: str | None = None
    verdict: Literal["detected", "not_detected", "inconclusive"] | None = None
    verdict_reason: str | None = None
    detected: bool | None = None
    target_hit: bool | None = None
    exact_target_hit: bool | None = None
    false_alarm_labels: list[int] = []
    score: float | None = None
    score_name: str | None = None
    scores: dict[str, float | None] = {}
    flagged_labels: list[int] = []
    threshold: float | None = None
    queries: int = 0
    wall_time_s: float = 0.0
    params: dict[str, Any] = {}
    details: dict[str, Any] = {}


class KernelDriftRecord(_Open):
    """The same cell under the other INT8 kernel profile (only where the host's differ)."""

    kernels: dict[str, Any]
    clean_acc: float
    asr: float
    agreement_fp32: float
    defenses: dict[str, dict[str, Any]] = {}


class RunRecord(_Open):
    """One cell: (dataset, model, attack, seed, poisoned/clean, precision)."""

    dataset: str
    model: str
    attack: str
    attack_params: dict[str, Any] = {}
    seed: int
    poisoned: bool
    precision: str
    cell: str | None = None
    clean_acc: float
    asr: float
    agreement_fp32: float
    n_test: int | None = None
    n_triggered: int | None = None
    per_sample_inference: bool | None = None
    artifacts: dict[str, str] = {}
    kernels: dict[str, Any] = {}
    kernel_drift: KernelDriftRecord | None = None
    timings: dict[str, float] = {}
    defenses: dict[str, DefenseRecord] = {}
    arrays: str | None = None


class DefenseTally(_Open):
    """One defense over the seeds of one summary row."""

    group: str | None = None
    ok: int
    errors: int
    not_applicable: int
    decided: int
    detected: int
    inconclusive: int
    inconclusive_reasons: dict[str, int] = {}
    detection_rate: float | None = None
    detection_ci: list[float] | None = None
    target_known: int | None = None
    target_hit: int | None = None
    exact_target_hit: int | None = None
    other_flagged: float | None = None
    false_alarm_labels: dict[str, int] = {}


class SummaryRow(_Open):
    """A (dataset, model, attack, precision, poisoned) row over its seeds."""

    dataset: str
    model: str
    attack: str
    precision: str
    poisoned: bool
    n_seeds: int
    clean_acc_mean: float | None
    clean_acc_std: float | None
    asr_mean: float | None
    asr_std: float | None
    agreement_fp32_mean: float | None
    agreement_fp32_std: float | None
    defenses: dict[str, DefenseTally] = {}


class ReportDocument(_Open):
    """The whole ``report.json``."""

    schema_version: Literal[1]
    config: dict[str, Any]
    environment: dict[str, Any]
    runs: list[RunRecord]
    summary: list[SummaryRow]


def json_schema() -> str:
    """The JSON Schema of ``report.json`` (what ``docs/report.schema.json`` holds)."""
    return json.dumps(ReportDocument.model_json_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(json_schema(), end="")
