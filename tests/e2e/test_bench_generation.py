"""scripts/bench_generation.py: its quick run exits 0 and prints complete tables.

Speeds are never asserted (they depend on the machine and on what else runs on it); only that
each row is there and its numbers parse.
"""

from __future__ import annotations

import json

from helpers import number, run_script, tables


def test_generation_benchmark_quick_prints_its_table(tmp_path):
    out = run_script("bench_generation.py", "--quick", "--out", str(tmp_path))
    rows = {r[0]: r for r in next(iter(tables(out).values()))}
    for name in ("time per validation, samples on", "time per validation, samples off", "val/generation_time_s, summed",
                 "8 prompts, one batched generate", "8 prompts, 8 single generate calls", "live report: val/report_time_s, summed"):
        assert number(rows[name][1]) > 0, rows[name]
    for name in ("generation share of run time", "sample cost share (gather + generate + log)", "batched speed-up",
                 "live report share of run time"):
        number(rows[name][1])  # a difference of noisy timings may come out negative in a short run
        assert rows[name][3] in ("yes", "NO"), rows[name]
    assert number(rows["validations per run"][1]) >= 1
    assert json.loads((tmp_path / "bench_generation.json").read_text())["batched_speedup"] > 0
    # The evaluating run is off in --quick (it would be a third demo run): its rows say so.
    assert rows["time per validation, evaluating"][1] == "n/a"
    assert rows["demo run wall time, evaluating (k=4 + greedy, metrics, lm-eval)"][1] == "n/a"
