"""The report page: one self-contained HTML file.

Self-contained means it opens offline, from a double-click, years later: every image is a
``data:`` URI, the style sheet is inline, there is no script and no external address, and a
Content-Security-Policy forbids loading anything else, so a mistake that referenced a file or
URL shows up as a console error (the Chromium test fails on those) instead of a page that works
only on the machine that wrote it. Every string that reaches the page goes through :func:`esc`
(run folders, JSON and markdown are data, never markup).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f;
       max-width: 1280px; margin: 0 auto; padding: 0 24px 48px; }
h1 { font-size: 24px; margin: 24px 0 4px; } h2 { font-size: 20px; margin-top: 36px;
     border-bottom: 2px solid #ccd; padding-bottom: 4px; }
h3 { font-size: 16px; margin-top: 26px; } h4 { font-size: 14px; margin: 16px 0 6px; }
.path, .meta { color: #667; font-size: 12px; } code { font-size: 12px; background: #f2f2f6;
     padding: 1px 4px; border-radius: 3px; word-break: break-all; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #d4d4dc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eef0f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 12px 0; } figcaption { color: #556; font-size: 12px; margin-top: 4px; }
img { max-width: 100%; height: auto; border: 1px solid #e4e4ea; }
.note { background: #fff7e0; border-left: 4px solid #e0b040; padding: 6px 10px; margin: 8px 0; }
.missing { background: #fdecec; border-left: 4px solid #d05050; padding: 6px 10px; }
details { margin: 6px 0; } summary { cursor: pointer; color: #335; }
nav ul { margin: 4px 0; }
.row { display: flex; flex-wrap: wrap; gap: 8px 28px; align-items: flex-start; }
"""
_NUMBER = re.compile(r"^[-+]?(\d[\d,]*(\.\d+)?|\.\d+)(e[-+]?\d+)?\s*(%|mm|ms|s)?$", re.I)


def esc(value: object) -> str:
    """Text (any value, as ``str``) made safe for HTML content and attribute values."""
    return html.escape(str(value), quote=True)


def inline(text: str) -> str:
    """One line of markdown text: `code` spans become <code>; everything else is escaped."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: no code span
        return esc(text)
    return "".join(f"<code>{esc(p)}</code>" if i % 2 else esc(p) for i, p in enumerate(parts))


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _md_table(lines: list[str]) -> str:
    head, body = _cells(lines[0]), [_cells(x) for x in lines[1:]
                                    if not re.fullmatch(r"\|?[\s:|-]+\|?", x.strip())]  # fmt: skip
    return table(head, body, cell=inline)


def markdown(text: str) -> str:
    """The markdown the stages write (:func:`finetune.report.md_table` tables, paragraphs,
    ``-`` lists with indented continuation lines, `code`) as HTML; nothing else is trusted."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("|"):
            j = i
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            out.append(_md_table(lines[i:j]))
            i = j
        elif line.startswith("- "):
            items: list[list[str]] = []
            while i < len(lines) and (lines[i].startswith("- ") or
                                      (items and lines[i].startswith("  "))):  # fmt: skip
                if lines[i].startswith("- "):
                    items.append([lines[i][2:]])
                else:
                    items[-1].append(lines[i].strip())
                i += 1
            out.append("<ul>" + "".join("<li>" + "<br>".join(inline(x) for x in item) + "</li>"
                                        for item in items) + "</ul>")  # fmt: skip
        elif line.strip():
            para = []
            while i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith("|") \
                    and not lines[i].startswith("- "):  # fmt: skip
                para.append(lines[i].strip())
                i += 1
            out.append("<p>" + inline(" ".join(para)) + "</p>")
        else:
            i += 1
    return "\n".join(out)


def table(head: Sequence[object], rows: Iterable[Sequence[object]], cell=esc) -> str:
    """A table; ``cell`` turns each cell into HTML (escaping); numbers are right-aligned."""
    def td(v: object) -> str:
        cls = ' class="num"' if _NUMBER.match(str(v).strip()) else ""
        return f"<td{cls}>{cell(str(v))}</td>"

    header = "".join(f"<th>{cell(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(td(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def image(data: bytes, alt: str, mime: str = "image/png") -> str:
    """An <img> holding ``data`` as a data: URI (a PNG is checked to be one)."""
    if mime == "image/png" and not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{alt}: not a PNG file")
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return f'<img src="{uri}" alt="{esc(alt)}">'


def figure_png(fig, dpi: int = 80) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    from finetune.report.writer import pyplot

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return buf.getvalue()


def figure(data: bytes, caption: str) -> str:
    return f"<figure>{image(data, caption)}<figcaption>{esc(caption)}</figcaption></figure>"


def note(text: str, cls: str = "note") -> str:
    return f'<div class="{cls}">{esc(text)}</div>'


def value_text(value: object) -> str:
    """A JSON value as short text: scalars as they are, containers as compact JSON."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(", ", ": "))
    return str(value)


def details(summary: str, body_html: str, open_: bool = False) -> str:
    return (f"<details{' open' if open_ else ''}><summary>{esc(summary)}</summary>"
            f"{body_html}</details>")  # fmt: skip


def mapping_table(data: Mapping) -> str:
    """Key / value rows of a protocol block (nested values as compact JSON)."""
    return table(["field", "value"], [[k, value_text(v)] for k, v in data.items()])


def page(title: str, meta: str, nav: Sequence[tuple[str, str]], body: str) -> str:
    """The whole document: head with the CSP and inline style, a title, links to the
    sections (``(anchor id, text)``; in-page only) and ``body`` (HTML)."""
    links = "".join(f'<li><a href="#{esc(anchor)}">{esc(text)}</a></li>' for anchor, text in nav)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n<p class=\"meta\">{esc(meta)}</p>\n"
        f"<nav><ul>{links}</ul></nav>\n{body}\n</body>\n</html>\n"
    )
