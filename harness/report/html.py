"""The report as one self-contained HTML page, and the document model it shares with report.md.

:mod:`harness.report.tables` builds the report once as a list of :class:`Section` objects
(headings, paragraphs, tables, bullet lists, figure references) and :mod:`harness.report.render`
renders it twice: as Markdown (with ``plots/*.png`` links) and, through this module, as HTML.
One model keeps the two files saying the same thing. The model lives beside the HTML renderer
(not in :mod:`harness.report.tables`) so that the tables and both renderers can use it without
an import cycle.

Self-contained means the page can be mailed or archived alone: every figure is embedded as a
``data:image/png;base64`` URI, the style sheet is inline, and there is no script and no link to
anything outside the page. Paragraph text uses two Markdown marks, ```code``` and ``*emphasis*``,
which are turned into ``<code>``/``<em>`` after HTML escaping.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .88em; }
th, td { border: 1px solid #ccc; padding: .25em .55em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
code { background: #f3f3f3; padding: 0 .2em; border-radius: 3px; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .9em; color: #444; max-width: 1000px; }
nav ul { columns: 2; font-size: .9em; }
"""


@dataclass(frozen=True)
class Table:
    """A table of already formatted cells."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class FigureRef:
    """A figure by name: ``plots/<name>.png`` in Markdown, the embedded PNG in HTML."""

    name: str
    title: str
    caption: str
    alt: str


Block = str | Table | Bullets | FigureRef
"""A paragraph (str), a table, a bullet list or a figure."""


@dataclass
class Section:
    """A heading (``level`` 1-4) and the blocks under it, in order."""

    title: str
    level: int = 2
    blocks: list[Block] = field(default_factory=list)


_CODE = re.compile(r"`([^`]+)`")
_EMPHASIS = re.compile(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])")


def inline(text: str) -> str:
    """Escape ``text`` for HTML, then render its ```code``` and ``*emphasis*`` marks."""
    escaped = html.escape(text, quote=False)
    escaped = _CODE.sub(r"<code>\1</code>", escaped)
    return _EMPHASIS.sub(r"<em>\1</em>", escaped)


def _table(table: Table) -> str:
    head = "".join(f"<th>{inline(cell)}</th>" for cell in table.header)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{inline(cell)}</td>" for cell in row) + "</tr>" for row in table.rows
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _figure(ref: FigureRef, images: Mapping[str, bytes]) -> str:
    png = images.get(ref.name)
    if png is None:  # a figure the caller did not render: say so rather than a broken image
        return f"<p><em>Figure {html.escape(ref.name)} was not rendered.</em></p>"
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure id="fig-{html.escape(ref.name)}">\n'
        f'<img alt="{html.escape(ref.alt)}" src="data:image/png;base64,{data}">\n'
        f"<figcaption><strong>{inline(ref.title)}.</strong> {inline(ref.caption)}</figcaption>\n"
        "</figure>"
    )


def _block(block: Block, images: Mapping[str, bytes]) -> str:
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Bullets):
        items = "\n".join(f"<li>{inline(item)}</li>" for item in block.items)
        return f"<ul>\n{items}\n</ul>"
    if isinstance(block, FigureRef):
        return _figure(block, images)
    return f"<p>{inline(block)}</p>"


def render_html(title: str, sections: Sequence[Section], images: Mapping[str, bytes]) -> str:
    """The whole page: a contents list, then ``sections`` in order (a section without a title
    has no heading), each :class:`FigureRef` embedded from ``images``."""
    anchors = {id(section): f"s{k}" for k, section in enumerate(sections) if section.title}
    contents = [
        f'<li><a href="#{anchors[id(s)]}">{inline(s.title)}</a></li>'
        for s in sections
        if s.title and s.level <= 2
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if contents:
        parts += ["<nav><ul>", *contents, "</ul></nav>"]
    for section in sections:
        if section.title:
            level = min(max(section.level, 2), 6)
            anchor = anchors[id(section)]
            parts.append(f'<h{level} id="{anchor}">{inline(section.title)}</h{level}>')
        parts.extend(_block(block, images) for block in section.blocks)
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)
