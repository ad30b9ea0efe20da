"""A report as a list of blocks, written twice: report.md beside its PNGs, and one self-contained report.html
(images inlined as base64, styles inline, no script, nothing fetched from the network)."""
from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str
    warn: bool = False   # a comparability flag or a problem: marked in both outputs


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    row_ids: list[str] = field(default_factory=list)   # run labels, as data-run attributes in the page


@dataclass
class Image:
    path: Path
    alt: str


Block = Heading | Text | Table | Image
WARN = "⚠"


def markdown(blocks: list[Block], folder: Path) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Text):
            out.append(f"> {WARN} {b.text}" if b.warn else b.text)
        elif isinstance(b, Table):
            out.append(markdown_table(b))
        else:
            out.append(f"![{b.alt}]({os.path.relpath(b.path, folder)})")
    return "\n\n".join(out) + "\n"


def markdown_table(t: Table) -> str:
    def cell(v: str) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(cell, t.header)) + " |", "|" + "---|" * len(t.header)]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in t.rows]
    return "\n".join(lines)


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 12.5px; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
tr:nth-child(even) td { background: #fafafa; }
.warn { background: #fff4e0; border-left: 4px solid #e69500; padding: 4px 10px; margin: 0.4em 0; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f4f4f4; padding: 0 3px; }
"""


def page(blocks: list[Block], title: str) -> str:
    body = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Text):
            text = html.escape(b.text)
            body.append(f'<p class="warn">{WARN} {text}</p>' if b.warn else f"<p>{text}</p>")
        elif isinstance(b, Table):
            body.append(html_table(b))
        else:
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            body.append(f'<p><img alt="{html.escape(b.alt)}" src="data:image/png;base64,{data}"></p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in t.header)
    rows = []
    for i, r in enumerate(t.rows):
        attr = f' data-run="{html.escape(t.row_ids[i])}"' if i < len(t.row_ids) else ""
        rows.append(f"<tr{attr}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
