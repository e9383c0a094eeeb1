"""The run page's grid: one row per prompt, one column per sample event, every event at a glance.

Each cell is coloured by what matters for its prompt (exact match where there is a reference,
else the reward, else how much the answer changed), or by a task metric picked in the grid's
selector (each cell carries its class for every choice), outlined when it has an alert, and links to
its row in the prompt's timeline (`#p<N>-e<K>`); the page's script shows that row's generation on
hover, so no text is stored twice. Alerts about a whole event get a row of their own on top.
Columns follow the history's order: the events of steps a rollback discarded come before the
rollback, greyed (attribute `data-disc`), and the same steps trained again get columns of their own.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from trainer.report.shared import esc, is_finite, preview

CHANGE_FULL_SCALE = 0.5  # 1 - similarity to the previous answer at which a change gets the darkest colour
GRID_LEGEND = (
    ("em1", "exact match"), ("em0", "no exact match"), ("r0", "low reward"), ("r4", "high reward"),
    ("c0", "same answer as before"), ("c4", "answer changed a lot"), ("new", "first answer"), ("al", "alert"),
)
EMPTY_CELL = '<span class="c"></span>'


def _event_key(sample: dict) -> tuple:
    """(segment, step, stage, prefix): the segment (rollbacks before it) keeps a discarded event
    and the same step trained again apart."""
    return sample.get("segment", 0), sample["step"], str(sample.get("stage", "")), str(sample.get("prefix", ""))


def _mean_reward(sample: dict) -> Optional[float]:
    rewards = sample.get("rewards") if isinstance(sample.get("rewards"), dict) else {}
    values = [float(v) for v in rewards.values() if is_finite(v)]
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
    if is_finite(em):
        return "em1" if em >= 1 else "em0"
    reward = _mean_reward(sample)
    if reward is not None:
        return f"r{_bucket(reward, *reward_range)}"
    sim = sig.get("similarity_to_previous")
    if is_finite(sim):
        return f"c{_bucket(1.0 - sim, 0.0, CHANGE_FULL_SCALE)}"
    return "new"


def _metric_names(prompts: dict[str, list[dict]]) -> list[str]:
    """Task metrics the samples carry, in the order they were configured (first seen)."""
    names: dict[str, None] = {}
    for rows in prompts.values():
        for s in rows:
            for name, value in (s.get("metrics") if isinstance(s.get("metrics"), dict) else {}).items():
                if is_finite(value):
                    names.setdefault(name, None)
    return list(names)


def _metric_classes(prompts: dict[str, list[dict]], names: list[str]) -> dict[str, tuple[bool, float, float]]:
    """Per metric: right/wrong (every value 0 or 1), and its range (for graded colours)."""
    out = {}
    for name in names:
        values = [float(s["metrics"][name]) for rows in prompts.values() for s in rows
                  if isinstance(s.get("metrics"), dict) and is_finite(s["metrics"].get(name))]
        out[name] = (all(v in (0.0, 1.0) for v in values), min(values), max(values))
    return out


def _metric_class(sample: dict, name: str, kind: tuple[bool, float, float]) -> str:
    metrics = sample.get("metrics") if isinstance(sample.get("metrics"), dict) else {}
    value = metrics.get(name)
    if not is_finite(value):
        return "new"
    binary, lo, hi = kind
    if binary:
        return "em1" if value >= 1 else "em0"
    return f"r{_bucket(float(value), lo, hi)}"


def _head_row(columns: list[tuple]) -> str:
    """Column heads: about ten step labels across."""
    every = max(1, math.ceil(len(columns) / 10))
    heads = "".join(f'<span class="gh" style="grid-column:{i + 2}">{columns[i][1]}</span>' for i in range(0, len(columns), every))
    return f'<div class="grid-row grid-head"><span class="gl">step</span>{heads}</div>'


def _event_wide_row(columns: list[tuple], event_wide: Sequence[dict]) -> str:
    """One cell per event with an alert about all prompts, linking to the first such alert."""
    cells = [EMPTY_CELL] * len(columns)
    for a in event_wide:
        for i, key in enumerate(columns):
            if key[:3] == (a.get("segment", 0), a["step"], str(a.get("stage", ""))) and cells[i].startswith("<span"):
                cells[i] = f'<a class="c al" href="#{a["anchor"]}"></a>'
    return f'<div class="grid-row grid-events"><span class="gl">⚠ all prompts</span>{"".join(cells)}</div>'


def _prompt_row(pid: str, rows: list[dict], num: int, alerts: list[dict], col_of: dict[tuple, int],
                reward_range: tuple[float, float], metric_kinds: Optional[dict] = None) -> str:
    alert_events = {(a.get("segment", 0), a["step"], str(a.get("stage", ""))) for a in alerts}
    cells = [EMPTY_CELL] * len(col_of)
    for k, s in enumerate(rows, start=1):
        cls = _cell_class(s, reward_range)
        # The class for each choice of the selector (auto first), which the page's script swaps in.
        choices = "" if not metric_kinds else ' data-cls="' + "|".join(
            [cls] + [_metric_class(s, name, kind) for name, kind in metric_kinds.items()]) + '"'
        if s.get("alerts") or _event_key(s)[:3] in alert_events:
            cls += " al"
        # a step a rollback discarded: an attribute, not a class, which the metric selector rewrites
        disc = ' data-disc="1"' if s.get("discarded") else ""
        cells[col_of[_event_key(s)]] = f'<a class="c {cls}"{choices}{disc} href="#p{num}-e{k}"></a>'
    label = preview(str(rows[-1].get("prompt", "")), 40)
    return (f'<div class="grid-row" data-prompt-id="{esc(pid)}"><a class="gl" href="#p{num}-e1" title="{esc(label)}">'
            f'#{num} {esc(label)}</a>{"".join(cells)}</div>')


def render_grid(prompts: dict[str, list[dict]], numbers: dict[str, int], alerts_by_prompt: dict[str, list[dict]],
                event_wide: Sequence[dict] = ()) -> str:
    """The grid section (one line of the page)."""
    events: dict[tuple, None] = {}
    for rows in prompts.values():
        for s in rows:
            events.setdefault(_event_key(s), None)
    columns = sorted(events, key=lambda k: k[:2])  # by segment and step; same-step events keep their file order
    if not columns:
        return '<section id="grid-section"><h2>At a glance</h2><p class="meta" id="grid-empty">No sample events yet.</p></section>'
    col_of = {k: i for i, k in enumerate(columns)}
    rewards = [r for rows in prompts.values() for s in rows if (r := _mean_reward(s)) is not None]
    reward_range = (min(rewards), max(rewards)) if rewards else (0.0, 1.0)
    names = _metric_names(prompts)
    metric_kinds = _metric_classes(prompts, names)
    selector = "" if not names else (
        '<label class="meta">colour by <select id="grid-metric"><option value="auto">exact match / reward / change</option>'
        + "".join(f'<option value="{esc(n)}">{esc(n)}</option>' for n in names) + "</select></label> ")
    out = [f'<section id="grid-section"><h2>At a glance: {len(prompts)} prompts × {len(columns)} sample events</h2>',
           '<p class="grid-legend meta">' + selector + "".join(f'<span class="c {c}"></span>{esc(t)} ' for c, t in GRID_LEGEND)
           + '· hover a cell for its generation, click it for its place in the timeline</p>',
           f'<div id="grid" style="--cols:{len(columns)}" data-rows="{len(prompts)}" data-cols="{len(columns)}">',
           _head_row(columns)]
    if event_wide:
        out.append(_event_wide_row(columns, event_wide))
    for pid, rows in prompts.items():
        out.append(_prompt_row(pid, rows, numbers[pid], alerts_by_prompt.get(pid, []), col_of, reward_range, metric_kinds))
    out.append('</div><div id="grid-tip" hidden></div></section>')
    return "".join(out)
