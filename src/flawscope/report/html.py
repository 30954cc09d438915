"""A self-contained HTML test report: metrics, curves and an image gallery in one offline file."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import numpy as np
from PIL import Image

from flawscope import __version__
from flawscope.report._svg import downsample, line_plot
from flawscope.report.overlay import COLORMAP, OUTLINE_COLOR, png_data_uri

# Gallery images are shown about 250 px wide; embedding larger ones only makes the file heavy.
GALLERY_MAX_SIZE = 512

_METRIC_ORDER = ("auroc", "ap", "f1max", "aupro")
_LABELS = {
    "auroc": "AUROC",
    "ap": "AP",
    "f1max": "F1max",
    "aupro": "AUPRO",
    "count": "Images",
    "image_auroc": "Image AUROC vs good",
}
_DEFAULT_REASONS = {
    "image": "needs both good and defective test images",
    "pixel": "needs defective test images with masks",
}
_PER_TYPE_REASON = "needs good test images"


CURVE_FILE_POINTS = 2000  # per curve in curves.json


@dataclass(frozen=True)
class GalleryItem:
    """One picture of the gallery.

    Attributes:
        title: short name, e.g. the file name.
        caption: one line under the title, e.g. "crack · score 0.83 (raw 2.41)".
        image: (H, W, 3) uint8 overlay, already composed with `heatmap_overlay`.
    """

    title: str
    caption: str
    image: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Curve:
    """One curve to plot on [0, xmax] x [0, 1].

    Attributes:
        name: plot title, e.g. "ROC (image)".
        x: (N,) x values; any number of points, the plot downsamples them.
        y: (N,) y values.
        xlabel: x axis title.
        ylabel: y axis title.
        area: area under the curve as a fraction, shown in the title when given.
        xmax: right end of the x axis (PRO curves are read up to a false-positive rate of 0.3).
    """

    name: str
    x: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)
    xlabel: str
    ylabel: str
    area: float | None = None
    xmax: float = 1.0

    def to_dict(self, max_points: int = CURVE_FILE_POINTS) -> dict[str, list[float]]:
        """{"x": [...], "y": [...]} with at most ``max_points`` points, evenly spaced along the curve, ends kept.

        A pixel PRO curve has a point per distinct map value (1.5 million on MTD's test set: 81 MB of JSON); the
        areas in metrics.json are computed on the full curves.
        """
        keep = downsample(self.x, self.y, max_points, xmax=self.xmax)
        return {"x": self.x[keep].tolist(), "y": self.y[keep].tolist()}


def write_report(
    path: str | Path,
    *,
    title: str,
    info: Mapping[str, str],
    metrics: Mapping[str, float | None],
    per_type: Mapping[str, Mapping[str, float | int | None]],
    curves: list[Curve],
    gallery: Mapping[str, list[GalleryItem]],
    reasons: Mapping[str, str] | None = None,
) -> Path:
    """Writes the test report as one HTML file that opens offline.

    Args:
        path: destination file; missing parent folders are created.
        title: page heading.
        info: header key/values such as model, backbone, data, threshold and image counts.
        metrics: `<level>_<metric>` keys (image_auroc, ..., pixel_aupro) to fractions in [0, 1]; None shows "n/a".
        per_type: defect type -> {"count": number of images, "image_auroc": that type against the good images,
            and optionally "pixel_auroc" and "pixel_aupro" on that type's and the good images' maps}.
        curves: curves to plot, one SVG each.
        gallery: section title -> pictures, e.g. "Highest-scored good images".
        reasons: metric key -> why that metric is None; a reason by level (image/pixel) is shown otherwise.

    Returns:
        The path written.
    """
    body = [
        _header(title, info),
        _metrics_section(metrics, reasons or {}),
        _per_type_section(per_type),
        _curves_section(curves),
        *(_gallery_section(name, items) for name, items in gallery.items()),
    ]
    content = "\n".join(part for part in body if part)
    page = _PAGE.format(title=escape(title), css=_CSS, body=content, version=__version__)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8", errors="replace")  # a file name that is not UTF-8 shows as "?"
    return path


def format_percent(value: float | None) -> str:
    """Formats a fraction as a percentage with one decimal, e.g. 0.9534 -> "95.3%"; None or NaN -> "n/a"."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{100.0 * value:.1f}%"


def _is_missing(value: float | None) -> bool:
    return value is None or not math.isfinite(value)


def _value_cell(value: float | None, reason: str, bar: bool = False) -> str:
    if _is_missing(value):
        return f'<td><span class="na">n/a</span><span class="reason">{escape(reason)}</span></td>'
    meter = f'<span class="track"><span class="bar" style="width:{100 * value:.1f}%"></span></span>' if bar else ""
    return f"<td>{format_percent(value)}{meter}</td>"


def _breakable(text: str) -> str:
    """Escapes text and lets long paths wrap after a separator rather than mid-word."""
    return escape(text).replace("/", "/<wbr>").replace("_", "_<wbr>")


def _header(title: str, info: Mapping[str, str]) -> str:
    cards = "".join(f"<div><dt>{escape(str(k))}</dt><dd>{_breakable(str(v))}</dd></div>" for k, v in info.items())
    return f'<header><h1>{escape(title)}</h1><dl class="info">{cards}</dl></header>'


def _split_key(key: str) -> tuple[str, str]:
    level, _, name = key.partition("_")
    return (level, name) if name else ("other", key)


def _metrics_section(metrics: Mapping[str, float | None], reasons: Mapping[str, str]) -> str:
    if not metrics:
        return ""
    levels = list(dict.fromkeys(_split_key(key)[0] for key in metrics))
    found = list(dict.fromkeys(_split_key(key)[1] for key in metrics))
    names = [n for n in _METRIC_ORDER if n in found] + [n for n in found if n not in _METRIC_ORDER]
    head = "".join(f"<th>{escape(_LABELS.get(n, n))}</th>" for n in names)
    rows = []
    for level in levels:
        cells = []
        for name in names:
            key = f"{level}_{name}" if level != "other" else name
            if key not in metrics:
                cells.append('<td class="na">—</td>')
                continue
            reason = reasons.get(key, _DEFAULT_REASONS.get(level, "not computed"))
            cells.append(_value_cell(metrics[key], reason))
        rows.append(f"<tr><th>{escape(level.capitalize())}</th>{''.join(cells)}</tr>")
    return (
        f'<section><h2>Metrics</h2><table class="metrics"><thead><tr><th></th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _per_type_section(per_type: Mapping[str, Mapping[str, float | int | None]]) -> str:
    if not per_type:
        return ""
    columns = list(dict.fromkeys(key for row in per_type.values() for key in row))
    head = "".join(f"<th>{escape(_LABELS.get(c, c.replace('_', ' ')))}</th>" for c in columns)
    rows = []
    for defect, row in per_type.items():
        cells = []
        for column in columns:
            value = row.get(column)
            if column == "count" or column.startswith("num_"):
                cells.append(f"<td>{'n/a' if value is None else int(value)}</td>")
            else:
                cells.append(_value_cell(value, _PER_TYPE_REASON, bar=True))
        rows.append(f"<tr><th>{escape(str(defect))}</th>{''.join(cells)}</tr>")
    return (
        f'<section><h2>Per defect type</h2><table class="per-type"><thead><tr><th>Defect type</th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _curves_section(curves: list[Curve]) -> str:
    if not curves:
        return ""
    figures = []
    for curve in curves:
        area = "" if _is_missing(curve.area) else f' <span class="area">area {format_percent(curve.area)}</span>'
        svg = line_plot(curve.x, curve.y, xlabel=curve.xlabel, ylabel=curve.ylabel, xmax=curve.xmax)
        figures.append(f"<figure><figcaption>{escape(curve.name)}{area}</figcaption>{svg}</figure>")
    return f'<section><h2>Curves</h2><div class="curves">{"".join(figures)}</div></section>'


def _gallery_section(name: str, items: list[GalleryItem]) -> str:
    if not items:
        content = '<p class="empty">No images in this group.</p>'
    else:
        content = _LEGEND + '<div class="gallery">' + "".join(_gallery_figure(item) for item in items) + "</div>"
    return f"<section><h2>{escape(name)}</h2>{content}</section>"


def _gallery_figure(item: GalleryItem) -> str:
    title = escape(item.title)
    return (
        f'<figure><img src="{png_data_uri(_shrink(item.image))}" alt="{title}">'
        f'<div class="title" title="{title}">{title}</div><div class="caption">{escape(item.caption)}</div></figure>'
    )


def _shrink(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    scale = GALLERY_MAX_SIZE / max(height, width)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def _hex(rgb: np.ndarray | tuple[int, int, int]) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in rgb)


_GRADIENT = ", ".join(_hex(COLORMAP[i]) for i in np.linspace(0, len(COLORMAP) - 1, 11).astype(int))
_LEGEND = (
    '<div class="legend"><span>calibrated score 0</span>'
    f'<span class="colorbar" style="background:linear-gradient(to right, {_GRADIENT})"></span>'
    "<span>1 (inferno colour map; the mark is the threshold, 0.5)</span>"
    f'<span class="swatch" style="background:{_hex(OUTLINE_COLOR)}"></span><span>ground-truth outline</span></div>'
)

_CSS = """
:root { --ink: #1f2933; --muted: #66727f; --line: #e3e7ec; --accent: #2f5bd3; --bg: #f5f6f8; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 24px 40px; }
h1 { font-size: 26px; margin: 0 0 16px; }
h2 { font-size: 17px; margin: 0 0 14px; }
dl.info { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 10px; margin: 0; }
dl.info div { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 8px 12px; }
dt { font-size: 11px; text-transform: uppercase; letter-spacing: .05em; color: var(--muted); }
dd { margin: 0; font-weight: 600; overflow-wrap: anywhere; }
section { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 18px 22px; margin-top: 20px; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 8px 16px; text-align: right; border-bottom: 1px solid var(--line); vertical-align: top; }
th:first-child { text-align: left; }
tbody tr:last-child > * { border-bottom: none; }
thead th { font-size: 11px; text-transform: uppercase; letter-spacing: .05em; color: var(--muted); font-weight: 600; }
tbody th { font-weight: 600; }
td { font-size: 16px; }
table.metrics td { min-width: 110px; }
.na { color: var(--muted); }
.reason { display: block; font-size: 11px; color: var(--muted); max-width: 120px; margin-left: auto; line-height: 1.3; }
.track { display: inline-block; width: 120px; height: 8px; margin-left: 12px; background: #edf0f4; border-radius: 4px;
  vertical-align: middle; overflow: hidden; }
.bar { display: block; height: 100%; background: var(--accent); }
.curves { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 18px; }
figure { margin: 0; }
figcaption { font-weight: 600; margin-bottom: 4px; }
.area { font-weight: 400; color: var(--muted); margin-left: 6px; }
svg.curve { width: 100%; height: auto; display: block; }
svg .grid { stroke: #eef1f4; }
svg .frame { fill: none; stroke: #a3adb8; }
svg .tick { font-size: 11px; fill: var(--muted); }
svg .label { font-size: 12px; fill: var(--ink); }
svg .line { fill: none; stroke: var(--accent); stroke-width: 2; stroke-linejoin: round; }
svg .fill { fill: var(--accent); opacity: .08; }
.legend { display: flex; align-items: center; gap: 8px; font-size: 12px; color: var(--muted); margin: -6px 0 14px; }
.colorbar { width: 150px; height: 10px; border-radius: 3px; position: relative; }
.colorbar::after { content: ""; position: absolute; left: 50%; top: -3px; bottom: -3px;
  border-left: 2px solid var(--ink); }
.swatch { width: 18px; height: 4px; margin-left: 14px; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 16px; }
.gallery img { width: 100%; height: auto; display: block; border-radius: 6px; border: 1px solid var(--line); }
.gallery .title { font-size: 13px; font-weight: 600; margin-top: 6px; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; }
.gallery .caption { font-size: 12px; color: var(--muted); }
.empty { color: var(--muted); margin: 0; }
footer { color: var(--muted); font-size: 12px; text-align: center; margin-top: 24px; }
@media print { body { background: #fff; } section { break-inside: avoid; } }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<main>
{body}
<footer>Written by flawscope {version}</footer>
</main>
</body>
</html>
"""
