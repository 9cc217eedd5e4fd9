"""``audit.html``: the audit as one self-contained page an auditor can send.

Everything is inside the file — trigger images are embedded as data URIs — so a mail
attachment or a CI artifact opens in a browser with its images and no folder beside it. The page
holds what ``audit.md`` holds (provenance, intake changes, verdicts, which signals agree, Neural
Cleanse's confirmation on the shipped session) plus the pictures: reversed and differential
triggers, and each artifact's Neural Cleanse mask norms against the median and the norm the
MAD threshold puts the outlier line at.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from defenses.filtering import MAD_CONSISTENCY
from harness.audit.controls import controls_cell, controls_note

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
.suspicious { background: #f8d0d0; } .inconclusive { background: #fbeec2; }
.error { background: #e8c8f0; } .clean { background: #d6f0d6; }
figure { display: inline-block; margin: 0.5em; text-align: center; }
figure img { image-rendering: pixelated; border: 1px solid #999; }
.bar { display: inline-block; height: 0.8em; background: #6a8fd0; }
.bar.flag { background: #d05050; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _image(path: str) -> str:
    """A PNG written by the audit, embedded (an unreadable file is named, not fatal)."""
    try:
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    except OSError:
        return f"<em>missing image {_esc(path)}</em>"
    return f'<img src="data:image/png;base64,{data}" alt="{_esc(Path(path).name)}">'


def _verdict_table(report: dict[str, Any]) -> list[str]:
    rows = [
        "<table><tr><th>artifact</th><th>clean acc</th><th>agreement with published</th>"
        "<th>check</th><th>verdict</th><th>suspected labels</th><th>rests on</th>"
        "<th>on the project's clean controls</th></tr>"
    ]
    for cell in report["cells"]:
        acc, agree = cell.get("clean_acc"), cell.get("agreement_published")
        for name, entry in cell.get("defenses", {}).items():
            verdict = str(entry["verdict"])
            why = entry.get("reason") or entry.get("rests_on") or ""
            rows.append(
                f'<tr class="{_esc(verdict.replace(" ", "-"))}"><td>{_esc(cell["artifact"])}</td>'
                f"<td>{'—' if acc is None else f'{acc:.4f}'}</td>"
                f"<td>{'—' if agree is None else f'{agree:.4f}'}</td><td>{_esc(name)}</td>"
                f"<td>{_esc(verdict)}</td><td>{_esc(entry.get('suspected_labels') or '')}</td>"
                f"<td>{_esc(why)}</td>"
                f"<td>{_esc(controls_cell(entry.get('clean_controls')))}</td></tr>"
            )
    rows.append("</table>")
    rows.append(f"<p>{_esc(controls_note(report.get('clean_controls')))}</p>")
    return rows


def _norms(artifact: str, result: dict[str, Any]) -> list[str]:
    """Per-label mask norms as bars, flagged labels in red, with the median and the line below
    which a norm's anomaly index exceeds the threshold."""
    details = result.get("details") or {}
    norms = details.get("l1_norms")
    if not norms:
        return []
    median, mad = details.get("median_norm", 0.0), details.get("mad", 0.0)
    threshold = result.get("threshold") or 0.0
    line = median - threshold * mad  # mad is already scaled by MAD_CONSISTENCY
    flagged = set(details.get("flagged_before_confirmation", result.get("flagged_labels", [])))
    top = max(max(norms), 1e-9)
    rows = [
        f"<h3>{_esc(artifact)}: Neural Cleanse mask L1 norms</h3>",
        f"<p>median {median:.4g}; a label is flagged below {line:.4g} (anomaly index "
        f"&gt; {threshold:g}, MAD × {MAD_CONSISTENCY:.4f} = {mad:.4g}).</p><table>",
        "<tr><th>label</th><th>L1 norm</th><th></th></tr>",
    ]
    for label, norm in enumerate(norms):
        width = int(300 * norm / top)
        css = "bar flag" if label in flagged else "bar"
        rows.append(
            f"<tr><td>{label}</td><td>{norm:.4g}</td>"
            f'<td><span class="{css}" style="width:{width}px"></span></td></tr>'
        )
    rows.append("</table>")
    return rows


def render_html(report: dict[str, Any]) -> str:
    """The audit page (see the module doc)."""
    model = report["model"]
    overall = report["overall"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Audit of {_esc(Path(model['path']).name)}</title><style>{STYLE}</style>",
        "</head><body>",
        f"<h1>Audit of <code>{_esc(Path(model['path']).name)}</code></h1>",
        f'<p class="{_esc(str(overall["verdict"]).replace(" ", "-"))}"><strong>Overall: '
        f"{_esc(overall['verdict'])}</strong> {_esc(', '.join(overall['from']))}</p>",
        "<h2>Provenance</h2><ul>",
        f"<li>file <code>{_esc(model['path'])}</code>, sha256 <code>{_esc(model['sha256'])}"
        f"</code>, precision {_esc(model['precision'])}</li>",
    ]
    for shipped in report.get("deployed", []):
        parts.append(
            f"<li>shipped file <code>{_esc(shipped['path'])}</code>, sha256 "
            f"<code>{_esc(shipped['sha256'])}</code>, precision {_esc(shipped['precision'])}</li>"
        )
    dataset, budget = report["dataset"], report.get("budget", {})
    parts += [
        f"<li>dataset {_esc(dataset['name'])}: {dataset['n_test']} test images, "
        f"{dataset['defense_sample']} in the defenses' sample</li>",
        f"<li>budget {_esc(budget.get('name', 'paper'))}, seed {_esc(report.get('seed', ''))}, "
        f"INT8 kernels {_esc(report['kernels']['profile'])}</li></ul>",
        "<h2>What intake changed (in a copy)</h2><ul>",
        *[f"<li>{_esc(c)}</li>" for c in report["intake"]["changes"] or ["nothing"]],
        "</ul><h2>Verdicts</h2>",
        *_verdict_table(report),
        "<h2>Which signals agree</h2><ul>",
    ]
    for cell in report["cells"]:
        signals = cell.get("signals") or {}
        shown = "; ".join(f"label {k}: {', '.join(v)}" for k, v in signals.items())
        parts.append(
            f"<li>{_esc(cell['artifact'])}: {_esc(shown or 'no check points at any label')}</li>"
        )
    parts.append("</ul><h2>Triggers behind the suspicions</h2>")
    images = [
        (cell["artifact"], name, path)
        for cell in report["cells"]
        for name, entry in cell.get("defenses", {}).items()
        for path in entry.get("trigger_images", [])
    ]
    if not images:
        parts.append("<p>No suspicion, so no trigger to show.</p>")
    for artifact, name, path in images:
        parts.append(
            f"<figure>{_image(path)}<figcaption>{_esc(artifact)} · {_esc(name)} · "
            f"{_esc(Path(path).stem.rsplit('-', 1)[-1])}</figcaption></figure>"
        )
    for cell in report["cells"]:
        nc = cell.get("defenses", {}).get("neural_cleanse", {})
        if "result" in nc:
            parts += _norms(cell["artifact"], nc["result"])
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
