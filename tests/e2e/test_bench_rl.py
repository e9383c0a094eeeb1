"""scripts/bench_rl.py: its tiny run exits 0 and prints complete tables.

Speeds are never asserted (they depend on the machine and on what else runs on it); only that
each row is there and its numbers parse. TRL is not a test dependency: its rows say they were not run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import ROOT, number, run_script, tables


def test_rl_benchmark_tiny_prints_its_table(tmp_path):
    """Ours only (TRL is not a test dependency): the three models, every phase share of our step."""
    out = run_script("bench_rl.py", "--size", "tiny", "--out", str(tmp_path))
    rows = {(r[0], r[1]): r for r in next(rows for h, rows in tables(out).items() if h.startswith("RL throughput"))}
    assert set(rows) == {(m, t) for m in ("demo", "bpe", "long") for t in ("ours GRPO", "TRL GRPOTrainer")}
    for model in ("demo", "bpe", "long"):
        runs, s_step, tok_s, _, *shares, peak = rows[(model, "ours GRPO")][2:12]
        assert number(runs) == 1 and number(s_step) > 0 and number(tok_s) > 0 and number(peak) > 0, rows[(model, "ours GRPO")]
        rollout, log_probs, update, samples, other = (number(c) for c in shares)
        assert rollout > 0 and update > 0 and samples > 0, shares  # samples every 2 steps in tiny
        assert abs(rollout + log_probs + update + samples + other - 100) <= 3, shares
        assert "not run" in rows[(model, "TRL GRPOTrainer")][-1]
    saved = json.loads((tmp_path / "bench_rl.json").read_text())
    assert saved["summary"]["bpe"]["ours"]["tokens_per_s"] > 0
    assert (tmp_path / "bench_rl.md").read_text().strip() == out.strip()


def test_rl_benchmark_refuses_bad_input_in_one_line_before_any_model(tmp_path):
    """The smollm2 task without its model directory, an unknown task or engine, a group of one: exit 2, one line
    naming the flag (and, for the model, how to make it), no run started (no work directory)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_")}
    env.update({"PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)})
    cases = {("--models", "demo,smollm2", "--model-dir", str(tmp_path / "none")):
             ["--model-dir", str(tmp_path / "none"), "scripts/real_model_demo.py --model"],
             ("--models", "demo,gsm8k"): ["--models gsm8k", "smollm2"],
             ("--rollout", "hf,sglang"): ["--rollout sglang", "hf, vllm"],
             ("--models", "demo", "--group", "1"): ["--group 1", "at least 2"]}
    for args, expected in cases.items():
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_rl.py"), *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (args, proc.stderr)
        assert all(text in lines[0] for text in expected), (args, lines[0])
    assert not list(tmp_path.glob("bench_rl_*"))  # refused before the work directory is made
