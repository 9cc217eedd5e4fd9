"""The report document read from a result store, and the ways the tables and figures walk it.

:func:`build_report` assembles ``report.json``'s content (schema in :mod:`harness.report.schema`)
from the store's records and metadata files, leaving out whatever is damaged with one warning line
each; the rest of this module answers what every renderer asks of that document — its groups,
precisions, defenses and seeds in the config's order — and builds the figures from the per-cell
arrays.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from harness.core.errors import BlindspotsError
from harness.pipeline.store import FinishedCell, ResultStore, read_json
from harness.report.figures.evidence import CellArrays, defense_evidence, seed_order
from harness.report.figures.model import GroupSummary, Plot
from harness.report.figures.plots import DEFENSE_FIGURES, defense_plots, overview_plots
from harness.report.primary import primary_metrics
from harness.report.tally import GroupKey, group_key, group_label, ordered, summarize

SCHEMA_VERSION = 1
logger = logging.getLogger(__name__)


def build_report(folder: str | Path) -> dict[str, Any]:
    """The report.json document for the results stored in ``folder``.

    A damaged store line or metadata file is left out with a one-line warning (logged), never a
    traceback: whatever is intact is still worth reporting.
    """
    folder = Path(folder)
    store = ResultStore(folder)
    runs = store.records(FinishedCell)
    config = _read_json(folder / "config.json")
    env = _read_json(folder / "environment.json")
    report = {
        "schema_version": SCHEMA_VERSION,
        "config": config,
        "environment": env,
        "runs": runs,
        "summary": summarize(runs),
    }
    report["primary_metrics"] = primary_metrics(report, report_groups(report))
    return report


def _read_json(path: Path) -> dict[str, Any]:
    """A metadata file as a dict; ``{}`` (with a warning if damaged) when it cannot be one."""
    if not path.is_file():
        return {}
    try:
        document = read_json(path)
    except BlindspotsError as exc:
        logger.warning(f"{exc}; the report is built without it")
        return {}
    if not isinstance(document, dict):
        logger.warning(f"{path} is not a JSON object; the report is built without it")
        return {}
    return document


def _listed(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def report_groups(report: dict[str, Any]) -> list[GroupKey]:
    """The (dataset, model, attack) groups of the runs, in the config's order."""
    config = report.get("config", {})
    rows = report.get("summary") or []
    keys = {group_key(run) for run in report["runs"]} | {group_key(r) for r in rows}
    ranks = [_listed(config.get(axis)) for axis in ("dataset", "model", "attack")]

    def rank(key: GroupKey) -> tuple[Any, ...]:
        return tuple(
            (order.index(v) if v in order else len(order), str(v))
            for v, order in zip(key, ranks, strict=True)
        )

    return sorted(keys, key=rank)


def group_slug(key: GroupKey) -> str:
    """File-name-safe ``dataset-model-attack``."""
    parts = [re.sub(r"[^A-Za-z0-9_.]+", "_", str(v)) for v in key if v is not None]
    return "-".join(parts) or "results"


def report_precisions(report: dict[str, Any], key: GroupKey | None = None) -> list[str]:
    """Precisions present (in ``key``'s group, or anywhere), in the config's order."""
    rows = [*(report.get("summary") or []), *report["runs"]]
    return ordered(
        {r["precision"] for r in rows if key is None or group_key(r) == key},
        _listed(report.get("config", {}).get("precisions")),
    )


def report_defenses(report: dict[str, Any]) -> list[str]:
    """The configured defenses, then any others the runs carry (so a column never goes missing)."""
    listed = _listed(report.get("config", {}).get("defenses"))
    seen = {name for row in report.get("summary") or [] for name in row["defenses"]}
    return listed + sorted(seen - set(listed))


def group_summary(report: dict[str, Any], key: GroupKey) -> GroupSummary:
    """One group's summary rows in the shape :mod:`harness.report.figures.plots` draws."""
    rows = [r for r in report["summary"] if group_key(r) == key]
    present = {name for row in rows for name in row["defenses"]}
    return GroupSummary(
        label=group_label(key),
        slug=group_slug(key),
        precisions=report_precisions(report, key),
        rows=rows,
        defenses=[name for name in report_defenses(report) if name in present],
        n_seeds=len(group_seeds(report, key)) or None,
    )


def group_seeds(report: dict[str, Any], key: GroupKey) -> list[Any]:
    """The seeds any finished cell of the group ran, in order."""
    seeds = {run.get("seed") for run in report["runs"] if group_key(run) == key}
    return sorted(seeds, key=seed_order)


def build_plots(report: dict[str, Any], folder: str | Path) -> list[Plot]:
    """Every figure of the report; ``folder`` is the run folder the per-cell arrays live in."""
    keys = report_groups(report)
    if not report["runs"]:
        return []
    groups = {key: group_summary(report, key) for key in keys}
    plots = overview_plots([groups[key] for key in keys])
    arrays = CellArrays(Path(folder))
    for name in report_defenses(report):
        if name not in DEFENSE_FIGURES:
            continue
        for key in keys:
            runs = [r for r in report["runs"] if group_key(r) == key]
            if not any(name in r.get("defenses", {}) for r in runs):
                continue
            plots += defense_plots(name, groups[key], defense_evidence(runs, name, arrays))
    return plots
