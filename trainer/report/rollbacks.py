"""What a run did about its alerts, as both pages show it: its rollbacks and its stop.

A rollback (trainer/run_actions.py) leaves a "rollback" record in `samples.jsonl`, the samples and
alerts of the steps it discarded marked "discarded", and in `metrics.jsonl` the discarded steps'
records followed by its `<prefix>/rollback_to_step` record (read apart by
`shared.read_metric_branches`). A stop (an alert's `stop` action, early stopping, `stop_at`) is
the "stop" object of `run_state.json`. Here: reading them together (`read_actions`), their one-line
texts, the chart marks (`chart_marks`: a rollback's lines and band, the stop's line, the discarded
points of each metric), and the HTML pieces the pages place: the run page's list and timeline rows,
the comparison page's list under a run's name. Pages of runs without either never call the HTML
pieces, so they stay as they were.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from trainer.report.charts import ChartActions, RollbackMark, StopMark
from trainer.report.shared import MetricBranches, esc, fmt_num, is_finite, metric_series, preview, read_run_state


@dataclass
class Actions:
    """A run's rollbacks and its stop."""

    rollbacks: list[dict]  # samples.jsonl's "rollback" records, in order, each with "number" (1, 2, ...)
    discarded: list[dict[int, dict[str, float]]]  # per rollback: the metrics of the steps it discarded
    stop: Optional[dict]  # run_state.json's "stop": {rule, step, message, prompt?, checkpoint?}

    def __bool__(self) -> bool:
        return bool(self.rollbacks or self.stop)


def read_actions(run_dir: Path, rollbacks: Sequence[dict], branches: MetricBranches) -> Actions:
    """The history's rollback records, each with the metrics it discarded (the n-th rollback
    logged in metrics.jsonl is the n-th record); a rollback only metrics.jsonl knows (no history
    file) from what it logged. The stop comes from run_state.json."""
    rollbacks = [dict(r) for r in rollbacks]
    for m in branches.markers[len(rollbacks):]:
        rollbacks.append({"kind": "rollback", "step": m["step"], "to_step": m["to_step"], "lr_scale": m["lr_scale"],
                          "number": len(rollbacks) + 1})
    discarded = branches.discarded[: len(rollbacks)] + [{}] * max(0, len(rollbacks) - len(branches.discarded))
    stop = read_run_state(run_dir).get("stop")
    valid = isinstance(stop, dict) and isinstance(stop.get("step"), int) and not isinstance(stop.get("step"), bool)
    return Actions(rollbacks, discarded, stop if valid else None)


# --------------------------------------------------------------------------------------------
# Texts


def rollback_text(rollback: dict) -> str:
    """"rolled back to step S: rule, learning rate xF, data of steps a-b skipped" (or reshuffled)."""
    parts = [str(rollback.get("rule") or "alert")]
    if is_finite(rollback.get("lr_scale")):
        parts.append(f"learning rate ×{fmt_num(rollback['lr_scale'], 4)}")
    skipped = rollback.get("skipped")
    if isinstance(skipped, list) and len(skipped) == 2:
        parts.append(f"data of steps {skipped[0]}–{skipped[1]} skipped")
    elif "skipped" in rollback:  # trainer/run_actions.py writes None when the data was reshuffled
        parts.append("data reshuffled")
    return f"rolled back to step {rollback['to_step']}: " + ", ".join(parts)


def stop_text(stop: dict) -> str:
    return f"stopped: {stop.get('rule') or 'alert'} at step {stop['step']}"


def _details(action: dict) -> str:
    """The prompt and message of a rollback or stop (plain text)."""
    prompt = action.get("prompt")
    bits = [f"prompt {preview(str(prompt), 80)!r}" if prompt else "", str(action.get("message") or "")]
    return " — ".join(b for b in bits if b)


def summary(actions: Actions) -> str:
    """"1 rollback · stopped: rule at step N" (the run page's header)."""
    n = len(actions.rollbacks)
    bits = [f"{n} rollback{'s' if n != 1 else ''}"] if n else []
    return " · ".join(bits + ([stop_text(actions.stop)] if actions.stop else []))


# --------------------------------------------------------------------------------------------
# On the charts


def chart_marks(actions: Optional[Actions], metrics: dict[int, dict[str, float]], label: str = "",
                href: Optional[str] = None, into: Optional[ChartActions] = None) -> ChartActions:
    """A run's rollbacks and stop as chart marks, added to `into` (a new one by default), and per
    metric the points each rollback discarded, branching off the last kept point at or before the
    step it went back to. `label`: the run's letter on the comparison page (also the prefix of its
    series' names there); `href`: where every mark links (default: its entry in the run page's list)."""
    into = into if into is not None else ChartActions([], [], {})
    if not actions:
        return into
    prefix = f"{label} " if label else ""
    for rollback, steps in zip(actions.rollbacks, actions.discarded):
        into.rollbacks.append(RollbackMark(rollback["step"], rollback["to_step"],
                                           f"{prefix}step {rollback['step']}: {rollback_text(rollback)}",
                                           href or f"#rollback-{rollback['number']}", label))
        for name in sorted({k for values in steps.values() for k in values}):
            points = [(step, float(values[name])) for step, values in steps.items() if name in values]
            before = [p for p in metric_series(metrics, name) if p[0] <= rollback["to_step"]]
            into.discarded.setdefault(prefix + name, []).append((before[-1] if before else None, points))
    if actions.stop:
        into.stops.append(StopMark(actions.stop["step"], prefix + stop_text(actions.stop), href or "#run-stop", label))
    return into


# --------------------------------------------------------------------------------------------
# The run page's pieces


def action_list(actions: Optional[Actions]) -> list[str]:
    """The run's rollbacks and its stop, each an anchor the chart marks and timeline rows link to."""
    if not actions:
        return []
    lines = ['<section id="actions"><h2>What the run did about its alerts</h2><ol id="action-list">']
    for r in actions.rollbacks:
        details = _details(r)
        lines.append(f'<li class="action rollback" id="rollback-{r["number"]}" data-step="{r["step"]}" data-to-step="{r["to_step"]}">'
                     f'<b>↺ step {r["step"]}: {esc(rollback_text(r))}</b>'
                     f'{" — " + esc(details) if details else ""} <span class="meta">(steps {r["to_step"] + 1}–{r["step"]} '
                     f'discarded: drawn grey and dashed on the curves, their samples kept and marked)</span></li>')
    if actions.stop:
        st, details = actions.stop, _details(actions.stop)
        checkpoint = f' <span class="meta">checkpoint {esc(st["checkpoint"])}</span>' if st.get("checkpoint") else ""
        lines.append(f'<li class="action stop" id="run-stop" data-step="{st["step"]}"><b>■ {esc(stop_text(st))}</b>'
                     f'{" — " + esc(details) if details else ""}{checkpoint}</li>')
    lines.append("</ol></section>")
    return lines


def discarded_label(sample: dict, rollbacks: Sequence[dict]) -> str:
    """The label of a sample a rollback discarded, linking to the rollback that did: the first one
    after it (in the history's order) that went back before its step."""
    rollback = next((r for r in rollbacks if r["number"] > sample.get("segment", 0) and r["to_step"] < sample["step"]), None)
    where = (f'<a href="#rollback-{rollback["number"]}">discarded by the rollback at step {rollback["step"]}</a>'
             if rollback else "discarded by a rollback")
    return f'<span class="disc-label">{where}</span>'


def rollback_row(rollback: dict) -> str:
    """A rollback's row in a prompt's timeline, between the discarded rows and the steps trained again."""
    return (f'<tr class="action-row rollback-row" data-step="{rollback["step"]}" data-to-step="{rollback["to_step"]}"><td colspan="5">'
            f'↺ <a href="#rollback-{rollback["number"]}">step {rollback["step"]}: {esc(rollback_text(rollback))}</a>'
            f' <span class="meta">the rows of steps {rollback["to_step"] + 1}–{rollback["step"]} above are discarded</span></td></tr>')


def stop_row(stop: dict) -> str:
    """The stop's row, last in a prompt's timeline."""
    return (f'<tr class="action-row stop-row" data-step="{stop["step"]}"><td colspan="5">■ <a href="#run-stop">{esc(stop_text(stop))}</a>'
            f'{" — " + esc(preview(str(stop.get("message", "")), 160)) if stop.get("message") else ""}</td></tr>')


# --------------------------------------------------------------------------------------------
# The comparison page's piece


def run_actions(label: str, actions: Optional[Actions], discarded_samples: int) -> str:
    """A run's rollbacks and stop, under its name (the chart marks of the run link here)."""
    if not actions and not discarded_samples:
        return ""
    items = [f'<li class="action rollback" data-step="{r["step"]}" data-to-step="{r["to_step"]}">↺ step {r["step"]}: '
             f'{esc(rollback_text(r))}</li>' for r in (actions.rollbacks if actions else [])]
    if actions and actions.stop:
        items.append(f'<li class="action stop" data-step="{actions.stop["step"]}">■ {esc(stop_text(actions.stop))}</li>')
    if discarded_samples:
        items.append(f'<li class="meta">{discarded_samples} samples of discarded steps left out of the comparison</li>')
    return f'<ul class="run-actions" id="actions-{esc(label)}">{"".join(items)}</ul>'
