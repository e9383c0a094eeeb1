"""The inline SVG line chart both pages draw (drawn here in Python: the page loads nothing).

`svg_chart` lays out the legend, picks round ticks for both axes, then draws, in this order, the
grid and axes, the alert markers, one polyline per series (with a dot per point when there are
few) and the legend. A series of more than MAX_POINTS points is thinned to its per-bucket minima
and maxima, so spikes survive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from trainer.report.shared import PALETTE, esc, fmt_num

MAX_POINTS = 500  # per chart series
WIDTH, PLOT_H = 960, 260  # px
LEFT, RIGHT, TOP = 68, 20, 30  # px of margin around the plot
PLOT_W = WIDTH - LEFT - RIGHT
ALERT_COLOR = "#d62728"


def _downsample(points: list[tuple[float, float]], limit: int = MAX_POINTS) -> list[tuple[float, float]]:
    """At most `limit` points: per bucket its min and max (in step order), so spikes survive."""
    if len(points) <= limit:
        return points
    buckets = max(1, limit // 2)
    n = len(points)
    out: list[tuple[float, float]] = []
    for b in range(buckets):
        chunk = points[b * n // buckets : (b + 1) * n // buckets]
        if not chunk:
            continue
        lo = min(range(len(chunk)), key=lambda i: chunk[i][1])
        hi = max(range(len(chunk)), key=lambda i: chunk[i][1])
        for i in sorted({lo, hi}):
            out.append(chunk[i])
    return out[:limit]


def _nice_ticks(lo: float, hi: float, target: int = 6, integer: bool = False) -> tuple[float, float, list[float]]:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    span = hi - lo
    raw = span / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    step = mag
    for m in ((1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)):
        step = m * mag
        if span / step <= target:
            break
    if integer:
        step = max(1.0, round(step))
    start = math.floor(lo / step + 1e-9) * step
    end = math.ceil(hi / step - 1e-9) * step
    count = int(round((end - start) / step))
    ticks = [start + i * step for i in range(count + 1)]
    return start, end, ticks


def _tick_label(value: float) -> str:
    value = round(value, 10)
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.3g}"
    return f"{value:g}"


@dataclass(frozen=True)
class _Frame:
    """Steps x0..x1 and values y0..y1 mapped onto the plot area, in px."""

    x0: float
    x1: float
    y0: float
    y1: float

    def px(self, step: float) -> float:
        return round(LEFT + (step - self.x0) / (self.x1 - self.x0) * PLOT_W, 1)

    def py(self, value: float) -> float:
        return round(TOP + (1 - (value - self.y0) / (self.y1 - self.y0)) * PLOT_H, 1)


def _legend_rows(items: list[tuple[str, str, str]]) -> list[list[tuple[int, tuple[str, str, str]]]]:
    """Legend items (name, colour, kind) wrapped over rows as wide as the plot: [(x, item)] per row."""
    rows: list[list] = [[]]
    x = 0
    for item in items:
        w = 34 + 7 * len(item[0])
        if x + w > PLOT_W and rows[-1]:
            rows.append([])
            x = 0
        rows[-1].append((x, item))
        x += w + 14
    return rows


def _grid_and_axes(frame: _Frame, xticks: list[float], yticks: list[float], y_label: str) -> list[str]:
    bottom = TOP + PLOT_H
    out = ['<g class="grid">']
    for t in yticks:
        out.append(f'<line x1="{LEFT}" x2="{LEFT + PLOT_W}" y1="{frame.py(t)}" y2="{frame.py(t)}"/>')
    out.append("</g>")
    out.append(f'<g class="axis y-axis"><line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{bottom}"/>')
    for t in yticks:
        out.append(f'<line x1="{LEFT - 5}" x2="{LEFT}" y1="{frame.py(t)}" y2="{frame.py(t)}"/>'
                   f'<text class="tick" x="{LEFT - 8}" y="{frame.py(t) + 4}" text-anchor="end">{_tick_label(t)}</text>')
    if y_label:
        out.append(f'<text class="axis-label" transform="translate(16 {TOP + PLOT_H / 2}) rotate(-90)" text-anchor="middle">{esc(y_label)}</text>')
    out.append("</g>")
    out.append(f'<g class="axis x-axis"><line x1="{LEFT}" x2="{LEFT + PLOT_W}" y1="{bottom}" y2="{bottom}"/>')
    for t in xticks:
        out.append(f'<line x1="{frame.px(t)}" x2="{frame.px(t)}" y1="{bottom}" y2="{bottom + 5}"/>'
                   f'<text class="tick" x="{frame.px(t)}" y="{bottom + 18}" text-anchor="middle">{_tick_label(t)}</text>')
    out.append(f'<text class="axis-label" x="{LEFT + PLOT_W / 2}" y="{bottom + 38}" text-anchor="middle">step</text></g>')
    return out


def _alert_markers(frame: _Frame, markers: Sequence[tuple[int, str, str]]) -> list[str]:
    """A red vertical line per alert step, linking to the alert."""
    out = ['<g class="alert-markers">']
    for step, tip, href in markers:
        out.append(f'<a href="{esc(href)}" class="alert-link"><line class="alert-marker" data-step="{int(step)}" '
                   f'x1="{frame.px(step)}" x2="{frame.px(step)}" y1="{TOP}" y2="{TOP + PLOT_H}"/><title>{esc(tip)}</title></a>')
    out.append("</g>")
    return out


def _series_line(frame: _Frame, name: str, points: list[tuple[float, float]], color: str, dashed: bool) -> list[str]:
    dash = ' stroke-dasharray="7 4"' if dashed else ""
    points = _downsample(points)
    coords = " ".join(f"{frame.px(s)},{frame.py(v)}" for s, v in points)
    out = [f'<g class="series" data-series="{esc(name)}" data-points="{len(points)}" style="color:{color}">'
           f'<polyline class="series-line" points="{coords}"{dash}><title>{esc(name)}</title></polyline>']
    if len(points) <= 60:  # few points: a dot each, with its value on hover
        for s, v in points:
            out.append(f'<circle cx="{frame.px(s)}" cy="{frame.py(v)}" r="3"><title>{esc(name)} @ step {_tick_label(s)}: {esc(fmt_num(v, 4))}</title></circle>')
    out.append("</g>")
    return out


def _legend(rows: list[list[tuple[int, tuple[str, str, str]]]], legend_top: int) -> list[str]:
    out = ['<g class="legend">']
    for r, row_items in enumerate(rows):
        y = legend_top + 18 * r
        for x, (name, color, kind) in row_items:
            lx = LEFT + x
            cls = "legend-item alert-legend" if kind == "marker" else "legend-item"
            attr = "" if kind == "marker" else f' data-series="{esc(name)}"'
            dash = ' stroke-dasharray="4 3"' if kind == "marker" else (' stroke-dasharray="7 4"' if kind == "dashed" else "")
            out.append(f'<g class="{cls}"{attr}><line x1="{lx}" x2="{lx + 24}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="3"{dash}/>'
                       f'<text x="{lx + 30}" y="{y + 4}">{esc(name)}</text></g>')
    out.append("</g>")
    return out


def svg_chart(
    chart_id: str,
    title: str,
    series: Sequence[tuple[str, list[tuple[float, float]]]],
    markers: Sequence[tuple[int, str, str]] = (),
    y_label: str = "",
) -> str:
    """An inline SVG line chart. `series`: (name, [(step, value)]) or (name, points, colour, dashed);
    `markers`: (step, tooltip, href)."""
    styles = [(entry[2], entry[3]) if len(entry) > 2 else (PALETTE[i % len(PALETTE)], False) for i, entry in enumerate(series)]
    series = [(entry[0], entry[1]) for entry in series]
    items = [(name, styles[i][0], "dashed" if styles[i][1] else "line") for i, (name, _) in enumerate(series)]
    if markers:
        items.append(("alert", ALERT_COLOR, "marker"))
    rows = _legend_rows(items)
    legend_top = TOP + PLOT_H + 56
    height = legend_top + 18 * len(rows) + 6

    steps = [p[0] for _, pts in series for p in pts] + [m[0] for m in markers]
    values = [p[1] for _, pts in series for p in pts]
    x0, x1, xticks = _nice_ticks(min(steps), max(steps), target=8, integer=True)
    y0, y1, yticks = _nice_ticks(min(values), max(values), target=6)
    frame = _Frame(x0, x1, y0, y1)

    out = [
        f'<svg class="chart" id="{esc(chart_id)}-svg" data-chart="{esc(chart_id)}" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img" aria-label="{esc(title)}">',
        f'<text class="chart-title" x="{LEFT}" y="{TOP - 12}">{esc(title)}</text>',
    ]
    out += _grid_and_axes(frame, xticks, yticks, y_label)
    if markers:
        out += _alert_markers(frame, markers)
    for (name, points), (color, dashed) in zip(series, styles):
        out += _series_line(frame, name, points, color, dashed)
    out += _legend(rows, legend_top)
    out.append("</svg>")
    return "".join(out)
