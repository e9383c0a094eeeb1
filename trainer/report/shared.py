"""What the run page and the comparison page share: reading a run directory, how far the run got,
formatting, the word diff, the page shell and the atomic write.

Both pages (trainer/report/run_page.py, trainer/report/compare_page.py) import from here and never
from each other, so the package has no import circle. The charts they both draw are in
trainer/report/charts.py.
"""

from __future__ import annotations

import difflib
import html
import json
import math
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

from trainer.tracking.file import METRICS_FILE, read_metrics, read_records

SAMPLES_FILE = "samples.jsonl"
REPORT_FILE = "report.html"
COMPARE_FILE = "compare.html"
RUN_STATE_FILE = "run_state.json"
PREVIEW_CHARS = 110
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


# --------------------------------------------------------------------------------------------
# Formatting


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt_num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and math.isfinite(value):
        if float(value).is_integer() and abs(value) < 1e9:
            return str(int(value))
        return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    if value is None:
        return "–"
    return str(value)


def preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_series(metrics: dict[int, dict[str, float]], name: str) -> list[tuple[float, float]]:
    return [(step, float(m[name])) for step, m in metrics.items() if is_finite(m.get(name))]


# --------------------------------------------------------------------------------------------
# Reading a run directory


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def read_samples(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(samples, alerts) from `<run_dir>/samples.jsonl` (see `read_history`)."""
    history = read_history(run_dir)
    return history.samples, history.alerts


@dataclass
class History:
    """What `samples.jsonl` holds, arranged for the pages."""

    samples: list[dict]
    alerts: list[dict]
    rollbacks: list[dict]  # the "rollback" records in file order, each with its "number" (1, 2, ...)


def read_history(run_dir: Path) -> History:
    """Samples, alerts and rollbacks from `<run_dir>/samples.jsonl`.

    Broken lines (a torn last line after a crash) are skipped. After a resume the same
    (step, stage, prompt_id) sample, or the same (step, stage, prompt_id, rule) alert, can appear
    twice: the last one wins. Every record gets its "segment": how many rollbacks came before it
    in the file (which is in the order things happened), so the steps a rollback discarded
    (marked "discarded" by trainer/history.py) and the same steps trained again stay apart.
    Samples are sorted by segment, step then index, alerts by segment then step (stable).
    """
    path = Path(run_dir) / SAMPLES_FILE
    samples: dict[tuple, dict] = {}
    alerts: dict[tuple, dict] = {}
    rollbacks: list[dict] = []
    for record in read_records(path):
        if "step" not in record:
            continue
        try:
            record["step"] = int(record["step"])
        except (TypeError, ValueError):
            continue
        stage = str(record.get("stage", ""))
        kind = record.get("kind", "sample" if "generation" in record else None)
        segment = len(rollbacks)
        if kind == "sample":
            record["index"] = _int(record.get("index"), 0)
            pid = record.get("prompt_id") or f"#{record.get('prefix', '')}:{record['index']}"
            record["prompt_id"] = str(pid)
            record["segment"] = segment
            key = (segment, record["step"], stage, record["prompt_id"])
            samples.pop(key, None)  # keep the position of the last copy too
            samples[key] = record
        elif kind == "alert":
            pid = record.get("prompt_id")
            record["prompt_id"] = None if pid is None else str(pid)
            record["segment"] = segment
            key = (segment, record["step"], stage, record["prompt_id"], str(record.get("rule", "")))
            alerts.pop(key, None)
            alerts[key] = record
        elif kind == "rollback":
            record["to_step"] = _int(record.get("to_step"), record["step"])
            record["number"] = segment + 1
            rollbacks.append(record)
    sample_list = sorted(samples.values(), key=lambda r: (r["segment"], r["step"], r["index"]))
    alert_list = sorted(alerts.values(), key=lambda r: (r["segment"], r["step"]))
    return History(sample_list, alert_list, rollbacks)


def read_finite_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """`metrics.jsonl` by step, without the values a chart cannot draw (NaN, inf, non-numbers)."""
    return {step: {k: v for k, v in m.items() if is_finite(v)} for step, m in read_metrics(run_dir).items()}


ROLLBACK_METRIC_SUFFIX = "/rollback_to_step"  # the key trainer/run_actions.py logs at each rollback


@dataclass
class MetricBranches:
    """`metrics.jsonl` split at its rollbacks: the run's kept history, and per rollback the steps
    it discarded (the file keeps both: a rollback trains the same step numbers again)."""

    kept: dict[int, dict[str, float]]  # by step, finite values only, later records win
    discarded: list[dict[int, dict[str, float]]]  # per rollback (file order): its discarded steps
    markers: list[dict]  # per rollback: {"step", "to_step", "lr_scale"} from its logged record


def read_metric_branches(run_dir: Path) -> MetricBranches:
    """A rollback logs `<prefix>/rollback_to_step` at the alert step, after the discarded steps'
    records and before those of the steps trained again: a record written before a rollback's
    record, at a step after that rollback's `to_step`, was discarded. Without rollbacks `kept`
    is `read_finite_metrics`."""
    records = []
    for record in read_records(Path(run_dir) / METRICS_FILE):
        try:
            step = int(record.pop("step"))
        except (KeyError, TypeError, ValueError):
            continue
        record.pop("time", None)
        records.append((step, {k: v for k, v in record.items() if is_finite(v)}))
    markers = []
    for i, (step, values) in enumerate(records):
        back = [v for k, v in values.items() if k.endswith(ROLLBACK_METRIC_SUFFIX)]
        if back:
            markers.append({"index": i, "step": step, "to_step": int(back[0]), "lr_scale": values.get("train/lr_scale")})
    kept: dict[int, dict[str, float]] = {}
    discarded: list[dict[int, dict[str, float]]] = [{} for _ in markers]
    for i, (step, values) in enumerate(records):
        # the first later rollback that went back before this step discarded it
        owner = next((n for n, m in enumerate(markers) if m["index"] > i and step > m["to_step"]), None)
        target = kept if owner is None else discarded[owner]
        target.setdefault(step, {}).update(values)
    return MetricBranches(dict(sorted(kept.items())), [dict(sorted(d.items())) for d in discarded],
                          [{k: v for k, v in m.items() if k != "index"} for m in markers])


# --------------------------------------------------------------------------------------------
# How far the run got


def write_run_state(run_dir: Path, state: dict) -> None:
    """`run_state.json`: written by the run (status running / finished, total steps, pid, host)."""
    atomic_write(Path(run_dir) / RUN_STATE_FILE, json.dumps({**state, "host": socket.gethostname()}))


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


def _status(state: dict) -> str:
    if state.get("status") == "finished":
        return "finished"
    if state.get("status") == "stopped":  # by a sample alert whose action is stop (trainer/actions.py)
        return f"stopped: {state.get('reason', 'by a sample alert')}"
    if state.get("status") == "running":
        return f"stopped (process {state.get('pid')} is gone)" if _process_gone(state) else "running, or stopped without notice"
    return "status unknown (no run_state.json)"


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
    head = _status(state)
    return "; ".join(filter(None, [f"{head}: {reached}", event, age if head != "finished" else ""]))


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
# The page shell and writing it


def asset(name: str) -> str:
    """A file of trainer/report/assets (package data), inlined into the page."""
    return resources.files("trainer.report").joinpath("assets", name).read_text(encoding="utf-8")


def page_html(title: str, lines: Sequence[str], css: Sequence[str], js: Sequence[str]) -> str:
    """The self-contained page: `lines` (the body, one per line) with the CSS and JS assets inlined
    and the error catcher in <head> (the browser test reads `#js-errors`)."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{''.join(asset(name) for name in css)}</style>"
        f"<script>{asset('errors.js')}</script></head>\n<body><main>"
        + "\n".join(lines)
        + '</main><div id="js-errors" hidden></div>'
        f"<script>{''.join(asset(name) for name in js)}</script></body></html>\n"
    )


def atomic_write(path: Path, text: str) -> None:
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
