"""HTML reports of runs: one self-contained page per run, and a page that compares runs.

Reads run directories (`metrics.jsonl`, `samples.jsonl`, `run_state.json`) and writes ONE
self-contained HTML file that opens from disk with no server: inline CSS, inline SVG charts drawn
in Python, a little inline vanilla JS for the controls. Nothing is loaded from the network.

    python -m trainer.report RUN_DIR [--out FILE]                          the run page
    python -m trainer.report RUN_A RUN_B [RUN_C ...] --out compare.html   runs compared

During a run the page is rewritten at each sample event (`LiveReport`). From Python:
`write_report(run_dir, out=None) -> Path`, `write_compare(run_dirs, out) -> Path`.

The package, one concern per module; imports run down this list only (no circle):
  shared.py        reading a run directory (the steps a rollback discarded apart), how far it got,
                   formatting, word diff, page shell
  charts.py        the SVG line chart both pages draw
  grid.py          the run page's grid (prompts x sample events)
  rollbacks.py     what a run did about its alerts (rollbacks, a stop): reading, texts, chart marks, rows
  run_page.py      the run page, one function per section
  compare_page.py  the comparison page, one function per section
  live.py          `LiveReport`: the page kept current during a run, `run_state.json`
  __main__.py      the command line
  assets/          the CSS and JS inlined into the pages (package data)
"""

from trainer.report.compare_page import render_compare, write_compare
from trainer.report.live import LiveReport
from trainer.report.run_page import render_report, write_report
from trainer.report.shared import (
    COMPARE_FILE, REPORT_FILE, RUN_STATE_FILE, SAMPLES_FILE, read_metrics, read_run_state, read_samples, run_progress,
    word_diff, write_run_state,
)

__all__ = [
    "COMPARE_FILE", "REPORT_FILE", "RUN_STATE_FILE", "SAMPLES_FILE", "LiveReport", "read_metrics", "read_run_state",
    "read_samples", "render_compare", "render_report", "run_progress", "word_diff", "write_compare", "write_report",
    "write_run_state",
]
