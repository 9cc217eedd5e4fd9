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

Infinite numbers. Strict JSON has no infinity, yet a score can be one: protocol v2 §4.1 makes
Neural Cleanse's anomaly index +∞ when the MAD of the norms is 0, and that is a score that ranks
highest, not a missing one. ``report.json`` therefore writes ±∞ as the JSON *strings*
``"Infinity"`` and ``"-Infinity"`` (:func:`harness.report.document.json_safe`), wherever they
occur — the typed :data:`Score` fields and the open ``details`` alike — and NaN, which is no
number, as ``null``. The strings are what Python's ``float()`` and JavaScript's ``Number()``
read back as infinities; :data:`Score` fields turn them back into floats on validation and
into the strings again on ``model_dump_json``, so ``report.json`` round-trips through
:class:`ReportDocument`. (``results.jsonl``, the store, is Python's JSON and keeps ``Infinity``
as a bare constant; only the published ``report.json`` is strict.)
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer, WithJsonSchema

SCHEMA_VERSION = 1
INFINITIES = {"Infinity": math.inf, "-Infinity": -math.inf}
"""How ``report.json`` spells ±∞ (JSON strings; strict JSON has no infinite number)."""


def _read_infinity(value: Any) -> Any:
    return INFINITIES.get(value, value) if isinstance(value, str) else value


def infinity_text(value: float) -> float | str:
    """``value`` for a JSON document: ±∞ as ``"Infinity"`` / ``"-Infinity"``, else itself."""
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


Score = Annotated[
    float,
    BeforeValidator(_read_infinity),
    PlainSerializer(infinity_text, return_type=float | str, when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [{"type": "number"}, {"enum": ["Infinity", "-Infinity"]}],
            "description": 'a number; ±∞ is written as the string "Infinity" or '
            '"-Infinity" (strict JSON has no infinite number), NaN as null',
        }
    ),
]
"""A float that may be ±∞ (see the module docstring for how ``report.json`` writes it)."""


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class DefenseRecord(_Open):
    """One defense on one cell, as :class:`defenses.base.DefenseResult` serialises it.

    Only ``status`` is required, as the result store requires it
    (:class:`harness.pipeline.store.DefenseOutcome`): stores written by earlier versions lack
    some of the other fields, and their reports must still build. ``score``, ``scores`` and
    ``threshold`` are :data:`Score` s: Neural Cleanse's ``score`` (and its per-label
    ``anomaly_index_label_*``) is ``+inf`` when the MAD of the norms is 0 (protocol v2 §4.1).
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
    score: Score | None = None
    score_name: str | None = None
    scores: dict[str, Score | None] = {}
    flagged_labels: list[int] = []
    threshold: Score | None = None
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


class Rate(_Open):
    """``k`` of ``n`` decided runs with the Wilson 95% interval (none when ``n`` is 0); runs that
    count in no rate: ``inconclusive``, and ``not_ok`` (error, not applicable, missing)."""

    k: int
    n: int
    rate: float | None
    ci: list[float] | None
    inconclusive: int
    not_ok: int


class AurocEntry(_Open):
    """§5.1: the AUROC of the model-level score, poisoned vs clean, its bootstrap CI and (v2)
    the exact one-sided Mann–Whitney test with its Holm adjustment; ``works`` is the claim
    "D works at P" (CI lower end > 0.5 and Holm p < α), ``None`` without a CI.

    The fields added in v2 have defaults so a ``report.json`` written under v1 still validates.
    """

    score_name: str
    n_poisoned: int
    n_clean: int
    missing_scores: int
    value: float | None
    ci: list[float] | None
    note: Literal["n too small", "no score on one side"] | None
    ci_above_half: bool | None
    ci_degenerate: bool | None = None
    p: float | None = None
    p_holm: float | None = None
    holm_family: int = 0
    works: bool | None = None


class PairedTest(_Open):
    """§5.3: a quantized precision against FP32 over the same seeds (exact McNemar, Holm)."""

    n_pairs: int
    fp32_only: int
    precision_only: int
    both: int
    neither: int
    left_out_inconclusive: int
    left_out_missing: int
    p: float | None
    p_holm: float | None
    holm_family: int
    reading: str | None


class RepairRates(_Open):
    """§5.2 for Fine-Pruning: removal and accuracy kept, fine-tuned and the no-fine-tune control."""

    removal: Rate
    accuracy_kept: Rate
    control_removal: Rate
    control_accuracy_kept: Rate
    fine_tune_data: dict[str, int]


class DefenseMetrics(_Open):
    """One pre-registered defense at one precision of one group."""

    defense: str
    precision: str
    auroc: AurocEntry | None
    detection: Rate | None
    false_alarm: Rate | None
    repair: RepairRates | None
    paired_poisoned: PairedTest | None
    paired_clean: PairedTest | None


class NcFlag(_Open):
    seed: int
    label: int
    rate: float | None
    confirmed: bool


class NcConfirmation(_Open):
    """Neural Cleanse's profile and the onnxruntime confirmation of its flags (§4.1)."""

    precision: str
    poisoned: bool
    runs: int
    profiles: dict[str, int]
    confirm_threshold: float | None
    not_recorded: int
    flags: list[NcFlag]
    confirmed: int
    made_inconclusive: int


class RegimeRow(_Open):
    """One poisoned cell's AC/SS operating regime, from the training sample's ground truth."""

    seed: int
    precision: str
    target_poison_fraction: float | None
    ss_removed_fraction: float | None
    ss_poison_recall: float | None
    ss_epsilon_source: str | None
    ss_flagged: list[int] | None
    ac_purity: float | None
    ac_recall: float | None
    ac_flagged: list[int] | None


class StripRow(_Open):
    """STRIP's blend and its mean TPR/FRR at both thresholds over one precision's ok runs."""

    precision: str
    poisoned: bool
    runs: int
    blends: dict[str, int]
    tpr_normal: float | None
    frr_normal: float | None
    tpr_empirical: float | None
    frr_empirical: float | None


class InvalidAttack(_Open):
    seed: int
    fp32_asr: float | None
    reason: str


class MissingDefense(_Open):
    """v2 §1: a pre-registered defense no cell of the group ran, and why (as far as known)."""

    defense: str
    reason: str


class IncompleteDefense(_Open):
    """v2 §1: a pre-registered defense that ran on only some of the group's cells."""

    defense: str
    cells_run: int
    cells: int
    seeds_incomplete: list[int]


class GroupMetrics(_Open):
    """Every §5 metric of one (dataset, model, attack) group."""

    dataset: str | None
    model: str | None
    attack: str | None
    seeds: list[int]
    precisions: list[str]
    invalid_attacks: list[InvalidAttack]
    duplicate_cells: int
    holm_family: dict[str, int]
    defenses: list[DefenseMetrics]
    not_preregistered: list[str]
    missing_defenses: list[MissingDefense] = []
    incomplete_defenses: list[IncompleteDefense] = []
    neural_cleanse: list[NcConfirmation]
    regime: list[RegimeRow]
    strip: list[StripRow] = []


class PrimaryMetrics(_Open):
    """docs/protocol.md §5's primary metrics, with the protocol version and the runs' commit."""

    protocol_version: int
    protocol: str
    provenance: dict[str, Any]
    settings: dict[str, Any]
    groups: list[GroupMetrics]


class ReportDocument(_Open):
    """The whole ``report.json``."""

    schema_version: Literal[1]
    config: dict[str, Any]
    environment: dict[str, Any]
    runs: list[RunRecord]
    summary: list[SummaryRow]
    primary_metrics: PrimaryMetrics | None = None


def json_schema() -> str:
    """The JSON Schema of ``report.json`` (what ``docs/report.schema.json`` holds)."""
    return json.dumps(ReportDocument.model_json_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(json_schema(), end="")
