""".ci/run never lets the browser test skip: a failed Chromium install fails CI at once, and the
suite runs with CI=true (tests/e2e/test_report_browser.py then fails instead of skipping); a failed
step stops the script there."""

import os
import shutil
import subprocess

from helpers import ROOT


def test_a_failed_chromium_install_fails_ci_before_anything_runs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text("#!/bin/sh\necho 'E: Unable to locate package chromium' >&2\nexit 100\n")
    (bin_dir / "apt-get").chmod(0o755)
    for tool in ("dirname",):  # what the script needs before the install; no chromium, no python3
        os.symlink(shutil.which(tool), bin_dir / tool)
    proc = subprocess.run([shutil.which("bash"), str(ROOT / ".ci" / "run")], env={"PATH": str(bin_dir)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "ci: installing chromium failed: the browser test cannot run"


def test_the_suite_runs_with_ci_true():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    pytest_line = next(i for i, line in enumerate(lines) if "python -m pytest" in line)
    assert "export CI=true" in lines[:pytest_line]


def test_a_failed_install_stops_ci_there(tmp_path):
    # The CI run of 2026-12-07 ran out of disk in `pip install`; the script ran on to `mkdocs` and
    # ended "mkdocs: command not found" (127). Each step is its own command so `set -e` stops at the
    # first failure, with that step's own error last.
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ran = tmp_path / "ran.txt"
    fakes = {"chromium": "exit 0",  # present: no apt-get
             "python3": f"echo python3 \"$@\" >> {ran}",
             "pip": f"echo pip \"$@\" >> {ran}; echo 'ERROR: [Errno 28] No space left on device' >&2; exit 1",
             "python": f"echo python \"$@\" >> {ran}", "mkdocs": f"echo mkdocs >> {ran}"}
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    os.symlink(shutil.which("dirname"), bin_dir / "dirname")
    proc = subprocess.run([shutil.which("bash"), str(tmp_path / ".ci" / "run")], env={"PATH": str(bin_dir)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "ERROR: [Errno 28] No space left on device"
    assert ran.read_text().splitlines() == ["python3 -m venv .venv", "pip install -q torch==2.13.0"]
