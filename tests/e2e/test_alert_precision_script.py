"""scripts/alert_precision.py --quick end to end: the regression demo, short, and its table."""

import subprocess
import sys

from helpers import ROOT


def test_quick_mode_runs_the_demo_and_prints_the_table(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "alert_precision.py"), "--quick", "--seeds", "1",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = [line for line in proc.stdout.splitlines() if line.startswith("| 1 |")]
    assert len(row) == 1 and row[0].split("|")[2].strip() == "2", proc.stdout[-2000:]  # validations at steps 3 and 6
    assert "false alarms:" in proc.stdout
