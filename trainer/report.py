"""HTML report of a run (work in progress)."""

from pathlib import Path


def write_report(run_dir: Path) -> Path:
    raise NotImplementedError("report")
