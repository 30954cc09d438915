"""Inline SVG line plots for the HTML report, written by hand so the report needs no plotting library."""

from __future__ import annotations

from html import escape

import numpy as np

_WIDTH, _HEIGHT = 360, 280
_LEFT, _RIGHT, _TOP, _BOTTOM = 50, 14, 12, 42
_NICE_STEPS = (0.01, 0.02, 0.025, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0)
MAX_POINTS = 500


def downsample(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS, xmax: float = 1.0) -> np.ndarray:
    """Picks curve points evenly spaced along the drawn path, so the shape survives while the count drops.

    Even spacing in arc length, not in index, matters for pixel ROC curves: most of their millions of points sit in
    a tiny corner of the plot.

    Args:
        x: (N,) curve x values, plotted on [0, xmax].
        y: (N,) curve y values, plotted on [0, 1].
        max_points: the most points to keep, at least 2.
        xmax: right end of the x axis, used to weigh x and y steps alike.

    Returns:
        (M,) sorted indices into x and y with M <= max_points, always holding 0 and N - 1.
    """
    count = len(x)
    if count <= max_points:
        return np.arange(count)
    step = np.hypot(np.diff(x) / xmax, np.diff(y))
    travelled = np.concatenate([[0.0], np.cumsum(step)])
    marks = np.linspace(0.0, travelled[-1], max_points)
    inner = np.searchsorted(travelled, marks[1:-1])
    return np.unique(np.concatenate([[0], inner, [count - 1]]))


def line_plot(x: np.ndarray, y: np.ndarray, *, xlabel: str, ylabel: str, xmax: float = 1.0) -> str:
    """Renders one curve on [0, xmax] x [0, 1] as an inline SVG element.

    Args:
        x: (N,) x values; non-finite points are dropped and points beyond xmax are cut at xmax.
        y: (N,) y values.
        xlabel: x axis title.
        ylabel: y axis title.
        xmax: right end of the x axis.

    Returns:
        An `<svg class="curve">` string that scales with its container.
    """
    x, y = _clip_to_axis(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), xmax)
    keep = downsample(x, y, xmax=xmax)
    parts = [
        f'<svg class="curve" viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img">',
        *_axes(xmax, xlabel, ylabel),
    ]
    if len(keep) > 1:
        points = " ".join(f"{_px(a, xmax):.1f},{_py(b):.1f}" for a, b in zip(x[keep], y[keep], strict=True))
        base = f"{_px(x[keep[-1]], xmax):.1f},{_py(0):.1f} {_px(x[keep[0]], xmax):.1f},{_py(0):.1f}"
        parts.append(f'<polygon class="fill" points="{points} {base}"/>')
        parts.append(f'<polyline class="line" points="{points}"/>')
    parts.append("</svg>")
    return "\n".join(parts)


def _clip_to_axis(x: np.ndarray, y: np.ndarray, xmax: float) -> tuple[np.ndarray, np.ndarray]:
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    if not np.any(x > xmax):
        return x, y
    # Cutting at xmax needs x in order; curves plotted up to a limit (PRO) rise in x anyway.
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    y_at_limit = np.interp(xmax, x, y)
    inside = x <= xmax
    return np.append(x[inside], xmax), np.append(y[inside], y_at_limit)


def _px(value: float, xmax: float) -> float:
    return _LEFT + value / xmax * (_WIDTH - _LEFT - _RIGHT)


def _py(value: float) -> float:
    return _HEIGHT - _BOTTOM - value * (_HEIGHT - _TOP - _BOTTOM)


def _ticks(limit: float) -> np.ndarray:
    step = next((s for s in _NICE_STEPS if limit / s <= 6 + 1e-9), limit)
    return np.arange(0.0, limit + step / 2, step)


def _axes(xmax: float, xlabel: str, ylabel: str) -> list[str]:
    left, right, top, bottom = _px(0, xmax), _px(xmax, xmax), _py(1), _py(0)
    parts = []
    for value in _ticks(xmax):
        at = _px(value, xmax)
        parts.append(f'<line class="grid" x1="{at:.1f}" y1="{top:.1f}" x2="{at:.1f}" y2="{bottom:.1f}"/>')
        parts.append(f'<text class="tick" x="{at:.1f}" y="{bottom + 15:.1f}" text-anchor="middle">{value:g}</text>')
    for value in _ticks(1.0):
        at = _py(value)
        parts.append(f'<line class="grid" x1="{left:.1f}" y1="{at:.1f}" x2="{right:.1f}" y2="{at:.1f}"/>')
        parts.append(f'<text class="tick" x="{left - 6:.1f}" y="{at + 4:.1f}" text-anchor="end">{value:g}</text>')
    middle_x, middle_y = (left + right) / 2, (top + bottom) / 2
    parts += [
        f'<rect class="frame" x="{left:.1f}" y="{top:.1f}" width="{right - left:.1f}" height="{bottom - top:.1f}"/>',
        f'<text class="label" x="{middle_x:.1f}" y="{_HEIGHT - 6}" text-anchor="middle">{escape(xlabel)}</text>',
        f'<text class="label" x="14" y="{middle_y:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {middle_y:.1f})">{escape(ylabel)}</text>',
    ]
    return parts
