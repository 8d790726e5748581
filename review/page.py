"""The review page: one static HTML file, images inlined as PNG data URIs, no script, no server.

It shows the worst images side by side (image, given mask, corrected mask, difference overlay),
a class legend, the histogram of label-quality scores (inline SVG) and, per class, how many
labelled pixels the correction moved to which class.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from html import escape
from typing import TYPE_CHECKING, Any

import numpy as np

from noisyseg.data.colors import (
    CHANGED_COLOR,
    IGNORE_COLOR,
    ISSUE_COLOR,
    class_color,
    color_mask,
    difference_overlay,
    png_bytes,
)

if TYPE_CHECKING:
    from noisyseg.review.runner import Panel, ReviewRow

HISTOGRAM_BINS = 20
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f2f2f2; text-align: center; }
td.id, th.id { text-align: left; }
img.view { width: 192px; height: auto; image-rendering: pixelated; display: block; }
figure { margin: 0; }
figcaption { font-size: 0.8em; color: #555; text-align: center; }
.swatch { display: inline-block; width: 1em; height: 1em; border: 1px solid #888; \
vertical-align: middle; margin: 0 0.3em 0 1em; }
"""


def data_uri(rgb: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode("ascii")


def hex_color(rgb: tuple[int, int, int]) -> str:
    return "#" + "".join(f"{c:02x}" for c in rgb)


def legend(class_names: Sequence[str]) -> str:
    entries = [(hex_color(class_color(c)), name) for c, name in enumerate(class_names)]
    entries += [
        (hex_color(IGNORE_COLOR), "unlabelled"),
        (hex_color(CHANGED_COLOR), "overlay: relabelled"),
        (hex_color(ISSUE_COLOR), "overlay: suspected, kept"),
    ]
    return (
        '<p class="legend">'
        + "".join(f'<span class="swatch" style="background:{colour}"></span>{escape(name)}' for colour, name in entries)
        + "</p>"
    )


def histogram_svg(scores: Sequence[float], cut: float | None, width: int = 480, height: int = 160) -> str:
    """Bars of the label-quality scores from 0 to their maximum (rounded up to a twentieth: the
    soft minimum of thousands of pixels sits near 0); a red line at the worst images' cut."""
    values = np.asarray([s for s in scores if not math.isnan(s)], dtype=np.float64)
    upper = min(1.0, math.ceil(max(float(values.max(initial=0.0)), 1e-9) * 20) / 20)
    counts, _ = np.histogram(values, bins=HISTOGRAM_BINS, range=(0.0, upper))
    top = max(int(counts.max(initial=0)), 1)
    left, bottom, plot_w, plot_h = 40, height - 24, width - 64, height - 40
    bar_w = plot_w / HISTOGRAM_BINS
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'role="img" aria-label="histogram of label-quality scores">'
    ]
    for i, count in enumerate(counts.tolist()):
        h = plot_h * count / top
        low, high = upper * i / HISTOGRAM_BINS, upper * (i + 1) / HISTOGRAM_BINS
        parts.append(
            f'<rect x="{left + i * bar_w:.1f}" y="{bottom - h:.1f}" width="{bar_w - 1:.1f}" '
            f'height="{h:.1f}" fill="#4c78a8"><title>{low:.3f}-{high:.3f}: {count}</title></rect>'
        )
    parts.append(f'<line x1="{left}" y1="{bottom}" x2="{left + plot_w}" y2="{bottom}" stroke="#333"/>')
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + tick * plot_w
        parts.append(
            f'<text x="{x:.1f}" y="{height - 8}" font-size="11" text-anchor="middle">{tick * upper:.3g}</text>'
        )
    parts.append(f'<text x="{left - 6}" y="{bottom - plot_h + 10}" font-size="11" text-anchor="end">{top}</text>')
    if cut is not None and not math.isnan(cut):
        x = left + min(max(cut / upper, 0.0), 1.0) * plot_w
        parts.append(
            f'<line x1="{x:.1f}" y1="{bottom - plot_h}" x2="{x:.1f}" y2="{bottom}" stroke="#d62728" '
            f'stroke-dasharray="4 3"><title>worst images: score up to {cut:.3f}</title></line>'
        )
    parts.append("</svg>")
    return "".join(parts)


def transitions_table(transitions: Sequence[Sequence[int]], class_names: Sequence[str]) -> str:
    """Rows: the given class; columns: the corrected class; cells: labelled pixels moved."""
    head = "".join(f"<th>{escape(name)}</th>" for name in class_names)
    body = []
    for g, name in enumerate(class_names):
        cells = "".join(
            "<td>&mdash;</td>" if g == c else f"<td>{int(transitions[g][c])}</td>" for c in range(len(class_names))
        )
        moved = sum(int(transitions[g][c]) for c in range(len(class_names)) if c != g)
        body.append(f'<tr><th class="id">{escape(name)}</th>{cells}<td>{moved}</td></tr>')
    return (
        f'<table class="transitions"><tr><th class="id">given \\ corrected</th>{head}'
        f"<th>relabelled</th></tr>{''.join(body)}</table>"
    )


def panel_row(rank: int, panel: Panel, class_names: Sequence[str], ignore_index: int) -> str:
    row = panel.row
    views = [
        ("image", panel.image),
        ("given", color_mask(panel.given, ignore_index)),
        ("corrected", color_mask(panel.corrected, ignore_index)),
        ("difference", difference_overlay(panel.image, panel.given, panel.corrected, panel.issue)),
    ]
    figures = "".join(
        f'<td><figure><img class="view" src="{data_uri(rgb)}" alt="{escape(row.slice_id)} {what}">'
        f"<figcaption>{what}</figcaption></figure></td>"
        for what, rgb in views
    )
    changes = (
        "<br>".join(f"{escape(class_names[g])} &rarr; {escape(class_names[c])}: {n}" for g, c, n in row.changes[:4])
        or "&ndash;"
    )
    quality = "n/a" if math.isnan(row.label_quality) else f"{row.label_quality:.3f}"
    return (
        f'<tr><td>{rank}</td><td class="id">{escape(row.slice_id)}</td><td>{quality}</td>'
        f'<td>{100 * row.changed_fraction:.1f}%</td><td class="id">{changes}</td>{figures}</tr>'
    )


def render_page(summary: dict[str, Any], rows: Sequence[ReviewRow], panels: Sequence[Panel], ignore_index: int) -> str:
    names = summary["class_names"]
    cut = panels[-1].row.label_quality if panels and summary["sort"] == "label_quality" else None
    worst = "".join(panel_row(rank, panel, names, ignore_index) for rank, panel in enumerate(panels, start=1))
    files = " &middot; ".join(
        f'<a href="{escape(path)}">{escape(path)}</a>'
        for path in ("scores.csv", "label-studio/tasks.json", "cvat/coco.zip")
        if _written(summary, path)
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>noisyseg label review</title><style>{STYLE}</style></head>
<body>
<h1>Label review</h1>
<p>{summary["images"]} images scored; corrected masks from the {escape(summary["correction"])}; \
issue pixels: given label differs from a prediction of probability &ge; {summary["confidence"]:g}. Files: {files}</p>
{legend(names)}
<h2>Label quality</h2>
<p>Soft minimum of each labelled pixel's predicted probability of its given label (low = suspicious); \
the dashed line is the cut of the worst images shown below.</p>
{histogram_svg([r.label_quality for r in rows], cut)}
<h2>The {len(panels)} worst images (by {escape(summary["sort"].replace("_", " "))})</h2>
<table class="worst"><tr><th>rank</th><th class="id">image</th><th>label quality</th><th>relabelled</th>\
<th class="id">changes (pixels)</th><th>image</th><th>given</th><th>corrected</th><th>difference</th></tr>
{worst}
</table>
<h2>Relabelled pixels per class</h2>
{transitions_table(summary["transitions"], names)}
</body></html>
"""


def _written(summary: dict[str, Any], path: str) -> bool:
    keys = {"scores.csv": "scores", "label-studio/tasks.json": "label_studio", "cvat/coco.zip": "cvat"}
    return keys[path] in summary["files"]
