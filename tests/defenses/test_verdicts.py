"""Three-valued verdicts end to end: what a defense returns, how the report counts it.

An inconclusive cell is neither a hit nor a miss: these tests pin that down in the result
(:mod:`defenses.base`), the paper-style table and its rates with Wilson intervals
(:mod:`harness.report.tally`, :func:`harness.core.metrics.wilson_interval`) and the auditor's
reading
(:func:`harness.audit.run.audit_verdict`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pytest
from pydantic import BaseModel

from defenses.base import (
    Defense,
    DefenseData,
    DefenseResult,
    Finding,
    Group,
    Need,
    Status,
    Verdict,
)
from harness.audit.run import audit_verdict
from harness.core.metrics import wilson_interval
from harness.report.render import render_markdown
from harness.report.tally import summarize, tally_defense


@dataclass
class Counter:
    images: int = 0


@dataclass
class NullAdapter:
    layers: list[str] = field(default_factory=list)
    counter: Counter = field(default_factory=Counter)


class Fixed(BaseModel):
    flagged: list[int] = []
    inconclusive: str | None = None


class FlagsFixed(Defense):
    """Flags the labels it is told to (not registered: built directly)."""

    name = "flags_fixed"
    group = Group.MODEL_INSPECTION
    needs: ClassVar[frozenset[Need]] = frozenset()
    Params = Fixed
    paper = "n/a"

    def _run(self, adapter, data: DefenseData, rng: np.random.Generator) -> Finding:
        flagged = list(self.params.flagged)
        return Finding(
            detected=data.target_label in flagged
            if data.target_label is not None
            else bool(flagged),
            inconclusive=self.params.inconclusive,
            flagged_labels=flagged,
        )


class FiltersInputs(FlagsFixed):
    name = "filters_inputs"
    flags_labels = False


def _run(defense: type[Defense], target: int | None, **params) -> DefenseResult:
    data = DefenseData(num_classes=10, clean_x=np.zeros((1, 2, 2, 1)), clean_y=np.zeros(1))
    data.target_label = target
    return defense(params).run(NullAdapter(), data, np.random.default_rng(0))


# ------------------------------------------------------------------------------- results
def test_result_reports_what_was_flagged_beside_the_hit():
    hit_among_many = _run(FlagsFixed, target=1, flagged=[1, 25, 7])
    assert hit_among_many.verdict == Verdict.DETECTED and hit_among_many.detected is True
    assert hit_among_many.target_hit is True and hit_among_many.exact_target_hit is False
    assert hit_among_many.false_alarm_labels == [25, 7]
    exact = _run(FlagsFixed, target=1, flagged=[1])
    assert exact.exact_target_hit is True and exact.false_alarm_labels == []
    wrong_label = _run(FlagsFixed, target=1, flagged=[3])
    assert wrong_label.verdict == Verdict.NOT_DETECTED and wrong_label.target_hit is False
    clean = _run(FlagsFixed, target=None, flagged=[4])
    assert clean.detected is True  # an alarm on a clean control: a false positive
    assert clean.target_hit is None and clean.false_alarm_labels == [4]


def test_inconclusive_finding_is_neither_hit_nor_miss():
    result = _run(FlagsFixed, target=1, flagged=[1], inconclusive="labels [3] did not converge")
    assert result.status == Status.OK
    assert result.verdict == Verdict.INCONCLUSIVE and result.detected is None
    assert result.verdict_reason == "labels [3] did not converge"
    assert result.flagged_labels == [1]  # what it found is still reported


def test_input_filters_have_no_target_hit():
    result = _run(FiltersInputs, target=1)
    assert result.target_hit is None and result.exact_target_hit is None
    assert result.false_alarm_labels == []


# ------------------------------------------------------------------------------- Wilson
def test_wilson_interval_matches_the_closed_form_and_stays_in_bounds():
    low, high = wilson_interval(3, 5)
    assert (low, high) == pytest.approx((0.2307, 0.8824), abs=1e-4)
    assert wilson_interval(0, 5) == pytest.approx((0.0, 0.4345), abs=1e-4)
    assert wilson_interval(5, 5) == pytest.approx((0.5655, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)  # no decided run: no information
    narrow, wide = wilson_interval(50, 100), wilson_interval(5, 10)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(6, 5)


# ------------------------------------------------------------------------------- report
def _record(verdict, flagged=(), target_hit=None, exact=None, reason=None, status="ok"):
    return {
        "status": status,
        "group": "model_inspection",
        "verdict": verdict,
        "verdict_reason": reason,
        "detected": None if verdict in (None, "inconclusive") else verdict == "detected",
        "target_hit": target_hit,
        "exact_target_hit": exact,
        "flagged_labels": list(flagged),
        "false_alarm_labels": [k for k in flagged if k != 1]
        if target_hit is not None
        else list(flagged),
        "reason": "boom" if status == "error" else None,
    }


def _runs() -> list[dict]:
    poisoned = [
        _record("detected", [1], True, True),
        _record("detected", [1, 25], True, False),
        _record("not_detected", [25], False, False),
        _record("inconclusive", [1], True, True, reason="labels [3] did not converge"),
        _record(None, status="error"),
    ]
    clean = [
        _record("detected", [25]),
        _record("not_detected"),
        _record("detected", [25, 7]),
        _record("not_detected"),
        _record("inconclusive", reason="threshold unusable"),
    ]
    base = {"precision": "int8-static", "clean_acc": 0.9, "asr": 0.95, "agreement_fp32": 0.99}
    return [
        {**base, "seed": seed, "poisoned": poisoned_model, "defenses": {"nc": res}}
        for poisoned_model, results in ((True, poisoned), (False, clean))
        for seed, res in enumerate(results)
    ]


def test_tally_counts_decided_cells_only_and_what_else_was_flagged():
    rows = {row["poisoned"]: row["defenses"]["nc"] for row in summarize(_runs())}
    poisoned = rows[True]
    assert (poisoned["decided"], poisoned["detected"], poisoned["inconclusive"]) == (3, 2, 1)
    assert poisoned["errors"] == 1
    assert poisoned["detection_rate"] == pytest.approx(2 / 3)
    assert poisoned["detection_ci"] == pytest.approx(list(wilson_interval(2, 3)))
    assert (poisoned["target_hit"], poisoned["exact_target_hit"]) == (2, 1)
    assert poisoned["other_flagged"] == 2 and poisoned["false_alarm_labels"] == {"25": 2}
    assert poisoned["inconclusive_reasons"] == {"labels [3] did not converge": 1}
    clean = rows[False]
    assert (clean["decided"], clean["detected"]) == (4, 2)
    assert clean["false_alarm_labels"] == {"25": 2, "7": 1}


def test_records_from_before_verdicts_read_from_detected():
    old = [{"status": "ok", "detected": True}, {"status": "ok", "detected": None}]
    tally = tally_defense(old)
    assert (tally["decided"], tally["detected"], tally["inconclusive"]) == (1, 1, 1)


def test_paper_table_shows_rates_intervals_exact_hits_and_false_alarms():
    report = {"config": {"precisions": ["int8-static"]}, "runs": _runs()}
    report["summary"] = summarize(report["runs"])
    text = render_markdown(report)
    low, high = wilson_interval(2, 3)
    poisoned_row = next(line for line in text.splitlines() if "| int8-static | poisoned |" in line)
    assert f"2/3 [{low:.2f}–{high:.2f}]" in poisoned_row
    assert "exact 1/3" in poisoned_row and "+0.7 other" in poisoned_row
    assert "1 inconclusive" in poisoned_row and "1 error" in poisoned_row
    clean_row = next(line for line in text.splitlines() if "| int8-static | clean |" in line)
    assert "FA 2/4" in clean_row
    assert "## Clean controls: false alarms" in text
    assert "| nc | int8-static | 2/4 [" in text and "25 (2), 7 (1)" in text
    assert "labels [3] did not converge (1×)" in text and "threshold unusable (1×)" in text


# ------------------------------------------------------------------------------- audit
def test_audit_reads_an_inconclusive_result_as_inconclusive_with_its_reason():
    result = _run(FlagsFixed, target=None, flagged=[3], inconclusive="too few clean samples")
    reading = audit_verdict(result, 10)
    assert reading["verdict"] == "inconclusive"
    assert reading["reason"] == "too few clean samples"
    assert reading["suspected_labels"] == [3]
