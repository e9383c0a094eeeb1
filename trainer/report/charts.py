"""The inline SVG line chart both pages draw (drawn here in Python: the page loads nothing).

`svg_chart` lays out the legend, picks round ticks for both axes, then draws, in this order, the
grid and axes, the alert markers, the run's actions (`ChartActions`: a band over the steps each
rollback discarded, a line at its alert step and one at the step it went back to, a line where
an alert stopped the run), one polyline per series (with a dot per point when there are few),
each series' discarded segments dashed apart from it, and the legend. A series of more than
MAX_POINTS points is thinned to its per-bucket minima and maxima, so spikes survive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from trainer.report.shared import PALETTE, esc, fmt_num

MAX_POINTS = 500  # per chart series
WIDTH, PLOT_H = 960, 260  # px
LEFT, RIGHT, TOP = 68, 20, 30  # px of margin around the plot
PLOT_W = WIDTH - LEFT - RIGHT
ALERT_COLOR = "#d62728"
ROLLBACK_COLOR = "#7b3fa0"
STOP_COLOR = "#1d2330"
DISCARDED_COLOR = "#9aa0a6"


@dataclass(frozen=True)
class RollbackMark:
    step: int  # the alert step
    to_step: int  # the step it went back to
    tip: str
    href: str
    label: str = ""  # drawn at the top of the line (the run's letter on the comparison page)


@dataclass(frozen=True)
class StopMark:
    step: int
    tip: str
    href: str
    label: str = ""


@dataclass
class ChartActions:
    """What the run did about its alerts, drawn on every chart: rollbacks, a stop, and per series
    name the segments of points a rollback discarded, each (the kept point it branches off or
    None, the discarded points)."""

    rollbacks: Sequence[RollbackMark] = ()
    stops: Sequence[StopMark] = ()
    discarded: dict[str, list[tuple[Optional[tuple[float, float]], list[tuple[float, float]]]]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.rollbacks or self.stops or any(self.discarded.values()))


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


def _action_markers(frame: _Frame, actions: ChartActions) -> list[str]:
    """Per rollback a grey band over the discarded steps, a solid line at its alert step and a
    dotted one at the step it restored; per stop a thick line. Each links to its entry."""
    top, bottom = TOP, TOP + PLOT_H
    out = ['<g class="action-markers">']
    labels_at: dict[float, int] = {}  # labels drawn at an x so far: the next one goes below (runs compared)

    def label_y(x: float) -> int:
        labels_at[x] = labels_at.get(x, 0) + 1
        return top + 11 + 13 * (labels_at[x] - 1)

    for r in actions.rollbacks:
        x0, x1 = frame.px(r.to_step), frame.px(r.step)
        label = f'<text class="action-label" x="{x1 + 3}" y="{label_y(x1)}" fill="{ROLLBACK_COLOR}">{esc(r.label)}↺</text>'
        out.append(f'<a href="{esc(r.href)}" class="action-link"><title>{esc(r.tip)}</title>'
                   f'<rect class="discarded-band" x="{x0}" y="{top}" width="{round(max(0.0, x1 - x0), 1)}" height="{PLOT_H}" '
                   f'fill="{DISCARDED_COLOR}" fill-opacity="0.12"/>'
                   f'<line class="rollback-marker" data-step="{int(r.step)}" data-to-step="{int(r.to_step)}" x1="{x1}" x2="{x1}" '
                   f'y1="{top}" y2="{bottom}" stroke="{ROLLBACK_COLOR}" stroke-width="2"/>'
                   f'<line class="restore-marker" data-step="{int(r.to_step)}" x1="{x0}" x2="{x0}" y1="{top}" y2="{bottom}" '
                   f'stroke="{ROLLBACK_COLOR}" stroke-width="1.4" stroke-dasharray="2 3"/>{label}</a>')
    for st in actions.stops:
        x = frame.px(st.step)
        out.append(f'<a href="{esc(st.href)}" class="action-link"><title>{esc(st.tip)}</title>'
                   f'<line class="stop-marker" data-step="{int(st.step)}" x1="{x}" x2="{x}" y1="{top}" y2="{bottom}" '
                   f'stroke="{STOP_COLOR}" stroke-width="3"/>'
                   f'<text class="action-label" x="{x + 4}" y="{label_y(x)}" fill="{STOP_COLOR}">{esc(st.label)}■</text></a>')
    out.append("</g>")
    return out


def _discarded_lines(frame: _Frame, name: str, segments: list, color: str) -> list[str]:
    """A series' points that a rollback discarded: grey dashed polylines (one per rollback, from
    the kept point it branches off) in a group of their own, hidden and shown with the series by
    its legend item; a dot per discarded point when there are few."""
    out = [f'<g class="series discarded" data-series="{esc(name)}" data-segments="{len(segments)}" style="color:{color}">']
    for anchor, points in segments:
        points = _downsample(points)
        coords = " ".join(f"{frame.px(s)},{frame.py(v)}" for s, v in ([anchor] if anchor else []) + points)
        out.append(f'<polyline class="discarded-line" points="{coords}" fill="none" stroke="{DISCARDED_COLOR}" stroke-width="1.6" '
                   f'stroke-dasharray="3 3"><title>{esc(name)}: discarded by a rollback</title></polyline>')
        if len(points) <= 60:
            for s, v in points:
                out.append(f'<circle cx="{frame.px(s)}" cy="{frame.py(v)}" r="2.5" fill="{DISCARDED_COLOR}">'
                           f'<title>{esc(name)} (discarded) @ step {_tick_label(s)}: {esc(fmt_num(v, 4))}</title></circle>')
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


LEGEND_DASH = {"rollback": "", "discarded": ' stroke-dasharray="3 3"', "stop": ""}  # the actions' legend items


def _legend(rows: list[list[tuple[int, tuple[str, str, str]]]], legend_top: int) -> list[str]:
    out = ['<g class="legend">']
    for r, row_items in enumerate(rows):
        y = legend_top + 18 * r
        for x, (name, color, kind) in row_items:
            lx = LEFT + x
            cls = "legend-item alert-legend" if kind == "marker" else (f"legend-item {kind}-legend" if kind in LEGEND_DASH else "legend-item")
            attr = "" if kind == "marker" or kind in LEGEND_DASH else f' data-series="{esc(name)}"'
            dash = ' stroke-dasharray="4 3"' if kind == "marker" else (' stroke-dasharray="7 4"' if kind == "dashed" else LEGEND_DASH.get(kind, ""))
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
    actions: Optional[ChartActions] = None,
) -> str:
    """An inline SVG line chart. `series`: (name, [(step, value)]) or (name, points, colour, dashed);
    `markers`: (step, tooltip, href); `actions`: the run's rollbacks and stops."""
    styles = [(entry[2], entry[3]) if len(entry) > 2 else (PALETTE[i % len(PALETTE)], False) for i, entry in enumerate(series)]
    series = [(entry[0], entry[1]) for entry in series]
    items = [(name, styles[i][0], "dashed" if styles[i][1] else "line") for i, (name, _) in enumerate(series)]
    if markers:
        items.append(("alert", ALERT_COLOR, "marker"))
    actions = actions or ChartActions()
    discarded = {name: [seg for seg in actions.discarded.get(name, []) if seg[1]] for name, _ in series}
    discarded = {name: segs for name, segs in discarded.items() if segs}
    if actions.rollbacks:
        items.append(("rollback", ROLLBACK_COLOR, "rollback"))
    if discarded:
        items.append(("discarded steps", DISCARDED_COLOR, "discarded"))
    if actions.stops:
        items.append(("stop", STOP_COLOR, "stop"))
    rows = _legend_rows(items)
    legend_top = TOP + PLOT_H + 56
    height = legend_top + 18 * len(rows) + 6

    steps = [p[0] for _, pts in series for p in pts] + [m[0] for m in markers]
    values = [p[1] for _, pts in series for p in pts]
    if actions:
        steps += [s for r in actions.rollbacks for s in (r.step, r.to_step)] + [st.step for st in actions.stops]
        steps += [p[0] for segs in discarded.values() for _, seg in segs for p in seg]
        values += [p[1] for segs in discarded.values() for _, seg in segs for p in seg]
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
    if actions.rollbacks or actions.stops:
        out += _action_markers(frame, actions)
    for (name, points), (color, dashed) in zip(series, styles):
        out += _series_line(frame, name, points, color, dashed)
        if name in discarded:
            out += _discarded_lines(frame, name, discarded[name], color)
    out += _legend(rows, legend_top)
    out.append("</svg>")
    return "".join(out)
