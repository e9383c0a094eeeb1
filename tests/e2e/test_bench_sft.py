"""scripts/bench_sft.py: its tiny run exits 0 and prints complete tables.

Speeds are never asserted (they depend on the machine and on what else runs on it); only that
each row is there and its numbers parse. TRL is an optional peer: without it, its row must say so.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from helpers import number, run_script, tables


@pytest.mark.distributed
def test_sft_benchmark_tiny_prints_its_tables(tmp_path):
    out = run_script("bench_sft.py", "--size", "tiny", "--out", str(tmp_path))
    sections = tables(out)
    main = next(rows for h, rows in sections.items() if h.startswith("SFT throughput"))
    memory = next(rows for h, rows in sections.items() if h.startswith("Per-rank memory"))
    by_name = {r[0]: r for r in main}

    ours = [name for name in by_name if name.startswith("ours")]
    assert "ours 1 proc x 2 threads" in ours and "ours 2 proc x 1 thread (FSDP2, gloo)" in ours
    assert "ours 2 proc x 1 thread, LoRA r16 (FSDP2, gloo)" in ours
    measured = [*ours, "HF Trainer (pre-tokenised)"]
    trl_installed = importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None
    if trl_installed:
        measured.append("TRL SFTTrainer")
    else:
        assert "not installed" in by_name["TRL SFTTrainer"][-1]
    for name in measured:
        tokens, padding, s_step, peak, ratio, gflops, share = (number(c) if c != "n/a" else None for c in by_name[name][1:8])
        assert tokens > 0 and 0 <= padding < 100 and s_step > 0 and peak > 0 and gflops >= 0 and share >= 0, by_name[name]
        assert (ratio is not None) == trl_installed, by_name[name]

    assert sorted((r[0], r[1]) for r in memory) == [("1", "0"), ("2", "0"), ("2", "1")]
    for row in memory:
        assert number(row[2]) >= 0 and number(row[3]) > 0, row

    lora = {r[0]: r for r in next(rows for h, rows in sections.items() if h.startswith("LoRA against full fine-tuning"))}
    full, adapters = lora["ours 2 proc x 1 thread (FSDP2, gloo)"], lora["ours 2 proc x 1 thread, LoRA r16 (FSDP2, gloo)"]
    for row in (full, adapters):
        assert number(row[1]) > 0 and number(row[2]) > 0 and number(row[5]) > 0 and number(row[6]) > 0, row
    assert number(adapters[3].rstrip("M")) < number(full[3].rstrip("M"))  # trainable parameters
    assert number(adapters[4]) < number(full[4])  # weights + gradients + AdamW state per rank (estimate)

    saved = json.loads((tmp_path / "bench_sft.json").read_text())
    assert {r["name"] for r in saved["rows"]} == set(by_name)
    assert (tmp_path / "bench_sft.md").read_text().strip() == out.strip()
