"""The document model — a report is a list of `Section`s, each a list of `Block`s (paragraphs, notes,
tables, images, code) held as data — and its two renderers: `render_html` (one self-contained page,
images embedded as base64 PNG) and `render_md` (images written beside it, in ``files_dir``)."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calray.io import atomic_write_bytes


@dataclass
class Block:
    kind: str  # p | note | table | img | code | h3 | details
    data: Any
    extra: Any = None


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)

    def p(self, text: str) -> None:
        self.blocks.append(Block("p", text))

    def note(self, text: str) -> None:
        self.blocks.append(Block("note", text))

    def h3(self, text: str) -> None:
        self.blocks.append(Block("h3", text))

    def table(self, header: list[str], rows: list[list[Any]], caption: str | None = None) -> None:
        self.blocks.append(Block("table", (header, [[str(c) for c in r] for r in rows]), caption))

    def code(self, text: str, summary: str | None = None) -> None:
        self.blocks.append(Block("code", text, summary))

    def image(self, fig, name: str, alt: str) -> None:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        self.blocks.append(Block("img", buf.getvalue(), (name, alt)))


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{border-bottom:2px solid #446}h2{border-bottom:1px solid #aab;margin-top:2em}h3{margin-top:1.4em;color:#335}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}th,td{border:1px solid #ccd;padding:.25em .55em;
text-align:left;vertical-align:top}th{background:#eef}tr:nth-child(even) td{background:#f8f8fc}
caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}
.note{background:#fff8e1;border-left:4px solid #e0b000;padding:.4em .8em;margin:.6em 0}
pre{background:#f4f4f8;padding:.6em;overflow-x:auto;font-size:.85em}img{max-width:100%}
nav ul{columns:2}.paper{color:#7a2a00}
"""


def render_html(title: str, sections: list[Section], subtitle: str) -> str:
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p>", "<nav><ul>"]
    out += [f"<li><a href='#{s.id}'>{html.escape(s.title)}</a></li>" for s in sections]
    out.append("</ul></nav>")
    for s in sections:
        out.append(f"<section id='{s.id}'><h2>{html.escape(s.title)}</h2>")
        for b in s.blocks:
            if b.kind == "p":
                out.append(f"<p>{html.escape(b.data)}</p>")
            elif b.kind == "note":
                out.append(f"<p class='note'>{html.escape(b.data)}</p>")
            elif b.kind == "h3":
                out.append(f"<h3>{html.escape(b.data)}</h3>")
            elif b.kind == "code":
                body = f"<pre>{html.escape(b.data)}</pre>"
                out.append(f"<details><summary>{html.escape(b.extra)}</summary>{body}</details>" if b.extra else body)
            elif b.kind == "table":
                header, rows = b.data
                cap = f"<caption>{html.escape(b.extra)}</caption>" if b.extra else ""
                head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
                body = "".join("<tr>" + "".join(
                    f"<td class='paper'>{html.escape(c)}</td>" if r and str(r[0]).startswith("paper") else
                    f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                out.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif b.kind == "img":
                name, alt = b.extra
                data = base64.b64encode(b.data).decode()
                out.append(f"<figure><img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{html.escape(alt)}</figcaption></figure>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


def _md_cell(c: str) -> str:
    return c.replace("|", "\\|").replace("\n", " ")


def render_md(title: str, sections: list[Section], subtitle: str, files_dir: Path) -> str:
    out = [f"# {title}", "", subtitle, ""]
    out += [f"- [{s.title}](#{s.id})" for s in sections]
    out.append("")
    for s in sections:
        out += [f"<a id='{s.id}'></a>", "", f"## {s.title}", ""]
        for b in s.blocks:
            if b.kind == "p":
                out += [b.data, ""]
            elif b.kind == "note":
                out += [f"> **Note:** {b.data}", ""]
            elif b.kind == "h3":
                out += [f"### {b.data}", ""]
            elif b.kind == "code":
                if b.extra:
                    out += [f"*{b.extra}:*", ""]
                out += ["```yaml", b.data.rstrip(), "```", ""]
            elif b.kind == "table":
                header, rows = b.data
                if b.extra:
                    out += [f"**{b.extra}**", ""]
                out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
                out.append("")
            elif b.kind == "img":
                name, alt = b.extra
                atomic_write_bytes(files_dir / name, lambda f, data=b.data: f.write(data))
                out += [f"![{alt}]({files_dir.name}/{name})", ""]
    return "\n".join(out) + "\n"
