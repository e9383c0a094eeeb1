"""scripts/bench_data.py: its quick run exits 0 and prints complete tables.

Speeds are never asserted (they depend on the machine and on what else runs on it); only that
each row is there and its numbers parse.
"""

from __future__ import annotations

import json

import pytest

from helpers import number, run_script, tables


@pytest.mark.distributed
def test_data_benchmark_quick_prints_its_table(tmp_path):
    out = run_script("bench_data.py", "--quick", "--out", str(tmp_path))
    rows = {r[0]: r for r in next(rows for h, rows in tables(out).items() if h.startswith("Data at scale"))}
    cached = rows["token cache"]
    assert cached[1] == "400"
    assert number(cached[2]) > 0 and number(cached[4]) > 0 and number(cached[5].replace(",", "")) > 0, cached  # first step, RSS, tokens/s
    assert number(cached[3]) > 0 and number(cached[6]) > 0, cached  # the second run started; the bad row was reported
    saved = json.loads((tmp_path / "bench_data.json").read_text())["runs"]
    kinds = {(r["code"], r["kind"]): r for r in saved}
    assert kinds[("token cache", "first")]["ok"] and kinds[("token cache", "second")]["ok"]
    assert not any(code == "before" for code, _ in kinds)  # quick: the code before is not run (it needs git history)
    assert not kinds[("token cache", "bad")]["ok"] and "row 5: " in kinds[("token cache", "bad")]["error"]
    assert (tmp_path / "bench_data.md").read_text() == out
