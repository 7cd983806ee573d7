"""Small, dependency-free HTML report building: pages, tables, image grids, embedded plots.

Images are embedded as base64 PNG so a report is one file that can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence

import numpy as np

from rewardkit.io import png_bytes

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start}
.card{font-size:.72em;width:132px;line-height:1.25}
.card img{width:128px;height:128px;image-rendering:pixelated;border:1px solid #ccc}
.muted{color:#777;font-size:.85em} .row{margin:.4em 0 1em}
"""


def esc(text: object) -> str:
    return html.escape(str(text))


def img_tag(image: np.ndarray, width: int | None = None, title: str = "") -> str:
    """An <img> with the array embedded as PNG (uint8 HxW, HxWx3 or HxWx4)."""
    data = base64.b64encode(png_bytes(image)).decode("ascii")
    w = f' width="{width}"' if width else ""
    return f'<img src="data:image/png;base64,{data}"{w} title="{esc(title)}">'


def figure_tag(fig) -> str:
    """Embed a matplotlib figure as PNG and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}">'


def fmt(v: object) -> str:
    if isinstance(v, float):
        if v != v:  # NaN
            return "–"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return esc(v)


def table_html(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def card(image: np.ndarray, lines: Sequence[str]) -> str:
    text = "<br>".join(esc(x) for x in lines)
    return f'<div class="card">{img_tag(image)}<br>{text}</div>'


def page(title: str, sections: Sequence[tuple[str, str]], subtitle: str = "") -> str:
    """A full HTML page from (heading, html body) sections."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
        f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>",
    ]
    if subtitle:
        parts.append(f"<p class='muted'>{esc(subtitle)}</p>")
    toc = "".join(f"<li><a href='#s{i}'>{esc(h)}</a></li>" for i, (h, _) in enumerate(sections))
    parts.append(f"<ul>{toc}</ul>")
    for i, (heading, body) in enumerate(sections):
        parts.append(f"<h2 id='s{i}'>{esc(heading)}</h2>{body}")
    parts.append("</body></html>")
    return "\n".join(parts)
