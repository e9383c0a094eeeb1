"""The command line: one run's page, or with several run directories the page that compares them.

    python -m trainer.report RUN_DIR [--out FILE]
    python -m trainer.report RUN_A RUN_B [RUN_C ...] --out compare.html

prints the path of the page, and on stderr how far each run got. Exit code 2 with one
`error: ...` line when a RUN_DIR holds neither `metrics.jsonl` nor `samples.jsonl`, or when the
page cannot be written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable, Optional

from trainer.report.compare_page import write_compare
from trainer.report.run_page import write_report
from trainer.report.shared import COMPARE_FILE, REPORT_FILE, SAMPLES_FILE, read_samples, run_progress
from trainer.tracking.file import METRICS_FILE, read_metrics


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
