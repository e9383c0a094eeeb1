"""HTML report of a run: loss and reward charts plus one timeline per prompt.

Reads a run directory (`metrics.jsonl` and `samples.jsonl`) and writes ONE self-contained HTML
file (default `<run_dir>/report.html`, written atomically) that opens from disk with no server:
inline CSS, inline SVG charts drawn here in Python, and a little inline vanilla JS for the
controls. Nothing is loaded from the network.

    python -m trainer.report RUN_DIR [--out FILE]
    python -m trainer.report RUN_A RUN_B [RUN_C ...] --out compare.html   (trainer/report_compare.py)

prints the path of the page, and on stderr how far each run got (finished, running or stopped;
the last step of how many, from `run_state.json`, which the run writes). During a run the report
is rewritten at each sample event (trainer/live_report.py). Exit code 2 with one `error: ...`
line when a RUN_DIR holds neither `metrics.jsonl` nor `samples.jsonl`. From Python:
`write_report(run_dir, out=None) -> Path`.

What the report shows, top to bottom:
  * a header (run name, steps, sample events, alerts with a link to the first one, progress);
  * the grid: one row per prompt, one column per sample event, each cell coloured by exact match,
    else reward, else how much the answer changed; alerts outlined; hover shows the generation,
    click opens that row of the prompt's timeline;
  * the train/val loss chart (alert steps drawn as red vertical lines that link to the alert) and
    the reward chart (every metric containing "/reward/" plus "val/exact_match");
  * the list of alerts, each linking to its row;
  * controls: filter prompts by text, expand / collapse all, only prompts with alerts, diff on/off;
  * one collapsed `<details class="timeline">` per prompt (in order of first appearance) with one
    row per event: the generation with the words changed since the previous event of the same
    prompt (and the same prefix, so greedy validations are not compared with sampled RL
    generations) marked `<ins>` / `<del>`, its signals and rewards, and its alerts in place.

All text from the run is escaped with `html.escape`; the page embeds no data in scripts.
The CSS and JS are files in trainer/report_assets/, inlined. The JS sets `document.body.dataset.ready = "1"` once initialised; a handler installed in
`<head>` writes any uncaught error into `<div id="js-errors">` (the browser test checks both).
"""

from __future__ import annotations

import argparse
import difflib
import html
import json
import math
import os
import re
import sys
import socket
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from trainer.tracking.file import METRICS_FILE, read_metrics, read_records

SAMPLES_FILE = "samples.jsonl"
REPORT_FILE = "report.html"
COMPARE_FILE = "compare.html"
MAX_POINTS = 500  # per chart series
PREVIEW_CHARS = 110
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


# --------------------------------------------------------------------------------------------
# Reading samples.jsonl


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def read_samples(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(samples, alerts) from `<run_dir>/samples.jsonl`.

    Broken lines (a torn last line after a crash) are skipped. After a resume the same
    (step, stage, prompt_id) sample, or the same (step, stage, prompt_id, rule) alert, can appear
    twice: the last one wins. Samples are sorted by step then index, alerts by step (stable).
    """
    path = Path(run_dir) / SAMPLES_FILE
    samples: dict[tuple, dict] = {}
    alerts: dict[tuple, dict] = {}
    for record in read_records(path):
        if "step" not in record:
            continue
        try:
            record["step"] = int(record["step"])
        except (TypeError, ValueError):
            continue
        stage = str(record.get("stage", ""))
        kind = record.get("kind", "sample" if "generation" in record else None)
        if kind == "sample":
            record["index"] = _int(record.get("index"), 0)
            pid = record.get("prompt_id") or f"#{record.get('prefix', '')}:{record['index']}"
            record["prompt_id"] = str(pid)
            key = (record["step"], stage, record["prompt_id"])
            samples.pop(key, None)  # keep the position of the last copy too
            samples[key] = record
        elif kind == "alert":
            pid = record.get("prompt_id")
            record["prompt_id"] = None if pid is None else str(pid)
            key = (record["step"], stage, record["prompt_id"], str(record.get("rule", "")))
            alerts.pop(key, None)
            alerts[key] = record
    sample_list = sorted(samples.values(), key=lambda r: (r["step"], r["index"]))
    alert_list = sorted(alerts.values(), key=lambda r: r["step"])
    return sample_list, alert_list


# --------------------------------------------------------------------------------------------
# Formatting helpers


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and math.isfinite(value):
        if float(value).is_integer() and abs(value) < 1e9:
            return str(int(value))
        return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    if value is None:
        return "–"
    return str(value)


def _preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------------------------
# Word diff

_WORD = re.compile(r"(\S+)(\s*)")


def word_diff(previous: Optional[str], current: str) -> str:
    """`current` as escaped HTML with the words changed since `previous` in <ins>/<del>.

    Whitespace-split tokens are compared with difflib.SequenceMatcher; the whitespace of the
    current text (newlines included) is kept. With no previous text, the plain escaped text.
    """
    current = current or ""
    leading = current[: len(current) - len(current.lstrip())]
    cur = _WORD.findall(current)  # [(word, following whitespace)]
    if previous is None:
        return esc(current)
    prev_words = (previous or "").split()
    cur_words = [w for w, _ in cur]
    matcher = difflib.SequenceMatcher(None, prev_words, cur_words, autojunk=False)
    out = [esc(leading)]

    def span(i1: int, i2: int) -> str:
        return "".join(esc(w) + esc(s) for w, s in cur[i1:i2])

    def split_trailing(i1: int, i2: int) -> tuple[str, str]:
        # keep the whitespace after the last changed word outside the <ins>
        text = "".join(esc(w) + (esc(s) if k < i2 - 1 else "") for k, (w, s) in enumerate(cur[i1:i2], start=i1))
        return text, esc(cur[i2 - 1][1])

    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            out.append(span(j1, j2))
            continue
        if tag in ("delete", "replace"):
            at_end = j1 == len(cur)
            out.append((" " if at_end and j1 > 0 else "") + "<del>" + esc(" ".join(prev_words[i1:i2])) + "</del>")
            out.append(" " if tag == "replace" or not at_end else "")
        if tag in ("insert", "replace"):
            text, trailing = split_trailing(j1, j2)
            out.append("<ins>" + text + "</ins>" + trailing)
    return "".join(out)


# --------------------------------------------------------------------------------------------
# SVG charts


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
    width, plot_h = 960, 260
    left, right, top = 68, 20, 30
    plot_w = width - left - right
    # legend layout: wrap items over rows
    items = [(name, styles[i][0], "dashed" if styles[i][1] else "line") for i, (name, _) in enumerate(series)]
    if markers:
        items.append(("alert", "#d62728", "marker"))
    rows, x = [[]], 0
    for item in items:
        w = 34 + 7 * len(item[0])
        if x + w > plot_w and rows[-1]:
            rows.append([])
            x = 0
        rows[-1].append((x, item))
        x += w + 14
    legend_top = top + plot_h + 56
    height = legend_top + 18 * len(rows) + 6

    steps = [p[0] for _, pts in series for p in pts] + [m[0] for m in markers]
    values = [p[1] for _, pts in series for p in pts]
    x0, x1, xticks = _nice_ticks(min(steps), max(steps), target=8, integer=True)
    y0, y1, yticks = _nice_ticks(min(values), max(values), target=6)

    def px(step: float) -> float:
        return round(left + (step - x0) / (x1 - x0) * plot_w, 1)

    def py(value: float) -> float:
        return round(top + (1 - (value - y0) / (y1 - y0)) * plot_h, 1)

    out = [
        f'<svg class="chart" id="{esc(chart_id)}-svg" data-chart="{esc(chart_id)}" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" aria-label="{esc(title)}">',
        f'<text class="chart-title" x="{left}" y="{top - 12}">{esc(title)}</text>',
        '<g class="grid">',
    ]
    for t in yticks:
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(t)}" y2="{py(t)}"/>')
    out.append("</g>")
    out.append(f'<g class="axis y-axis"><line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}"/>')
    for t in yticks:
        out.append(f'<line x1="{left - 5}" x2="{left}" y1="{py(t)}" y2="{py(t)}"/>'
                   f'<text class="tick" x="{left - 8}" y="{py(t) + 4}" text-anchor="end">{_tick_label(t)}</text>')
    if y_label:
        out.append(f'<text class="axis-label" transform="translate(16 {top + plot_h / 2}) rotate(-90)" text-anchor="middle">{esc(y_label)}</text>')
    out.append("</g>")
    out.append(f'<g class="axis x-axis"><line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}"/>')
    for t in xticks:
        out.append(f'<line x1="{px(t)}" x2="{px(t)}" y1="{top + plot_h}" y2="{top + plot_h + 5}"/>'
                   f'<text class="tick" x="{px(t)}" y="{top + plot_h + 18}" text-anchor="middle">{_tick_label(t)}</text>')
    out.append(f'<text class="axis-label" x="{left + plot_w / 2}" y="{top + plot_h + 38}" text-anchor="middle">step</text></g>')

    if markers:
        out.append('<g class="alert-markers">')
        for step, tip, href in markers:
            out.append(f'<a href="{esc(href)}" class="alert-link"><line class="alert-marker" data-step="{int(step)}" '
                       f'x1="{px(step)}" x2="{px(step)}" y1="{top}" y2="{top + plot_h}"/><title>{esc(tip)}</title></a>')
        out.append("</g>")

    for i, (name, pts) in enumerate(series):
        color, dashed = styles[i]
        dash = ' stroke-dasharray="7 4"' if dashed else ""
        pts = _downsample(pts)
        coords = " ".join(f"{px(s)},{py(v)}" for s, v in pts)
        out.append(f'<g class="series" data-series="{esc(name)}" data-points="{len(pts)}" style="color:{color}">'
                   f'<polyline class="series-line" points="{coords}"{dash}><title>{esc(name)}</title></polyline>')
        if len(pts) <= 60:
            for s, v in pts:
                out.append(f'<circle cx="{px(s)}" cy="{py(v)}" r="3"><title>{esc(name)} @ step {_tick_label(s)}: {esc(_num(v, 4))}</title></circle>')
        out.append("</g>")

    out.append('<g class="legend">')
    for r, row_items in enumerate(rows):
        y = legend_top + 18 * r
        for x, (name, color, kind) in row_items:
            lx = left + x
            cls = "legend-item alert-legend" if kind == "marker" else "legend-item"
            attr = "" if kind == "marker" else f' data-series="{esc(name)}"'
            dash = ' stroke-dasharray="4 3"' if kind == "marker" else (' stroke-dasharray="7 4"' if kind == "dashed" else "")
            out.append(f'<g class="{cls}"{attr}><line x1="{lx}" x2="{lx + 24}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="3"{dash}/>'
                       f'<text x="{lx + 30}" y="{y + 4}">{esc(name)}</text></g>')
    out.append("</g></svg>")
    return "".join(out)


def _series(metrics: dict[int, dict[str, float]], name: str) -> list[tuple[float, float]]:
    return [(step, float(m[name])) for step, m in metrics.items() if _finite(m.get(name))]


# --------------------------------------------------------------------------------------------
# The grid: one row per prompt, one column per sample event

CHANGE_FULL_SCALE = 0.5  # 1 - similarity to the previous answer at which a change gets the darkest colour
GRID_LEGEND = (
    ("em1", "exact match"), ("em0", "no exact match"), ("r0", "low reward"), ("r4", "high reward"),
    ("c0", "same answer as before"), ("c4", "answer changed a lot"), ("new", "first answer"), ("al", "alert"),
)


def _event_key(sample: dict) -> tuple:
    return sample["step"], str(sample.get("stage", "")), str(sample.get("prefix", ""))


def _mean_reward(sample: dict) -> Optional[float]:
    rewards = sample.get("rewards") if isinstance(sample.get("rewards"), dict) else {}
    values = [float(v) for v in rewards.values() if _finite(v)]
    return sum(values) / len(values) if values else None


def _bucket(value: float, lo: float, hi: float, buckets: int = 5) -> int:
    if hi <= lo:
        return buckets - 1
    return min(buckets - 1, max(0, int((value - lo) / (hi - lo) * buckets)))


def _cell_class(sample: dict, reward_range: tuple[float, float]) -> str:
    """What matters for the prompt: exact match where there is a reference, else the reward,
    else how much the answer changed since the prompt's previous event."""
    sig = sample.get("signals") if isinstance(sample.get("signals"), dict) else {}
    em = sig.get("exact_match")
    if _finite(em):
        return "em1" if em >= 1 else "em0"
    reward = _mean_reward(sample)
    if reward is not None:
        return f"r{_bucket(reward, *reward_range)}"
    sim = sig.get("similarity_to_previous")
    if _finite(sim):
        return f"c{_bucket(1.0 - sim, 0.0, CHANGE_FULL_SCALE)}"
    return "new"


def render_grid(prompts: dict[str, list[dict]], numbers: dict[str, int], alerts_by_prompt: dict[str, list[dict]],
                event_wide: Sequence[dict] = ()) -> str:
    """The grid section. Each cell links to its row in the prompt's timeline (`#p<N>-e<K>`); the
    page's script shows that row's generation on hover, so no text is stored twice. Alerts about
    a whole event (collapse, most samples hitting the limit) get a row of their own on top."""
    events: dict[tuple, None] = {}
    for rows in prompts.values():
        for s in rows:
            events.setdefault(_event_key(s), None)
    columns = sorted(events, key=lambda k: k[0])  # by step; same-step events keep their file order
    if not columns:
        return '<section id="grid-section"><h2>At a glance</h2><p class="meta" id="grid-empty">No sample events yet.</p></section>'
    col_of = {k: i for i, k in enumerate(columns)}
    rewards = [r for rows in prompts.values() for s in rows if (r := _mean_reward(s)) is not None]
    reward_range = (min(rewards), max(rewards)) if rewards else (0.0, 1.0)
    out = [f'<section id="grid-section"><h2>At a glance: {len(prompts)} prompts × {len(columns)} sample events</h2>',
           '<p class="grid-legend meta">' + "".join(f'<span class="c {c}"></span>{esc(t)} ' for c, t in GRID_LEGEND)
           + '· hover a cell for its generation, click it for its place in the timeline</p>',
           f'<div id="grid" style="--cols:{len(columns)}" data-rows="{len(prompts)}" data-cols="{len(columns)}">']
    # column heads: about ten step labels across
    every = max(1, math.ceil(len(columns) / 10))
    heads = "".join(f'<span class="gh" style="grid-column:{i + 2}">{columns[i][0]}</span>' for i in range(0, len(columns), every))
    out.append(f'<div class="grid-row grid-head"><span class="gl">step</span>{heads}</div>')
    if event_wide:
        cells = ['<span class="c"></span>'] * len(columns)
        for a in event_wide:
            for i, key in enumerate(columns):
                if key[:2] == (a["step"], str(a.get("stage", ""))) and cells[i].startswith("<span"):
                    cells[i] = f'<a class="c al" href="#{a["anchor"]}"></a>'
        out.append(f'<div class="grid-row grid-events"><span class="gl">⚠ all prompts</span>{"".join(cells)}</div>')
    for pid, rows in prompts.items():
        num = numbers[pid]
        alert_events = {(a["step"], str(a.get("stage", ""))) for a in alerts_by_prompt.get(pid, [])}
        cells = ['<span class="c"></span>'] * len(columns)
        for k, s in enumerate(rows, start=1):
            cls = _cell_class(s, reward_range)
            if s.get("alerts") or (s["step"], str(s.get("stage", ""))) in alert_events:
                cls += " al"
            cells[col_of[_event_key(s)]] = f'<a class="c {cls}" href="#p{num}-e{k}"></a>'
        label = _preview(str(rows[-1].get("prompt", "")), 40)
        out.append(f'<div class="grid-row" data-prompt-id="{esc(pid)}"><a class="gl" href="#p{num}-e1" title="{esc(label)}">'
                   f'#{num} {esc(label)}</a>{"".join(cells)}</div>')
    out.append('</div><div id="grid-tip" hidden></div></section>')
    return "".join(out)


# --------------------------------------------------------------------------------------------
# How far the run got

RUN_STATE_FILE = "run_state.json"


def write_run_state(run_dir: Path, state: dict) -> None:
    """`run_state.json`: written by the run (status running / finished, total steps, pid, host)."""
    _atomic_write(Path(run_dir) / RUN_STATE_FILE, json.dumps({**state, "host": socket.gethostname()}))


def read_run_state(run_dir: Path) -> dict:
    try:
        state = json.loads((Path(run_dir) / RUN_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _process_gone(state: dict) -> bool:
    """The run's process no longer exists (only knowable on the host it ran on)."""
    if state.get("host") != socket.gethostname() or not isinstance(state.get("pid"), int):
        return False
    try:
        os.kill(state["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def run_progress(run_dir: Path, metrics: dict[int, dict[str, float]], samples: list[dict], now: Optional[float] = None) -> str:
    """One line: finished, running or stopped, the last step of how many, the last sample event."""
    run_dir = Path(run_dir)
    state = read_run_state(run_dir)
    last = max(set(metrics) | {s["step"] for s in samples}, default=None)
    total = state.get("total_steps") if isinstance(state.get("total_steps"), int) else None
    if last is None:
        reached = "no step logged yet"
    elif total:
        reached = f"step {last} of {total} ({100 * last / total:.0f}%)"
    else:
        reached = f"step {last}"
    event = f"last sample event at step {samples[-1]['step']}" if samples else "no sample event yet"
    times = [p.stat().st_mtime for p in (run_dir / METRICS_FILE, run_dir / SAMPLES_FILE) if p.is_file()]
    age = f"last record {_ago((now or time.time()) - max(times))} ago" if times else ""
    if state.get("status") == "finished":
        head = "finished"
    elif state.get("status") == "running":
        head = f"stopped (process {state.get('pid')} is gone)" if _process_gone(state) else "running, or stopped without notice"
    else:
        head = "status unknown (no run_state.json)"
    return "; ".join(filter(None, [f"{head}: {reached}", event, age if head != "finished" else ""]))


# --------------------------------------------------------------------------------------------
# The page


def _asset(name: str) -> str:
    """A file of trainer/report_assets (package data), inlined into the page."""
    return resources.files("trainer").joinpath("report_assets", name).read_text(encoding="utf-8")


def _alert_label(alert: dict, prompt_numbers: dict[str, int]) -> str:
    pid = alert.get("prompt_id")
    where = "all prompts" if pid is None else (f"prompt #{prompt_numbers[pid]}" if pid in prompt_numbers else f"prompt {pid}")
    return f"step {alert['step']} · {alert.get('stage', '')} · {alert.get('rule', '')} · {where}"


def _alert_row(alert: dict, colspan: int = 5) -> str:
    synthetic = ' <span class="meta">(from the sample record)</span>' if alert.get("synthetic") else ""
    return (
        f'<tr class="alert-row rule-{esc(re.sub(r"[^A-Za-z0-9_-]", "_", str(alert.get("rule", ""))))}" id="{alert["anchor"]}">'
        f'<td colspan="{colspan}">⚠ <span class="rule">{esc(alert.get("rule", ""))}</span> '
        f'<span class="meta">step {alert["step"]} · {esc(alert.get("stage", ""))}</span> — '
        f'<span class="alert-message">{esc(alert.get("message", ""))}</span>{synthetic}</td></tr>'
    )


def _settings_text(settings: Any) -> str:
    if not isinstance(settings, dict) or not settings:
        return ""
    if settings.get("do_sample") is False:
        mode = "greedy"
    else:
        mode = f"T={_num(settings.get('temperature'))} p={_num(settings.get('top_p'))} k={_num(settings.get('top_k'))}"
    return f"{mode} · max {_num(settings.get('max_new_tokens'))} · seed {_num(settings.get('seed'))}"


def _signals_html(sample: dict) -> str:
    sig = sample.get("signals") if isinstance(sample.get("signals"), dict) else {}
    parts = []
    length = sig.get("length_tokens", sample.get("generated_tokens"))
    parts.append(f"<span>len {esc(_num(length))}</span>")
    hit = sig.get("hit_limit", None if "stopped_at_eos" not in sample else not sample.get("stopped_at_eos"))
    if hit:
        parts.append('<span class="warn">hit limit</span>')
    rep = sig.get("repetition")
    rep_cls = ' class="warn"' if _finite(rep) and rep >= 0.5 else ""
    parts.append(f"<span{rep_cls}>rep {esc(_num(rep, 2))}</span>")
    em = sig.get("exact_match")
    if _finite(em):
        parts.append(f'<span class="{"em-ok" if em >= 1 else "warn"}">EM {esc(_num(em))}</span>')
    else:
        parts.append("<span>EM –</span>")
    parts.append(f"<span>sim {esc(_num(sig.get('similarity_to_previous'), 2))}</span>")
    tags = sample.get("alerts") or []
    if isinstance(tags, list) and tags:
        parts.append("<br>" + "".join(f'<span class="tag">{esc(t)}</span>' for t in tags))
    return "".join(parts)


def _rewards_html(rewards: Any) -> str:
    if not isinstance(rewards, dict) or not rewards:
        return '<span class="meta">–</span>'
    return "".join(f"<span>{esc(k)} {esc(_num(v))}</span>" for k, v in rewards.items())


def _latest_text(sample: dict) -> str:
    sig = sample.get("signals") if isinstance(sample.get("signals"), dict) else {}
    bits = []
    em = sig.get("exact_match")
    if _finite(em):
        bits.append(f"EM {_num(em)}")
    rewards = sample.get("rewards") if isinstance(sample.get("rewards"), dict) else {}
    bits += [f"{k} {_num(v)}" for k, v in rewards.items()]
    return " · ".join(esc(b) for b in bits)


def _prepare_alerts(samples: list[dict], alerts: list[dict]) -> list[dict]:
    """Alert records plus in-sample alert strings no record covers, numbered in step order."""
    by_event: dict[tuple, list[dict]] = {}
    for a in alerts:
        by_event.setdefault((a["step"], str(a.get("stage", "")), a.get("prompt_id")), []).append(a)
    extra = []
    for s in samples:
        tags = s.get("alerts")
        if not isinstance(tags, list):
            continue
        recs = by_event.get((s["step"], str(s.get("stage", "")), s["prompt_id"]), [])
        for tag in tags:
            tag = str(tag)
            if any(tag in (str(r.get("rule")), str(r.get("message"))) or (r.get("rule") and str(r["rule"]) in tag) for r in recs):
                continue
            extra.append({"kind": "alert", "step": s["step"], "stage": s.get("stage", ""), "rule": tag,
                          "prompt_id": s["prompt_id"], "message": tag, "synthetic": True})
    merged = sorted([dict(a) for a in alerts] + extra, key=lambda a: a["step"])
    for n, a in enumerate(merged, start=1):
        a["anchor"] = f"alert-{n}"
    return merged


def render_report(run_name: str, metrics: dict[int, dict[str, float]], samples: list[dict], alerts: list[dict],
                  progress: str = "") -> str:
    """The whole page as a string (pure: no file access). `progress`: how far the run got."""
    alerts = _prepare_alerts(samples, alerts)

    # prompts in order of first appearance
    prompts: dict[str, list[dict]] = {}
    for s in samples:
        prompts.setdefault(s["prompt_id"], []).append(s)
    prompt_numbers = {pid: n for n, pid in enumerate(prompts, start=1)}
    alerts_by_prompt: dict[str, list[dict]] = {}
    event_wide: list[dict] = []
    for a in alerts:
        pid = a.get("prompt_id")
        if pid is not None and pid in prompts:
            alerts_by_prompt.setdefault(pid, []).append(a)
        else:
            event_wide.append(a)

    events = {(s["step"], str(s.get("stage", "")), str(s.get("prefix", ""))) for s in samples}
    steps = sorted(set(metrics) | {s["step"] for s in samples})
    parts: list[str] = []
    w = parts.append

    # ---- header
    w('<header id="header">')
    w(f'<h1>Run report: <span id="run-name">{esc(run_name)}</span></h1><ul class="stats">')
    last = f" (last {steps[-1]})" if steps else ""
    w(f'<li id="stat-steps" data-value="{len(steps)}"><b>{len(steps)}</b> steps{last}</li>')
    w(f'<li id="stat-events" data-value="{len(events)}"><b>{len(events)}</b> sample events · {len(prompts)} prompts</li>')
    first = f' — <a id="first-alert-link" class="alert-link" href="#{alerts[0]["anchor"]}">jump to first alert</a>' if alerts else ""
    w(f'<li id="stat-alerts" data-value="{len(alerts)}"><b>{len(alerts)}</b> alerts{first}</li>')
    if progress:
        w(f'<li id="stat-progress">{esc(progress)}</li>')
    w("</ul></header>")

    # ---- the grid: every prompt x every sample event at a glance
    w(render_grid(prompts, prompt_numbers, alerts_by_prompt, event_wide))

    # ---- charts
    w('<section id="charts"><h2>Curves</h2>')
    loss_series = [(name, _series(metrics, name)) for name in ("train/loss", "val/loss")]
    loss_series = [(n, p) for n, p in loss_series if p]
    markers = []
    seen_steps: dict[int, list[dict]] = {}
    for a in alerts:
        seen_steps.setdefault(a["step"], []).append(a)
    for step, group in seen_steps.items():
        tip = "\n".join(f"step {a['step']} {a.get('rule', '')}: {_preview(a.get('message', ''), 120)}" for a in group[:8])
        if len(group) > 8:
            tip += f"\n… {len(group) - 8} more"
        markers.append((step, tip, "#" + group[0]["anchor"]))
    if loss_series:
        w(f'<div class="chart-box" id="chart-loss">{svg_chart("chart-loss", "Loss (train / val)", loss_series, markers, "loss")}</div>')
    else:
        w('<p class="chart-empty" id="chart-loss-empty">No loss chart: no train/loss or val/loss in metrics.jsonl.</p>')
    names = sorted({k for m in metrics.values() for k in m if "/reward/" in k})
    if any("val/exact_match" in m for m in metrics.values()):
        names.append("val/exact_match")
    reward_series = [(n, p) for n, p in ((n, _series(metrics, n)) for n in names) if p]
    if reward_series:
        w(f'<div class="chart-box" id="chart-rewards">{svg_chart("chart-rewards", "Rewards and exact match", reward_series, (), "value")}</div>')
    else:
        w('<p class="chart-empty" id="chart-rewards-empty">No reward chart: no */reward/* or val/exact_match metric.</p>')
    w("</section>")

    # ---- alert list
    if alerts:
        open_attr = " open" if len(alerts) <= 50 else ""
        w(f'<details id="alerts-box"{open_attr}><summary>Alerts ({len(alerts)})</summary><ol id="alert-list">')
        for a in alerts:
            w(f'<li class="alert-item"><a class="alert-link" href="#{a["anchor"]}">{esc(_alert_label(a, prompt_numbers))}</a> — '
              f'{esc(_preview(a.get("message", ""), 200))}</li>')
        w("</ol></details>")
    else:
        w('<p id="no-alerts" class="meta">No alerts.</p>')

    # ---- controls
    w('<section id="controls">'
      '<input id="prompt-filter" type="search" placeholder="Filter prompts…" aria-label="Filter prompts">'
      '<button id="expand-all" type="button">Expand all</button>'
      '<button id="collapse-all" type="button">Collapse all</button>'
      '<label><input id="only-alerts" type="checkbox"> only prompts with alerts</label>'
      '<label><input id="show-diff" type="checkbox" checked> word diff</label>'
      f'<span id="visible-count">{len(prompts)} prompts</span></section>')

    # ---- timelines
    w(f'<section id="timelines"><h2>Prompts ({len(prompts)})</h2>')
    if event_wide:
        w(f'<details class="event-alerts" id="event-alerts"><summary><b>Event-wide alerts</b> '
          f'<span class="badge">{len(event_wide)}</span></summary><div class="timeline-body"><table class="events"><tbody>')
        for a in event_wide:
            w(_alert_row(a, colspan=1))
        w("</tbody></table></div></details>")
    if not prompts:
        w('<p class="meta" id="no-samples">No samples in samples.jsonl.</p>')
    for pid, rows in prompts.items():
        num = prompt_numbers[pid]
        p_alerts = alerts_by_prompt.get(pid, [])
        by_event: dict[tuple, list[dict]] = {}
        for a in p_alerts:
            by_event.setdefault((a["step"], str(a.get("stage", ""))), []).append(a)
        latest = rows[-1]
        prompt_text = str(latest.get("prompt", ""))
        reference = latest.get("reference")
        cls = "timeline has-alerts" if p_alerts else "timeline"
        w(f'<details class="{cls}" id="prompt-{num}" data-prompt-id="{esc(pid)}" data-alerts="{len(p_alerts)}" data-events="{len(rows)}">')
        badge = f'<span class="badge alert-badge" title="alerts for this prompt">{len(p_alerts)}</span>' if p_alerts else ""
        latest_bits = _latest_text(latest)
        w(f'<summary><span class="pnum">#{num}</span><span class="prompt-preview">{esc(_preview(prompt_text))}</span>'
          f'<span class="meta">{len(rows)} events{" · latest " + latest_bits if latest_bits else ""}</span>{badge}</summary>')
        w('<div class="timeline-body"><div class="prompt-full">'
          f'<span class="label">Prompt</span><pre class="prompt-text">{esc(prompt_text)}</pre>'
          f'<span class="label">Reference</span><pre class="reference-text">{esc(reference) if reference is not None else "–"}</pre>'
          f'<span class="label">Prompt id</span><code>{esc(pid)}</code></div>')
        w('<table class="events"><colgroup><col class="c-step"><col class="c-stage"><col class="c-gen"><col class="c-signals"><col class="c-rewards"></colgroup>'
          "<thead><tr><th>Step</th><th>Stage</th><th>Generation (changes since the previous event)</th><th>Signals</th><th>Rewards</th></tr></thead><tbody>")
        previous: dict[str, str] = {}  # prefix -> previous generation
        placed: set[tuple] = set()
        pending = sorted(by_event)  # alert events, to place alerts with no sample row at their step
        for k, s in enumerate(rows, start=1):
            key = (s["step"], str(s.get("stage", "")))
            while pending and pending[0][0] < s["step"]:
                orphan = pending.pop(0)
                if orphan not in placed:
                    for a in by_event[orphan]:
                        w(_alert_row(a))
                    placed.add(orphan)
            ev_alerts = by_event.get(key, [])
            has_alert = bool(ev_alerts) or bool(s.get("alerts"))
            prefix = str(s.get("prefix", ""))
            gen = str(s.get("generation", "") or "")
            diff = word_diff(previous.get(prefix), gen)
            previous[prefix] = gen
            settings = _settings_text(s.get("settings"))
            tokens = f"in {_num(s.get('prompt_tokens'))} · out {_num(s.get('generated_tokens'))} tok"
            w(f'<tr class="event{" has-alert" if has_alert else ""}" id="p{num}-e{k}" data-step="{s["step"]}">'
              f'<td class="step">{s["step"]}</td>'
              f'<td class="stage" title="{esc(settings)}">{esc(s.get("stage", ""))}<small>{esc(prefix)} #{esc(_num(s.get("index")))}'
              f'{" · " + esc(settings.split(" · ")[0]) if settings else ""}</small><small>{esc(tokens)}</small></td>'
              f'<td><div class="gen">{diff}</div></td>'
              f'<td class="signals">{_signals_html(s)}</td><td class="rewards">{_rewards_html(s.get("rewards"))}</td></tr>')
            if key not in placed:
                for a in ev_alerts:
                    w(_alert_row(a))
                placed.add(key)
        for key in pending:
            if key not in placed:
                for a in by_event[key]:
                    w(_alert_row(a))
        w("</tbody></table></div></details>")
    w("</section>")

    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Run report — {esc(run_name)}</title><style>{_asset('report.css')}</style>"
        f"<script>{_asset('errors.js')}</script></head>\n<body><main>"
        + "\n".join(parts)
        + '</main><div id="js-errors" hidden></div>'
        f"<script>{_asset('page.js')}{_asset('report.js')}</script></body></html>\n"
    )


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_report(run_dir: Path, out: Optional[Path] = None) -> Path:
    """Write the HTML report of `run_dir` to `out` (default `<run_dir>/report.html`); returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a directory")
    out = Path(out) if out is not None else run_dir / REPORT_FILE
    metrics = read_metrics(run_dir)
    metrics = {step: {k: v for k, v in m.items() if _finite(v)} for step, m in metrics.items()}
    samples, alerts = read_samples(run_dir)
    name = run_dir.resolve().name or str(run_dir)
    _atomic_write(out, render_report(name, metrics, samples, alerts, run_progress(run_dir, metrics, samples)))
    return out


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.report",
        description="Write the self-contained HTML report of a run directory, or with several run directories the page that compares them.")
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run directory with metrics.jsonl and/or samples.jsonl")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE",
                        help=f"where to write the page (default: RUN_DIR/{REPORT_FILE}, or {COMPARE_FILE} when comparing runs)")
    args = parser.parse_args(None if argv is None else list(argv))
    for run_dir in args.run_dirs:
        if not ((run_dir / METRICS_FILE).is_file() or (run_dir / SAMPLES_FILE).is_file()):
            print(f"error: {run_dir}: no {METRICS_FILE} or {SAMPLES_FILE} (not a run directory?)", file=sys.stderr)
            return 2
    try:
        if len(args.run_dirs) > 1:
            from trainer.report_compare import write_compare

            path = write_compare(args.run_dirs, args.out or Path(COMPARE_FILE))
        else:
            path = write_report(args.run_dirs[0], args.out)
    except OSError as exc:
        print(f"error: cannot write the page: {exc}", file=sys.stderr)
        return 2
    print(path)
    for run_dir in args.run_dirs:  # how far each run got (stderr: stdout is the page's path)
        samples, _ = read_samples(run_dir)
        print(f"{run_dir}: {run_progress(run_dir, read_metrics(run_dir), samples)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
