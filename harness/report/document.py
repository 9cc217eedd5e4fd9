"""Reports: ``report.json`` (stable schema), ``report.md`` and ``report.html`` with plots.

Everything here is recomputed from the result store's records and per-cell arrays — never by
rerunning a model or a defense — so a report can be rebuilt at any time, including after a
crashed run. The work is split by what each step needs: :mod:`harness.report.data` reads the
store into the report document, :mod:`harness.report.tally` counts runs and verdicts,
:mod:`harness.report.tables` builds the sections, :mod:`harness.report.render` turns them into
Markdown and, with :mod:`harness.report.html` (the document model both renderers share and the
self-contained page), HTML; :mod:`harness.report.figures` gathers each defense's evidence and
draws the figures. This module writes the files.

The only thing the report rebuilds from outside the store is the attack's true trigger for
Neural Cleanse's side-by-side figure: it is a pure function of the stored attack name and
parameters, computed through the attacks registry (:mod:`harness.attacks`).

:func:`write_report` writes ``report.json``, ``report.md``, ``report.html`` and ``plots/*.png``,
each atomically (a crash mid-report leaves the previous file or the new one, never a torn one),
and the report itself is deterministic: the same store gives the same ``report.md`` byte for
byte (no timestamps, no absolute paths).

``report.json`` schema (version 1)::

    {
      "schema_version": 1,
      "config": {...},            # the ExperimentConfig that produced the runs
      "environment": {...},       # versions, CPU INT8 instruction sets, the measured host INT8
                                  # kernel class (int8_kernels) and float kernel settings
      "runs": [                   # one per (dataset, model, attack, seed, poisoned, precision)
        {"dataset", "model", "attack", "attack_params", "seed", "poisoned": bool,
         "precision", "cell" (the cell's content id, ExperimentConfig.cell_key),
         "clean_acc", "asr", "agreement_fp32", "n_test", "n_triggered",
         "per_sample_inference", "artifacts": {"onnx", "sidecar", "state"},
         "kernels": {"profile", "host_kernel_class", "profiles_differ_on_host",
                     "exact_profile_verified", "session_config_entries"},
         "kernel_drift": {...}    # only where host != exact: the cell under the other profile:
                                  # kernels, clean_acc, asr, agreement_fp32,
                                  # defenses{name: {status, detected, score, score_name,
                                  #                 flagged_labels, reason}}
         "timings": {...seconds},
         "defenses": {name: {"defense", "group", "status", "verdict", "verdict_reason",
                             "detected", "target_hit", "exact_target_hit",
                             "false_alarm_labels", "score", "score_name", "scores",
                             "flagged_labels", "threshold", "queries", "wall_time_s",
                             "params", "details", "reason"}},
         "arrays": "arrays/<cell>.npz"}   # per-sample scores, reversed triggers (optional)
      ],
      "summary": [                # aggregated over seeds, one per (dataset, model, attack,
                                  # precision, poisoned); *_std is the sample standard
                                  # deviation (ddof=1), null where only one seed ran
        {"dataset", "model", "attack", "precision", "poisoned", "n_seeds", "clean_acc_mean",
         "clean_acc_std", "asr_mean", "asr_std", "agreement_fp32_mean", "agreement_fp32_std",
         "defenses": {name: {"group", "ok", "errors", "not_applicable",
                             "decided", "detected", "inconclusive", "inconclusive_reasons",
                             "detection_rate", "detection_ci" (Wilson 95%, decided runs only),
                             "target_known", "target_hit", "exact_target_hit",
                             "other_flagged", "false_alarm_labels": {label: runs}}}}
      ],
      "primary_metrics": {        # docs/protocol.md v2 §5 (harness.report.primary)
        "protocol_version": 2, "protocol",
        "provenance": {"blindspots", "git_commit", "git_dirty"},   # null where not recorded
        "settings": {...},        # bootstrap resamples and seed, alpha, FP32 ASR bar, defenses
        "groups": [{"dataset", "model", "attack", "seeds", "precisions",
                    "invalid_attacks": [{"seed", "fp32_asr", "reason"}],
                    "defenses": [{"defense", "precision",
                                  "auroc": {"value", "ci", "ci_degenerate", "note",
                                            "n_poisoned", "n_clean", "p" (exact one-sided
                                            Mann-Whitney), "p_holm", "holm_family",
                                            "works", ...},
                                  "detection", "false_alarm": {"k", "n", "rate", "ci", ...},
                                  "repair" (Fine-Pruning: removal, accuracy kept, control),
                                  "paired_poisoned", "paired_clean": {"fp32_only",
                                      "precision_only", "p", "p_holm", "reading", ...}}],
                    "holm_family", "neural_cleanse" (profiles, ORT confirmation of flags),
                    "regime" (AC/SS per poisoned cell), "not_preregistered",
                    "missing_defenses": [{"defense", "reason"}],     # v2 §1
                    "incomplete_defenses": [{"defense", "cells_run", "cells",
                                             "seeds_incomplete"}]}]
      }
    }

JSON has no NaN or infinity, and ``report.json`` stays a document any strict JSON reader accepts:
NaN (a defense score that came out NaN: no number) is written as ``null``; ±∞ (Neural Cleanse's
anomaly index with a zero MAD, a score that ranks highest, protocol v2 §4.1) as the strings
``"Infinity"`` / ``"-Infinity"``, which the schema's ``Score`` fields read back as floats
(:mod:`harness.report.schema`)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from harness.core.atomic import atomic_write_bytes, atomic_write_text
from harness.core.errors import BlindspotsError, one_line, validation_message
from harness.report.data import build_plots, build_report
from harness.report.figures.model import Plot
from harness.report.render import render_markdown, render_report_html
from harness.report.schema import ReportDocument, infinity_text

logger = logging.getLogger(__name__)


def json_safe(value: Any) -> Any:
    """``value`` with every NaN replaced by ``None`` and every ±inf by ``"Infinity"`` /
    ``"-Infinity"``: JSON has no such numbers, and ``json.dumps`` would otherwise write ``NaN``
    or ``Infinity``, which strict readers reject. An infinite score is a score (protocol v2
    §4.1), so it is spelled out, not dropped; NaN is no number."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return infinity_text(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def report_json(report: dict[str, Any]) -> str:
    """``report.json``'s text: strict JSON (NaN as ``null``, ±inf as ``"Infinity"`` strings)."""
    return json.dumps(json_safe(report), indent=2, sort_keys=False, allow_nan=False)


def check_schema(document: str) -> None:
    """Refuse to write a ``report.json`` that its published schema would reject (a harness bug,
    named in one line, instead of a document that breaks its readers later)."""
    try:
        ReportDocument.model_validate_json(document)
    except ValidationError as exc:
        problem = validation_message(exc, "report.json field", ReportDocument.model_fields)
        raise BlindspotsError(f"report.json would not match its schema: {problem}") from None


def remove_stale_plots(folder: Path, keep: Sequence[Path]) -> list[Path]:
    """Remove ``folder/*.png`` files that are not in ``keep``; returns what was removed.

    An earlier report over a larger store (another group, a defense since left out) leaves
    figures the new report no longer shows; left in ``plots/`` they would be read as current.
    Only visible ``*.png`` files directly in ``folder`` are touched (a hidden ``.partial`` file
    belongs to a writer still at work); a file that cannot be removed is a warning.
    """
    kept = {Path(path).name for path in keep}
    removed = []
    for path in sorted(folder.glob("*.png")):
        if path.name in kept or path.name.startswith(".") or not path.is_file():
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning(f"could not remove the stale figure {path}: {one_line(exc)}")
            continue
        removed.append(path)
    return removed


def _write_plots(plots: Sequence[Plot], folder: Path) -> list[Path]:
    paths = []
    for plot in plots:
        paths.append(atomic_write_bytes(folder / f"{plot.name}.png", plot.png))
    return paths


def plot_report(report: dict[str, Any], folder: Path, store: Path | None = None) -> list[Path]:
    """Write every figure as ``folder/<name>.png`` (atomically); returns the written files.

    ``store`` is the run folder holding ``arrays/`` (default: ``folder``'s parent, as in
    :func:`write_report`'s ``<run>/plots``).
    """
    folder = Path(folder)
    return _write_plots(build_plots(report, store or folder.parent), folder)


def write_report(folder: str | Path) -> dict[str, Path]:
    """Write report.json, report.md, report.html and plots/ for the store in ``folder``.

    Everything is computed first, then each file is replaced atomically — plots before the
    documents that show them — so a crash mid-report never leaves a torn file. Once the new
    documents are in place, figures in ``plots/`` that this report did not draw (left by an
    earlier one) are removed.
    """
    folder = Path(folder)
    report = build_report(folder)
    plots = build_plots(report, folder)
    document = report_json(report)
    check_schema(document)
    markdown = render_markdown(report, plots)
    page = render_report_html(report, plots)
    plot_paths = _write_plots(plots, folder / "plots")
    paths = {
        "json": atomic_write_text(folder / "report.json", document),
        "markdown": atomic_write_text(folder / "report.md", markdown),
        "html": atomic_write_text(folder / "report.html", page),
    }
    remove_stale_plots(folder / "plots", plot_paths)
    return {**paths, **{p.stem: p for p in plot_paths}}
