"""What a CI job reads of an audit: an exit status and a JUnit XML summary.

``blindspots audit`` exited 0 whatever it found, so a pipeline could not stop on a suspicious
model. ``--fail-on`` chooses the least severe verdict that fails the job:

=====  ===================================================================================
exit   meaning
=====  ===================================================================================
0      no verdict at or above ``--fail-on`` (always with ``--fail-on never``, the default)
1      a check is ``suspicious`` (``--fail-on suspicious`` or ``inconclusive``)
3      none is suspicious, but one is ``inconclusive`` or ``error`` (``--fail-on inconclusive``)
2      the audit did not run: bad input, or a model refused at the door (one-line error)
=====  ===================================================================================

Distinct codes let a job tell "the model looks backdoored" from "the audit could not decide",
and both from "the input was wrong". ``not applicable`` never fails a job: a check that cannot
run on this model says so and why.

JUnit XML, because every CI system (GitHub Actions reporters, GitLab, Jenkins) renders it: one
test case per (artifact, check). ``suspicious`` is a ``<failure>``, ``error`` an ``<error>``,
``not applicable`` ``<skipped>``; ``inconclusive`` is a ``<failure>`` when the job fails on it
and ``<skipped>`` with the reason otherwise, so the XML and the exit status tell one story.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Literal

from harness.audit.run import AuditVerdict
from harness.core.atomic import atomic_write_text

FailOn = Literal["suspicious", "inconclusive", "never"]
FAIL_ON: tuple[FailOn, ...] = ("suspicious", "inconclusive", "never")

EXIT_CLEAN = 0
EXIT_SUSPICIOUS = 1
EXIT_BAD_INPUT = 2
EXIT_UNDECIDED = 3

UNDECIDED = {AuditVerdict.INCONCLUSIVE, AuditVerdict.ERROR}


def _verdicts(report: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (cell["artifact"], name, entry)
        for cell in report["cells"]
        for name, entry in cell.get("defenses", {}).items()
    ]


def exit_status(report: dict[str, Any], fail_on: FailOn) -> int:
    """The job's exit status for ``report`` under ``--fail-on`` (table in the module doc)."""
    if fail_on == "never":
        return EXIT_CLEAN
    found = {AuditVerdict(entry["verdict"]) for _, _, entry in _verdicts(report)}
    if AuditVerdict.SUSPICIOUS in found:
        return EXIT_SUSPICIOUS
    if fail_on == "inconclusive" and found & UNDECIDED:
        return EXIT_UNDECIDED
    return EXIT_CLEAN


def junit_xml(report: dict[str, Any], fail_on: FailOn) -> str:
    """The audit as a JUnit XML test suite (one case per artifact and check)."""
    cases = _verdicts(report)
    suite = ET.Element(
        "testsuite",
        name=f"blindspots audit {Path(report['model']['path']).name}",
        tests=str(len(cases)),
    )
    counts = {"failures": 0, "errors": 0, "skipped": 0}
    for artifact, name, entry in cases:
        case = ET.SubElement(suite, "testcase", classname=f"audit.{artifact}", name=name)
        verdict = AuditVerdict(entry["verdict"])
        why = str(entry.get("reason") or entry.get("rests_on") or "")
        labels = entry.get("suspected_labels") or []
        if verdict is AuditVerdict.SUSPICIOUS:
            message = f"suspicious: suspected labels {labels}; {why}"
            ET.SubElement(case, "failure", message=message, type="suspicious").text = message
            counts["failures"] += 1
        elif verdict is AuditVerdict.ERROR:
            ET.SubElement(case, "error", message=why, type="error").text = why
            counts["errors"] += 1
        elif verdict is AuditVerdict.INCONCLUSIVE and fail_on == "inconclusive":
            message = f"inconclusive: {why}"
            ET.SubElement(case, "failure", message=message, type="inconclusive").text = message
            counts["failures"] += 1
        elif verdict in (AuditVerdict.INCONCLUSIVE, AuditVerdict.NOT_APPLICABLE):
            ET.SubElement(case, "skipped", message=f"{verdict}: {why}")
            counts["skipped"] += 1
        else:
            ET.SubElement(case, "system-out").text = f"clean: {why}"
    for key, value in counts.items():
        suite.set(key, str(value))
    ET.indent(suite)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, "unicode") + "\n"


def write_junit(report: dict[str, Any], fail_on: FailOn, path: Path) -> None:
    """Write :func:`junit_xml` atomically (a CI reporter never reads half a file)."""
    if path.parent != Path("") and not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, junit_xml(report, fail_on))
