"""One small interface for every backdoor defense.

A defense receives the :class:`~harness.runtime.adapter.RuntimeAdapter` of the model under audit
(any
precision), the data it needs (:class:`DefenseData`) and a seeded ``numpy.random.Generator``, and
returns a typed :class:`DefenseResult`. It never imports torch training code or onnxruntime,
never prints and never writes files: only the runner persists, only the report renders.

Each defense declares what it needs from the model (:class:`Need`) and its validated parameters
(a pydantic model with the paper's defaults). :meth:`Defense.run` checks the needs first, so a
cell that cannot run says ``not_applicable`` with the reason, and turns any exception into
``status="error"`` with the message — never into ``detected: false``.

Verdicts are three-valued (:class:`Verdict`): ``detected``, ``not_detected`` or
``inconclusive`` (with ``verdict_reason``: labels that did not converge, saturated gradients, too
few samples, an unusable threshold). An inconclusive cell is never counted as a hit or a miss.

- detection defenses (inspection, data filtering, input filtering): without ground truth
  (``DefenseData.target_label`` is ``None``: a clean control or a real audit) ``detected`` means
  the defense raised an alarm, so on a clean control it is a false positive. With a known target
  (a poisoned model under evaluation) a label-flagging defense (``flags_labels``: NC, AC, SS)
  ``detected`` means the target was among the flagged labels (:func:`label_verdict`). That alone
  would count "flags 10 of 43 labels, the target among them" as a hit, so what was flagged is
  reported in full beside it: ``flagged_labels``; ``target_hit`` (the target was flagged),
  ``exact_target_hit`` (the target and nothing else was flagged) and ``false_alarm_labels`` (every
  other flagged label). Defenses that flag inputs, not labels (STRIP), leave these ``None``/empty.
- repair defenses (Fine-Pruning): ``detected`` means the backdoor was removed (final ASR and
  clean-accuracy loss within the defense's success bounds).

``detected`` (bool) is kept for readers of older stores: ``True``/``False`` for a decided
verdict, ``None`` when inconclusive.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Generic, Literal, TypeVar, cast

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

from defenses.deployed import DeployedModel
from defenses.fanout import LabelMap
from harness.core.errors import BlindspotsError, validation_message
from harness.core.registry import Registry


class Need(StrEnum):
    """Capabilities a defense may require from the model or the audit setting."""

    LOGITS = "logits"
    ACTIVATIONS = "activations"
    GRADIENTS = "gradients"
    CHANNEL_MASK = "channel_mask"
    RETRAIN = "retrain"
    TRAIN_DATA = "train_data"
    TRIGGERED_INPUTS = "triggered_inputs"
    REFERENCE = "reference"
    """The FP32 file beside a quantized one (``DefenseData.reference``)."""


class Group(StrEnum):
    """The literature's grouping (TrojanZoo, BackdoorBench)."""

    MODEL_INSPECTION = "model_inspection"
    DATA_FILTERING = "data_filtering"
    INPUT_FILTERING = "input_filtering"
    REPAIR = "repair"


class Status(StrEnum):
    OK = "ok"
    NOT_APPLICABLE = "not_applicable"
    ERROR = "error"


class Verdict(StrEnum):
    """A completed defense's answer; ``inconclusive`` is neither a hit nor a miss."""

    DETECTED = "detected"
    NOT_DETECTED = "not_detected"
    INCONCLUSIVE = "inconclusive"


Pipeline = Literal["run", "qcb", "audit"]
"""The entry points that choose defenses by default (see :attr:`Defense.default_in`)."""

Retrainer = Callable[[np.ndarray], Any]
"""``retrain(keep_channels) -> RuntimeAdapter``: fine-tune the pruned source model on clean
data, re-export and re-quantize it to the adapter's precision (supplied by the runner when a
trainable torch source exists). A retrainer may also offer ``describe() -> dict`` (its
fine-tuning budget), which Fine-Pruning records with its result."""


@dataclass
class DefenseData:
    """Everything a defense may read besides the model.

    ``clean_x``/``clean_y``: held-out clean images (never seen in training) — STRIP's overlay pool,
    NC's optimisation set, Fine-Pruning's ranking / accuracy set.
    ``train_x``/``train_y``: the training set as the model saw it (possibly poisoned) — AC, SS.
    ``poison_mask``: ground truth over the training set, when known (for precision/recall).
    ``triggered_x``: test inputs stamped with the trigger (STRIP's TPR, Fine-Pruning's ASR).
    ``target_label``: the attack's target for poisoned models, ``None`` for clean controls.
    ``poison_rate``: the rate the auditor assumes (SS's ε).
    ``reference``: the adapter of the same model's FP32 artifact, when the cell is a quantized
    one and the FP32 file is at hand (deployment-differential checks compare the two).
    ``label_map``: where per-label tasks run (Neural Cleanse's trigger searches), injected by the
    pipeline, which owns the executors (:mod:`defenses.fanout`); None: in this process.
    ``progress``: where a long defense reports how far it is, one line at a time (Neural
    Cleanse: each label as it finishes, and a heartbeat), so a 10-minute audit does not look
    hung; None: silent. It only reads counters and the clock, never changes a number.
    """

    num_classes: int
    clean_x: np.ndarray
    clean_y: np.ndarray
    train_x: np.ndarray | None = None
    train_y: np.ndarray | None = None
    poison_mask: np.ndarray | None = None
    triggered_x: np.ndarray | None = None
    target_label: int | None = None
    poison_rate: float | None = None
    retrainer: Retrainer | None = None
    reference: DeployedModel | None = None
    label_map: LabelMap | None = None
    progress: Callable[[str], None] | None = None


class DefenseResult(BaseModel):
    """What a defense found. JSON-serialisable apart from ``arrays`` (saved by the runner).

    In JSON (``model_dump_json``, what the runner stores) an infinite number stays infinite,
    written as Python's ``Infinity`` constant, and NaN becomes ``null``: Neural Cleanse's score is
    ``+inf`` when the MAD of the norms is 0, a score that ranks highest (protocol v2 §4.1), not a
    missing one, while NaN (an AUROC with an empty side) is no number. ``json.loads`` reads
    ``Infinity`` back as ``float("inf")``; the published ``report.json`` spells it as a string
    (:mod:`harness.report.schema`).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, ser_json_inf_nan="constants")

    defense: str
    group: Group
    status: Status
    reason: str | None = None
    verdict: Verdict | None = None
    verdict_reason: str | None = None
    detected: bool | None = None
    target_hit: bool | None = None
    exact_target_hit: bool | None = None
    false_alarm_labels: list[int] = Field(default_factory=list)
    score: float | None = None
    score_name: str | None = None
    scores: dict[str, float] = Field(default_factory=dict)
    flagged_labels: list[int] = Field(default_factory=list)
    threshold: float | None = None
    queries: int = 0
    wall_time_s: float = 0.0
    params: dict[str, Any] = Field(default_factory=dict)
    details: dict[str, Any] = Field(default_factory=dict)
    per_sample_scores: np.ndarray | None = Field(default=None, exclude=True)
    arrays: dict[str, np.ndarray] = Field(default_factory=dict, exclude=True)

    @model_serializer(mode="wrap")
    def _nan_as_null(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
        data = handler(self)
        return _nan_to_none(data) if info.mode_is_json() else data


def _nan_to_none(value: Any) -> Any:
    """NaN → ``None`` throughout a JSON-ready value (infinities are kept)."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


@dataclass
class Finding:
    """What :meth:`Defense._run` returns; :meth:`Defense.run` adds status, timing and queries.

    ``detected`` is the decided answer; set ``inconclusive`` to a reason when the defense cannot
    decide (the verdict then is ``inconclusive`` whatever ``detected`` says).
    """

    detected: bool
    inconclusive: str | None = None
    score: float | None = None
    score_name: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    flagged_labels: list[int] = field(default_factory=list)
    threshold: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    per_sample_scores: np.ndarray | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


class NotApplicable(Exception):  # noqa: N818 - it is an outcome, not a failure
    """Raised inside a defense when the cell cannot run here (reported, not an error)."""


P = TypeVar("P", bound=BaseModel)


class Defense(ABC, Generic[P]):
    """Base of all defenses: parameter validation, need checks, timing, error capture.

    Generic in its parameter model: ``class Strip(Defense[StripParams])`` makes ``self.params``
    a ``StripParams`` to the type checker, with ``Params = StripParams`` for validation.
    """

    name: ClassVar[str]
    group: ClassVar[Group]
    needs: ClassVar[frozenset[Need]]
    Params: ClassVar[type[BaseModel]]
    params: P
    paper: ClassVar[str]
    flags_labels: ClassVar[bool] = True
    """Whether the defense names suspect labels (``target_hit`` is only defined if it does)."""
    default_in: ClassVar[frozenset[Pipeline]] = frozenset({"run", "qcb", "audit"})
    """The pipelines that run this defense when their config names no defenses
    (:func:`default_defenses`): ``run`` (experiments and sweeps), ``qcb`` and ``audit``."""

    def __init__(self, params: BaseModel | dict[str, Any] | None = None) -> None:
        if isinstance(params, BaseModel):
            params = params.model_dump()
        try:
            self.params = cast(P, self.Params(**(params or {})))
        except ValidationError as exc:
            message = validation_message(exc, f"{self.name} parameter", self.Params.model_fields)
            raise BlindspotsError(message) from None

    def missing_needs(self, adapter: DeployedModel, data: DefenseData) -> str | None:
        """Reason this defense cannot run on ``adapter``/``data``, or None if it can.

        Every :class:`Need` is checked here, before any work, so a cell that cannot run says
        ``not_applicable`` with the reason instead of failing half-way.
        """
        if Need.LOGITS in self.needs and not any(
            callable(getattr(adapter, answer, None)) for answer in ("logits", "predict")
        ):
            return "the model answers no class scores"
        if Need.GRADIENTS in self.needs and not callable(getattr(adapter, "gradient_oracle", None)):
            return "the model offers no gradient oracle"
        if Need.RETRAIN in self.needs and data.retrainer is None:
            return "needs a retrainable source model (the checkpoint the file was exported from)"
        if Need.REFERENCE in self.needs and (
            data.reference is None or getattr(adapter, "precision", None) == "fp32"
        ):
            return "needs the FP32 reference of a quantized artifact"
        if Need.ACTIVATIONS in self.needs and not adapter.layers:
            return "the model exposes no intermediate activations"
        if Need.CHANNEL_MASK in self.needs and "last_conv" not in adapter.layers:
            return "no last convolutional layer to mask"
        if Need.TRAIN_DATA in self.needs and (data.train_x is None or data.train_y is None):
            return "needs the training set the model was trained on"
        if Need.TRIGGERED_INPUTS in self.needs and data.triggered_x is None:
            return "needs triggered inputs to evaluate"
        return None

    def run(
        self, adapter: DeployedModel, data: DefenseData, rng: np.random.Generator
    ) -> DefenseResult:
        """Run the defense; never raises for a failure inside the method (see module doc)."""
        base: dict[str, Any] = {
            "defense": self.name,
            "group": self.group,
            "params": self.params.model_dump(),
        }
        reason = self.missing_needs(adapter, data)
        if reason is not None:
            return DefenseResult(status=Status.NOT_APPLICABLE, reason=reason, **base)
        queries_before = adapter.counter.images
        started = time.perf_counter()
        try:
            finding = self._run(adapter, data, rng)
        except NotApplicable as exc:
            return DefenseResult(
                status=Status.NOT_APPLICABLE,
                reason=str(exc),
                wall_time_s=time.perf_counter() - started,
                queries=adapter.counter.images - queries_before,
                **base,
            )
        except Exception as exc:  # every failure is reported as such, never as "not detected"
            message = str(exc).splitlines()[0] if str(exc) else ""
            return DefenseResult(
                status=Status.ERROR,
                reason=f"{type(exc).__name__}: {message}",
                wall_time_s=time.perf_counter() - started,
                queries=adapter.counter.images - queries_before,
                **base,
            )
        verdict = verdict_of(finding)
        flagged = [int(v) for v in finding.flagged_labels]
        return DefenseResult(
            status=Status.OK,
            verdict=verdict,
            verdict_reason=finding.inconclusive,
            detected=None if verdict is Verdict.INCONCLUSIVE else bool(finding.detected),
            **self._target_fields(flagged, data.target_label),
            score=None if finding.score is None else float(finding.score),
            score_name=finding.score_name,
            scores={k: float(v) for k, v in finding.scores.items()},
            flagged_labels=flagged,
            threshold=None if finding.threshold is None else float(finding.threshold),
            queries=adapter.counter.images - queries_before,
            wall_time_s=time.perf_counter() - started,
            details=finding.details,
            per_sample_scores=finding.per_sample_scores,
            arrays=finding.arrays,
            **base,
        )

    def _target_fields(self, flagged: list[int], target: int | None) -> dict[str, Any]:
        """What the flagged labels say about a known target (see module doc)."""
        if not self.flags_labels:
            return {"target_hit": None, "exact_target_hit": None, "false_alarm_labels": []}
        known = target is not None
        return {
            "target_hit": target in flagged if known else None,
            "exact_target_hit": flagged == [target] if known else None,
            "false_alarm_labels": [v for v in flagged if v != target],
        }

    @abstractmethod
    def _run(self, adapter: DeployedModel, data: DefenseData, rng: np.random.Generator) -> Finding:
        """The method itself. Raise :class:`NotApplicable` for cells that cannot run."""


def verdict_of(finding: Finding) -> Verdict:
    """The three-valued verdict of a finding (see module doc)."""
    if finding.inconclusive:
        return Verdict.INCONCLUSIVE
    return Verdict.DETECTED if finding.detected else Verdict.NOT_DETECTED


def label_verdict(flagged: list[int], target_label: int | None) -> bool:
    """Detection rule shared by label-flagging defenses: the target was flagged when it is
    known, any alarm when it is not (see module doc)."""
    if target_label is None:
        return bool(flagged)
    return target_label in flagged


DEFENSES: Registry[type[Defense[Any]]] = Registry("defense")
"""Built-ins below, in the order reports list them; third parties add entry points in the
``blindspots.defenses`` group (:mod:`harness.core.registry`)."""

for _name, _module in {
    "neural_cleanse": "defenses.neural_cleanse",
    "activation_clustering": "defenses.activation_clustering",
    "spectral_signatures": "defenses.spectral_signatures",
    "strip": "defenses.strip",
    "fine_pruning": "defenses.fine_pruning",
    "deployment_diff": "defenses.deployment_diff",
}.items():
    DEFENSES.register_lazy(_name, _module)


def build_defense(name: str, params: dict[str, Any] | None = None) -> Defense[Any]:
    """Instantiate the registered defense ``name`` with validated parameters."""
    return DEFENSES.get(name)(params)


def default_defenses(pipeline: Pipeline) -> list[str]:
    """The defenses ``pipeline`` runs when its config names none, in registration order.

    Derived from the registry, so a defense added by a third party's entry point joins the
    defaults it declares in :attr:`Defense.default_in` with no edit here. Imports every
    registered defense (their classes carry the declaration).
    """
    return [name for name, cls in DEFENSES.items() if pipeline in cls.default_in]
