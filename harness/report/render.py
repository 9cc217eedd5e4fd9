"""The two renderings of the report's sections: Markdown (``report.md``) and the HTML page."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from harness.report.figures.model import Plot
from harness.report.html import Bullets, FigureRef, Section, Table, render_html
from harness.report.tables import kernel_drift_blocks, report_sections

TITLE = "quant-blindspots report"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_lines(sections: Sequence[Section]) -> list[str]:
    """Sections as Markdown lines (figures as ``plots/<name>.png`` images with a caption)."""
    lines: list[str] = []
    for section in sections:
        if section.title:
            lines += ["", "#" * section.level + " " + section.title]
        for block in section.blocks:
            lines.append("")
            if isinstance(block, Table):
                lines.append("| " + " | ".join(map(_md_cell, block.header)) + " |")
                lines.append("|" + "---|" * len(block.header))
                lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in block.rows]
            elif isinstance(block, Bullets):
                lines += [f"- {item}" for item in block.items]
            elif isinstance(block, FigureRef):
                alt = block.alt.replace("[", "(").replace("]", ")")
                lines += [
                    f"![{alt}](plots/{block.name}.png)",
                    "",
                    f"*{block.title}.* {block.caption}",
                ]
            else:
                lines.append(block)
    return lines


def render_markdown(report: dict[str, Any], plots: Sequence[Plot] = ()) -> str:
    """The human-readable report: the paper-style tables per dataset, the clean-control false
    alarms, inconclusive reasons, every run's verdict and — given ``plots`` — the figures."""
    lines = ["# " + TITLE, *markdown_lines(report_sections(report, plots))]
    return "\n".join(lines) + "\n"


def render_report_html(report: dict[str, Any], plots: Sequence[Plot] = ()) -> str:
    """``report.html``: the same sections as report.md, every figure embedded in the page."""
    images = {plot.name: plot.png for plot in plots}
    return render_html(TITLE, report_sections(report, plots), images)


def render_kernel_drift(report: dict[str, Any]) -> list[str]:
    """The kernel-drift section as Markdown lines."""
    return markdown_lines([Section("Host vs exact INT8 kernels", 2, kernel_drift_blocks(report))])
