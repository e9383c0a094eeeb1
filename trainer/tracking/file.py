"""File backend: `metrics.jsonl` and `config.json` in the run directory.

One JSON object per line, flushed per write; a resumed run appends, and readers keep the last
record of a step (steps after the resumed checkpoint are logged again).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from trainer.tracking.base import Tracker, TrackerContext, register_tracker

METRICS_FILE = "metrics.jsonl"


@register_tracker("file")
class FileTracker(Tracker):
    def __init__(self, ctx: TrackerContext):
        super().__init__(ctx)
        self._metrics = open(ctx.run_dir / METRICS_FILE, "a", encoding="utf-8")

    def log_config(self, config: dict) -> None:
        tmp = self.ctx.run_dir / "config.json.tmp"
        tmp.write_text(json.dumps(config, indent=2, default=str))
        tmp.replace(self.ctx.run_dir / "config.json")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    def close(self) -> None:
        self._metrics.close()


def read_records(path: Path) -> list[dict]:
    """Every complete record (a JSON object) of a JSON-lines file; a torn or corrupt line is
    skipped, never fatal."""
    records = []
    if not Path(path).exists():
        return records
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break  # torn last line from a crash
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def read_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """{step: merged metrics}; later records of the same step win."""
    merged: dict[int, dict[str, float]] = {}
    for record in read_records(Path(run_dir) / METRICS_FILE):
        step = int(record.pop("step"))
        record.pop("time", None)
        merged.setdefault(step, {}).update(record)
    return dict(sorted(merged.items()))
