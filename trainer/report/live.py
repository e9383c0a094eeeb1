"""The report kept current during a run: rewritten at each sample event, and handed again to the
trackers that can replace a file they hold (MLflow, W&B, SwanLab).

A run of three days should be readable after three hours, and a run that dies should leave a
report of what it did. `LiveReport.update` rewrites `<run_dir>/report.html` atomically (write a
temporary file, then rename: a reader never sees half a page) from the run's own files, and
returns the seconds it took (logged as `<prefix>/report_time_s`; `scripts/bench_generation.py`
measures its share of a run). `run_state.json` says whether the run is going (or died) or ended,
and how many steps it has, so `python -m trainer.report RUN_DIR` can say how far it got, and under
"stop" why the run stopped early (an alert's `stop` action, trainer/run_actions.py, or a metric
watch: early_stopping, stop_at), which the report marks on its timeline and curves.

Only the primary rank writes; a failure warns and training goes on.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional

from trainer.report.run_page import write_report
from trainer.report.shared import write_run_state
from trainer.tracking import Tracking

log = logging.getLogger(__name__)


class LiveReport:
    def __init__(self, run_dir: Path, total_steps: int, tracking: Tracking):
        self.run_dir, self.total_steps, self.tracking = Path(run_dir), int(total_steps), tracking
        self.failed = False
        self._state("running")

    def _state(self, status: str, stop: Optional[dict] = None) -> None:
        try:
            write_run_state(self.run_dir, {"status": status, "total_steps": self.total_steps, "pid": os.getpid(),
                                           "updated": time.time(), **({"stop": stop} if stop else {})})
        except OSError as err:
            log.warning("run_state.json not written: %s", err)

    def update(self) -> Optional[float]:
        """Rewrite the report and re-log it; seconds taken, or None when it failed (warned once)."""
        started = time.perf_counter()
        try:
            path = write_report(self.run_dir)
        except Exception as err:  # noqa: BLE001 - the report is optional; training goes on
            if not self.failed:
                log.warning("live report failed (training goes on): %s: %s", type(err).__name__, err)
            self.failed = True
            return None
        self.tracking.replace_artifact(path)
        return time.perf_counter() - started

    def finish(self, stop: Optional[dict] = None) -> None:
        """The run ended: mark it so, with the watch that ended it early if one did (`stop`:
        rule "early_stopping" or "stop_at", step, message, checkpoint: shown by the report like an
        alert's stop); the caller writes the final report."""
        self._state("finished", stop)
