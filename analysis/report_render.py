"""Rendering of a ``recloop report`` as one self-contained HTML page (inline CSS, figures as base64 PNG
data URIs, no scripts or external files) and as Markdown (the same tables; figures only in the HTML)."""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:2em auto;max-width:1200px;
     padding:0 1em;color:#222;background:#fff}
h1{font-size:1.5em;border-bottom:2px solid #4c72b0;padding-bottom:.2em}
h2{font-size:1.25em;margin-top:1.6em;color:#2b4a7a}
h3{font-size:1.05em;margin-top:1.2em}
table{border-collapse:collapse;font-size:.82em;margin:.5em 0 1em}
th,td{border:1px solid #ccd;padding:.25em .5em;text-align:right;white-space:nowrap}
th{background:#e8eef8}
td.t{text-align:left}
tr:nth-child(even) td{background:#f6f8fc}
.facts td{text-align:left}
p.note{color:#555;font-size:.9em}
figure{margin:1em 0}
figure img{max-width:100%;border:1px solid #dde}
figcaption{font-size:.85em;color:#555}
"""


@dataclass
class Table:
    title: str
    intro: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    title: str
    caption: str
    png_b64: str


@dataclass
class Report:
    title: str
    facts: list[tuple[str, str]]
    method: str
    notes: list[str]
    sections: list[tuple[str, list[Table | Figure]]] = field(default_factory=list)


def _is_text(cell: str) -> bool:
    """Whether a cell is text (left-aligned) rather than a number or an interval."""
    c = cell.strip().lstrip("[-—(").replace("*", "")
    return not c or not (c[0].isdigit() or c[0] in ".−")


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in t.header)
    body = "\n".join("<tr>" + "".join(f"<td class=\"t\">{escape(c)}</td>" if _is_text(c) else f"<td>{escape(c)}</td>"
                                      for c in row) + "</tr>" for row in t.rows)
    return (f"<h3>{escape(t.title)}</h3>\n<p class=\"note\">{escape(t.intro)}</p>\n"
            f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>")


def _html_figure(f: Figure) -> str:
    return (f"<figure><h3>{escape(f.title)}</h3><img alt=\"{escape(f.title)}\" "
            f"src=\"data:image/png;base64,{f.png_b64}\"><figcaption>{escape(f.caption)}</figcaption></figure>")


def to_html(r: Report) -> str:
    """The report as one HTML page with no external resources."""
    facts = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in r.facts)
    notes = "".join(f"<p class=\"note\">{escape(n)}</p>" for n in r.notes)
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(r.title)}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{escape(r.title)}</h1>",
             f"<table class=\"facts\">{facts}</table>", f"<p>{escape(r.method)}</p>", notes]
    for name, items in r.sections:
        parts.append(f"<h2>{escape(name)}</h2>")
        parts += [_html_table(i) if isinstance(i, Table) else _html_figure(i) for i in items]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _md_cell(c: str) -> str:
    return c.replace("|", "\\|") or " "


def _md_table(t: Table) -> str:
    lines = [f"### {t.title}", "", t.intro, "", "| " + " | ".join(map(_md_cell, t.header)) + " |",
             "|" + "|".join("---" for _ in t.header) + "|"]
    lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in t.rows]
    return "\n".join(lines) + "\n"


def to_markdown(r: Report) -> str:
    """The report's facts and tables as Markdown; each figure is named and left to report.html."""
    out = [f"# {r.title}", "", *(f"- **{k}**: {v}" for k, v in r.facts), "", r.method, ""]
    out += [f"> {n}\n" for n in r.notes]
    for name, items in r.sections:
        out += [f"## {name}", ""]
        for i in items:
            out.append(_md_table(i) if isinstance(i, Table) else f"*Figure: {i.title}* ({i.caption}; in report.html)\n")
    return "\n".join(out)
