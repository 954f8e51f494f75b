"""Self-contained HTML reports: one file with inline CSS and the figures embedded as data URIs, so it can be
mailed, archived or opened offline without the files next to it. Every text goes through escaping."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["escape", "html_table", "image_tag", "preformatted", "details", "html_page"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1, h2, h3 { line-height: 1.2; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
td.best { font-weight: bold; background: #e3f4e3; }
tr.reference td { color: #666; font-style: italic; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { color: #555; font-size: 0.9em; }
details { margin: 0.4em 0; }
"""


def escape(text: object) -> str:
    return html.escape(str(text), quote=True)


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, best: Iterable[tuple[int, int]] = (),
               row_classes: Sequence[str | None] | None = None) -> str:
    """A table of plain-text cells; ``best`` holds (row, column) indices shown as the column's best."""
    marked = set(best)
    lines = ["<table>", "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cls = row_classes[i] if row_classes is not None and i < len(row_classes) else None
        cells = "".join(
            f'<td class="best">{escape(v)}</td>' if (i, j) in marked else f"<td>{escape(v)}</td>" for j, v in enumerate(row)
        )
        lines.append(f'<tr class="{escape(cls)}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def image_tag(path: str | Path, alt: str = "") -> str:
    """An <img> carrying the PNG itself (base64), so the page needs no file next to it."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def preformatted(text: str) -> str:
    return f"<pre>{escape(text)}</pre>"


def details(summary: str, body_html: str) -> str:
    return f"<details><summary>{escape(summary)}</summary>\n{body_html}\n</details>"


def html_page(title: str, parts: Iterable[str]) -> str:
    """A complete HTML document; ``parts`` are HTML fragments (already escaped where they hold text)."""
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n<h1>{escape(title)}</h1>\n{body}\n</body>\n</html>\n")
