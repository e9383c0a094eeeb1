"""The benchmarks keep working: their tiny/quick variants exit 0 and print complete tables.

Speeds are never asserted (they depend on the machine and on what else runs on it); only that
each row is there and its numbers parse. TRL is an optional peer: without it, its row must say so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_script(name: str, *args: str, timeout: int = 420) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_")}
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    return proc.stdout


def tables(text: str) -> dict[str, list[list[str]]]:
    """{section heading: rows of cells} for each markdown table under a `## ` heading."""
    found: dict[str, list[list[str]]] = {}
    heading = ""
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:]
            found[heading] = []
        elif line.startswith("|") and not set(line) <= set("|- "):
            found[heading].append([c.strip() for c in line.strip().strip("|").split("|")])
    return {h: rows[1:] for h, rows in found.items()}  # without the header row


def number(cell: str) -> float:
    return float(cell.replace("%", "").replace("x", "").replace(" s", "").strip())


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
    """The smollm2 task without its model directory, an unknown task or engine: exit 2, one line
    naming the flag (and, for the model, how to make it), no run started (no work directory)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_")}
    env.update({"PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)})
    cases = {("--models", "demo,smollm2", "--model-dir", str(tmp_path / "none")):
             ["--model-dir", str(tmp_path / "none"), "scripts/real_model_demo.py --model"],
             ("--models", "demo,gsm8k"): ["--models gsm8k", "smollm2"],
             ("--rollout", "hf,sglang"): ["--rollout sglang", "hf, vllm"]}
    for args, expected in cases.items():
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_rl.py"), *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (args, proc.stderr)
        assert all(text in lines[0] for text in expected), (args, lines[0])
    assert not list(tmp_path.glob("bench_rl_*"))  # refused before the work directory is made
