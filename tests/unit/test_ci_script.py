""".ci/run never lets the browser test skip: a failed Chromium install fails CI at once, and the
suite runs with CI=true (tests/e2e/test_report_browser.py then fails instead of skipping)."""

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
