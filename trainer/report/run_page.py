"""The run page: one self-contained HTML file (default `<run_dir>/report.html`) from a run directory.

What the page shows, top to bottom (one function below per section):
  * a header (run name, steps, sample events, alerts with a link to the first one, progress);
  * the grid: one row per prompt, one column per sample event (trainer/report/grid.py);
  * the train/val loss chart (alert steps drawn as red vertical lines that link to the alert) and
    the reward chart (every metric containing "/reward/" plus "val/exact_match");
  * the list of alerts, each linking to its row;
  * when the run acted on its alerts, the list of its rollbacks and its stop: each is also a
    marker on every chart (the steps a rollback discarded drawn apart, dashed grey) and a row in
    every prompt's timeline, and the samples of discarded steps stay, greyed and labelled;
  * controls: filter prompts by text, expand / collapse all, only prompts with alerts, diff on/off;
  * one collapsed `<details class="timeline">` per prompt (in order of first appearance) with one
    row per event: the generation with the words changed since the previous event of the same
    prompt (and the same prefix, so greedy validations are not compared with sampled RL
    generations) marked `<ins>` / `<del>`, its signals and rewards, and its alerts in place.

All text from the run is escaped with `html.escape`; the page embeds no data in scripts.
The CSS and JS are files in trainer/report/assets/, inlined. The JS sets
`document.body.dataset.ready = "1"` once initialised; a handler installed in `<head>` writes any
uncaught error into `<div id="js-errors">` (the browser test checks both).
(Over 400 lines: one function per section of one page, read top to bottom like the page; the
grid and the rollbacks' pieces are modules of their own.)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from trainer.report.charts import svg_chart
from trainer.report.grid import render_grid
from trainer.report.rollbacks import (
    Actions, action_list, chart_marks, discarded_label, read_actions, rollback_row, stop_row, summary,
)
from trainer.report.shared import (
    REPORT_FILE, atomic_write, esc, fmt_num, is_finite, metric_series, page_html, preview, read_history, read_metric_branches,
    run_progress, word_diff,
)

MARKER_TIP_ALERTS = 8  # alerts listed in the tooltip of one step's marker
ALERT_LIST_OPEN = 50  # the alert list starts open up to this many alerts


# --------------------------------------------------------------------------------------------
# The run's samples and alerts, arranged for the page


@dataclass
class _RunView:
    alerts: list[dict]  # numbered in step order, each with its "anchor"
    prompts: dict[str, list[dict]]  # prompt id -> its samples, prompts in order of first appearance
    numbers: dict[str, int]  # prompt id -> its number on the page (#1, #2, ...)
    alerts_by_prompt: dict[str, list[dict]]
    event_wide: list[dict]  # alerts about a whole event (or a prompt with no sample)


def _prepare_alerts(samples: list[dict], alerts: list[dict]) -> list[dict]:
    """Alert records plus in-sample alert strings no record covers, numbered in step order."""
    by_event: dict[tuple, list[dict]] = {}
    for a in alerts:
        by_event.setdefault((a.get("segment", 0), a["step"], str(a.get("stage", "")), a.get("prompt_id")), []).append(a)
    extra = []
    for s in samples:
        tags = s.get("alerts")
        if not isinstance(tags, list):
            continue
        recs = by_event.get((s.get("segment", 0), s["step"], str(s.get("stage", "")), s["prompt_id"]), [])
        for tag in tags:
            tag = str(tag)
            if any(tag in (str(r.get("rule")), str(r.get("message"))) or (r.get("rule") and str(r["rule"]) in tag) for r in recs):
                continue
            extra.append({"kind": "alert", "step": s["step"], "stage": s.get("stage", ""), "rule": tag,
                          "prompt_id": s["prompt_id"], "message": tag, "synthetic": True, "segment": s.get("segment", 0),
                          **({"discarded": True} if s.get("discarded") else {})})
    merged = sorted([dict(a) for a in alerts] + extra, key=lambda a: (a.get("segment", 0), a["step"]))
    for n, a in enumerate(merged, start=1):
        a["anchor"] = f"alert-{n}"
    return merged


def _arrange(samples: list[dict], alerts: list[dict]) -> _RunView:
    alerts = _prepare_alerts(samples, alerts)
    prompts: dict[str, list[dict]] = {}
    for s in samples:
        prompts.setdefault(s["prompt_id"], []).append(s)
    alerts_by_prompt: dict[str, list[dict]] = {}
    event_wide: list[dict] = []
    for a in alerts:
        pid = a.get("prompt_id")
        if pid is not None and pid in prompts:
            alerts_by_prompt.setdefault(pid, []).append(a)
        else:
            event_wide.append(a)
    numbers = {pid: n for n, pid in enumerate(prompts, start=1)}
    return _RunView(alerts, prompts, numbers, alerts_by_prompt, event_wide)


# --------------------------------------------------------------------------------------------
# Small pieces of HTML


def _alert_label(alert: dict, prompt_numbers: dict[str, int]) -> str:
    pid = alert.get("prompt_id")
    where = "all prompts" if pid is None else (f"prompt #{prompt_numbers[pid]}" if pid in prompt_numbers else f"prompt {pid}")
    return f"step {alert['step']} · {alert.get('stage', '')} · {alert.get('rule', '')} · {where}"


def _alert_row(alert: dict, colspan: int = 5) -> str:
    synthetic = ' <span class="meta">(from the sample record)</span>' if alert.get("synthetic") else ""
    discarded = " discarded" if alert.get("discarded") else ""
    return (
        f'<tr class="alert-row rule-{esc(re.sub(r"[^A-Za-z0-9_-]", "_", str(alert.get("rule", ""))))}{discarded}" id="{alert["anchor"]}">'
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
        mode = f"T={fmt_num(settings.get('temperature'))} p={fmt_num(settings.get('top_p'))} k={fmt_num(settings.get('top_k'))}"
    return f"{mode} · max {fmt_num(settings.get('max_new_tokens'))} · seed {fmt_num(settings.get('seed'))}"


def _signals_html(sample: dict) -> str:
    sig = sample.get("signals") if isinstance(sample.get("signals"), dict) else {}
    parts = []
    length = sig.get("length_tokens", sample.get("generated_tokens"))
    parts.append(f"<span>len {esc(fmt_num(length))}</span>")
    hit = sig.get("hit_limit", None if "stopped_at_eos" not in sample else not sample.get("stopped_at_eos"))
    if hit:
        parts.append('<span class="warn">hit limit</span>')
    rep = sig.get("repetition")
    rep_cls = ' class="warn"' if is_finite(rep) and rep >= 0.5 else ""
    parts.append(f"<span{rep_cls}>rep {esc(fmt_num(rep, 2))}</span>")
    em = sig.get("exact_match")
    if is_finite(em):
        parts.append(f'<span class="{"em-ok" if em >= 1 else "warn"}">EM {esc(fmt_num(em))}</span>')
    else:
        parts.append("<span>EM –</span>")
    parts.append(f"<span>sim {esc(fmt_num(sig.get('similarity_to_previous'), 2))}</span>")
    metrics = sample.get("metrics") if isinstance(sample.get("metrics"), dict) else {}
    parts += [f'<span class="metric">{esc(k)} {esc(fmt_num(v, 2))}</span>' for k, v in metrics.items() if k != "exact_match"]
    if sample.get("greedy"):
        parts.append('<span class="tag">greedy</span>')
    elif sample.get("sample"):
        parts.append(f'<span class="tag">sample {int(sample["sample"]) + 1}</span>')
    tags = sample.get("alerts") or []
    if isinstance(tags, list) and tags:
        parts.append("<br>" + "".join(f'<span class="tag">{esc(t)}</span>' for t in tags))
    return "".join(parts)


def _rewards_html(rewards: Any) -> str:
    if not isinstance(rewards, dict) or not rewards:
        return '<span class="meta">–</span>'
    return "".join(f"<span>{esc(k)} {esc(fmt_num(v))}</span>" for k, v in rewards.items())


def _latest_text(sample: dict) -> str:
    sig = sample.get("signals") if isinstance(sample.get("signals"), dict) else {}
    bits = []
    em = sig.get("exact_match")
    if is_finite(em):
        bits.append(f"EM {fmt_num(em)}")
    rewards = sample.get("rewards") if isinstance(sample.get("rewards"), dict) else {}
    bits += [f"{k} {fmt_num(v)}" for k, v in rewards.items()]
    return " · ".join(esc(b) for b in bits)


# --------------------------------------------------------------------------------------------
# The sections of the page, top to bottom; each returns its lines


def _header(run_name: str, metrics: dict[int, dict[str, float]], samples: list[dict], view: _RunView, progress: str,
            actions: Optional[Actions] = None) -> list[str]:
    events = {(s["step"], str(s.get("stage", "")), str(s.get("prefix", ""))) for s in samples}
    steps = sorted(set(metrics) | {s["step"] for s in samples})
    last = f" (last {steps[-1]})" if steps else ""
    first = f' — <a id="first-alert-link" class="alert-link" href="#{view.alerts[0]["anchor"]}">jump to first alert</a>' if view.alerts else ""
    lines = [
        '<header id="header">',
        f'<h1>Run report: <span id="run-name">{esc(run_name)}</span></h1><ul class="stats">',
        f'<li id="stat-steps" data-value="{len(steps)}"><b>{len(steps)}</b> steps{last}</li>',
        f'<li id="stat-events" data-value="{len(events)}"><b>{len(events)}</b> sample events · {len(view.prompts)} prompts</li>',
        f'<li id="stat-alerts" data-value="{len(view.alerts)}"><b>{len(view.alerts)}</b> alerts{first}</li>',
    ]
    if actions:
        lines.append(f'<li id="stat-actions" data-rollbacks="{len(actions.rollbacks)}"><a href="#actions">{esc(summary(actions))}</a></li>')
    if progress:
        lines.append(f'<li id="stat-progress">{esc(progress)}</li>')
    lines.append("</ul></header>")
    return lines


def _alert_markers(alerts: list[dict]) -> list[tuple[int, str, str]]:
    """One marker per step with alerts: (step, tooltip listing them, link to the first)."""
    by_step: dict[int, list[dict]] = {}
    for a in alerts:
        by_step.setdefault(a["step"], []).append(a)
    markers = []
    for step, group in by_step.items():
        tip = "\n".join(f"step {a['step']} {a.get('rule', '')}: {preview(a.get('message', ''), 120)}" for a in group[:MARKER_TIP_ALERTS])
        if len(group) > MARKER_TIP_ALERTS:
            tip += f"\n… {len(group) - MARKER_TIP_ALERTS} more"
        markers.append((step, tip, "#" + group[0]["anchor"]))
    return markers


def _charts(metrics: dict[int, dict[str, float]], alerts: list[dict], actions: Optional[Actions] = None) -> list[str]:
    marks = chart_marks(actions, metrics) if actions else None  # rollbacks and the stop, on every chart
    lines = ['<section id="charts"><h2>Curves</h2>']
    loss_series = [(name, metric_series(metrics, name)) for name in ("train/loss", "val/loss")]
    loss_series = [(n, p) for n, p in loss_series if p]
    if loss_series:
        chart = svg_chart("chart-loss", "Loss (train / val)", loss_series, _alert_markers(alerts), "loss", marks)
        lines.append(f'<div class="chart-box" id="chart-loss">{chart}</div>')
    else:
        lines.append('<p class="chart-empty" id="chart-loss-empty">No loss chart: no train/loss or val/loss in metrics.jsonl.</p>')
    names = sorted({k for m in metrics.values() for k in m if "/reward/" in k})
    if any("val/exact_match" in m for m in metrics.values()):
        names.append("val/exact_match")
    reward_series = [(n, p) for n, p in ((n, metric_series(metrics, n)) for n in names) if p]
    if reward_series:
        chart = svg_chart("chart-rewards", "Rewards and exact match", reward_series, (), "value", marks)
        lines.append(f'<div class="chart-box" id="chart-rewards">{chart}</div>')
    else:
        lines.append('<p class="chart-empty" id="chart-rewards-empty">No reward chart: no */reward/* or val/exact_match metric.</p>')
    # Task metrics (means, mean@k, pass@k, greedy; per-tag means) and lm-eval results, when the run has them.
    for chart_id, title, keep in (
        ("chart-metrics", "Task metrics", lambda k: "/metric/" in k and "/tag/" not in k),
        ("chart-tags", "Task metrics per prompt tag", lambda k: "/tag/" in k),
        ("chart-eval", "lm-eval", lambda k: k.startswith("eval/") and k != "eval/time_s"),
    ):
        series = [(n, p) for n in sorted({k for m in metrics.values() for k in m if keep(k)}) if (p := metric_series(metrics, n))]
        if series:
            lines.append(f'<div class="chart-box" id="{chart_id}">{svg_chart(chart_id, title, series, (), "value", marks)}</div>')
    lines.append("</section>")
    return lines


def _alert_list(view: _RunView) -> list[str]:
    if not view.alerts:
        return ['<p id="no-alerts" class="meta">No alerts.</p>']
    open_attr = " open" if len(view.alerts) <= ALERT_LIST_OPEN else ""
    lines = [f'<details id="alerts-box"{open_attr}><summary>Alerts ({len(view.alerts)})</summary><ol id="alert-list">']
    for a in view.alerts:
        lines.append(f'<li class="alert-item"><a class="alert-link" href="#{a["anchor"]}">{esc(_alert_label(a, view.numbers))}</a> — '
                     f'{esc(preview(a.get("message", ""), 200))}</li>')
    lines.append("</ol></details>")
    return lines


def _controls(prompt_count: int) -> str:
    return ('<section id="controls">'
            '<input id="prompt-filter" type="search" placeholder="Filter prompts…" aria-label="Filter prompts">'
            '<button id="expand-all" type="button">Expand all</button>'
            '<button id="collapse-all" type="button">Collapse all</button>'
            '<label><input id="only-alerts" type="checkbox"> only prompts with alerts</label>'
            '<label><input id="show-diff" type="checkbox" checked> word diff</label>'
            f'<span id="visible-count">{prompt_count} prompts</span></section>')


def _event_row(sample: dict, num: int, k: int, diff: str, has_alert: bool, label: str = "") -> str:
    """Row `k` of prompt `num`'s timeline: step, stage and settings, the diffed generation, signals, rewards.
    A sample of a step a rollback discarded is greyed, with a label linking to that rollback."""
    prefix = str(sample.get("prefix", ""))
    settings = _settings_text(sample.get("settings"))
    tokens = f"in {fmt_num(sample.get('prompt_tokens'))} · out {fmt_num(sample.get('generated_tokens'))} tok"
    discarded = " discarded" if sample.get("discarded") else ""
    return (f'<tr class="event{" has-alert" if has_alert else ""}{discarded}" id="p{num}-e{k}" data-step="{sample["step"]}">'
            f'<td class="step">{sample["step"]}</td>'
            f'<td class="stage" title="{esc(settings)}">{esc(sample.get("stage", ""))}<small>{esc(prefix)} #{esc(fmt_num(sample.get("index")))}'
            f'{" · " + esc(settings.split(" · ")[0]) if settings else ""}</small><small>{esc(tokens)}</small></td>'
            f'<td><div class="gen">{diff}</div></td>'
            f'<td class="signals">{label}{_signals_html(sample)}</td><td class="rewards">{_rewards_html(sample.get("rewards"))}</td></tr>')


def _timeline_rows(rows: list[dict], num: int, alerts: list[dict], actions: Optional[Actions] = None) -> list[str]:
    """One row per event, each diffed against the prompt's previous event of the same prefix (a
    row after a rollback against the last row the rollback kept); each event's alerts right after
    its row. An alert whose event has no row for this prompt goes before the first later row, or
    at the end. Each rollback's row comes before the first row of the steps trained again; the
    stop's row last. Rows are in the history's order: (segment, step)."""
    by_event: dict[tuple, list[dict]] = {}
    for a in alerts:
        by_event.setdefault((a.get("segment", 0), a["step"], str(a.get("stage", ""))), []).append(a)
    rollbacks = list(actions.rollbacks) if actions else []
    lines: list[str] = []
    previous: dict[str, str] = {}  # prefix -> previous generation (of any row)
    previous_kept: dict[str, str] = {}  # prefix -> previous generation of a row no rollback discarded
    placed: set[tuple] = set()
    pending = sorted(by_event)  # alert events, to place alerts with no sample row at their step
    next_rollback = 0

    def place_before(position: tuple) -> None:
        """Orphan alerts and rollbacks that come before `position` (segment, step), in order."""
        nonlocal next_rollback
        while True:
            orphan = pending[0][:2] if pending and pending[0][:2] < position else None
            rollback = (rollbacks[next_rollback]["number"], -math.inf) if next_rollback < len(rollbacks) else None
            rollback = rollback if rollback is not None and rollback < position else None
            if orphan is None and rollback is None:
                return
            if rollback is not None and (orphan is None or rollback < orphan):
                lines.append(rollback_row(rollbacks[next_rollback]))
                next_rollback += 1
                continue
            key = pending.pop(0)
            if key not in placed:
                lines.extend(_alert_row(a) for a in by_event[key])
                placed.add(key)

    for k, s in enumerate(rows, start=1):
        key = (s.get("segment", 0), s["step"], str(s.get("stage", "")))
        place_before(key[:2])
        ev_alerts = by_event.get(key, [])
        prefix = str(s.get("prefix", ""))
        gen = str(s.get("generation", "") or "")
        discarded = bool(s.get("discarded"))
        base = previous.get(prefix) if discarded else previous_kept.get(prefix)
        lines.append(_event_row(s, num, k, word_diff(base, gen), bool(ev_alerts) or bool(s.get("alerts")),
                                discarded_label(s, rollbacks) if discarded else ""))
        previous[prefix] = gen
        if not discarded:
            previous_kept[prefix] = gen
        if key not in placed:
            lines += [_alert_row(a) for a in ev_alerts]
            placed.add(key)
    place_before((math.inf, math.inf))
    if actions and actions.stop:
        lines.append(stop_row(actions.stop))
    return lines


def _timeline(pid: str, rows: list[dict], num: int, alerts: list[dict], actions: Optional[Actions] = None) -> list[str]:
    """One prompt's collapsed section: summary, the prompt and its reference in full, the event table."""
    kept = [r for r in rows if not r.get("discarded")]
    latest = (kept or rows)[-1]
    discarded = len(rows) - len(kept)
    prompt_text = str(latest.get("prompt", ""))
    reference = latest.get("reference")
    cls = "timeline has-alerts" if alerts else "timeline"
    badge = f'<span class="badge alert-badge" title="alerts for this prompt">{len(alerts)}</span>' if alerts else ""
    latest_bits = _latest_text(latest)
    lines = [
        f'<details class="{cls}" id="prompt-{num}" data-prompt-id="{esc(pid)}" data-alerts="{len(alerts)}" data-events="{len(rows)}">',
        f'<summary><span class="pnum">#{num}</span><span class="prompt-preview">{esc(preview(prompt_text))}</span>'
        f'<span class="meta">{len(rows)} events{f" ({discarded} discarded)" if discarded else ""}'
        f'{" · latest " + latest_bits if latest_bits else ""}</span>{badge}</summary>',
        '<div class="timeline-body"><div class="prompt-full">'
        f'<span class="label">Prompt</span><pre class="prompt-text">{esc(prompt_text)}</pre>'
        f'<span class="label">Reference</span><pre class="reference-text">{esc(reference) if reference is not None else "–"}</pre>'
        f'<span class="label">Prompt id</span><code>{esc(pid)}</code></div>',
        '<table class="events"><colgroup><col class="c-step"><col class="c-stage"><col class="c-gen"><col class="c-signals"><col class="c-rewards"></colgroup>'
        "<thead><tr><th>Step</th><th>Stage</th><th>Generation (changes since the previous event)</th><th>Signals</th><th>Rewards</th></tr></thead><tbody>",
    ]
    lines += _timeline_rows(rows, num, alerts, actions)
    lines.append("</tbody></table></div></details>")
    return lines


def _timelines(view: _RunView, actions: Optional[Actions] = None) -> list[str]:
    lines = [f'<section id="timelines"><h2>Prompts ({len(view.prompts)})</h2>']
    if view.event_wide:
        lines.append(f'<details class="event-alerts" id="event-alerts"><summary><b>Event-wide alerts</b> '
                     f'<span class="badge">{len(view.event_wide)}</span></summary><div class="timeline-body"><table class="events"><tbody>')
        lines += [_alert_row(a, colspan=1) for a in view.event_wide]
        lines.append("</tbody></table></div></details>")
    if not view.prompts:
        lines.append('<p class="meta" id="no-samples">No samples in samples.jsonl.</p>')
    for pid, rows in view.prompts.items():
        lines += _timeline(pid, rows, view.numbers[pid], view.alerts_by_prompt.get(pid, []), actions)
    lines.append("</section>")
    return lines


# --------------------------------------------------------------------------------------------
# The page


def render_report(run_name: str, metrics: dict[int, dict[str, float]], samples: list[dict], alerts: list[dict],
                  progress: str = "", actions: Optional[Actions] = None) -> str:
    """The whole page as a string (pure: no file access). `progress`: how far the run got;
    `actions`: its rollbacks and stop (`metrics` then holds the kept steps only)."""
    view = _arrange(samples, alerts)
    lines = _header(run_name, metrics, samples, view, progress, actions)
    lines.append(render_grid(view.prompts, view.numbers, view.alerts_by_prompt, view.event_wide))
    lines += _charts(metrics, view.alerts, actions)
    lines += _alert_list(view)
    lines += action_list(actions)
    lines.append(_controls(len(view.prompts)))
    lines += _timelines(view, actions)
    # the actions' styles only on the pages that show some, so other pages stay as they were
    css = ("report.css", "actions.css") if actions or any(s.get("discarded") for s in samples) else ("report.css",)
    return page_html(f"Run report — {run_name}", lines, css=css, js=("page.js", "report.js"))


def write_report(run_dir: Path, out: Optional[Path] = None) -> Path:
    """Write the HTML report of `run_dir` to `out` (default `<run_dir>/report.html`); returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a directory")
    out = Path(out) if out is not None else run_dir / REPORT_FILE
    branches = read_metric_branches(run_dir)
    history = read_history(run_dir)
    actions = read_actions(run_dir, history.rollbacks, branches)
    name = run_dir.resolve().name or str(run_dir)
    page = render_report(name, branches.kept, history.samples, history.alerts,
                         run_progress(run_dir, branches.kept, history.samples), actions)
    atomic_write(out, page)
    return out
