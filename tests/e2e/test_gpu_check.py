"""scripts/gpu_check.py on a machine without a GPU: --dry-run lists every path with its command,
without --dry-run it stops in one line, every command it would run is a valid config, and the
runner itself (commands, metrics, the table) works on CPU with --allow-cpu on a tiny model.
Nothing here runs a GPU path: the script has not been run on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module

from config.loading import resolve
from config.rl_schema import RLConfig
from config.schema import ConfigError, SFTConfig
from helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402

ALL_PATHS = ["sft-bf16", "bf16-masters", "cpu-offload", "activation-checkpointing", "padding-free-flash-attn", "liger", "lora",
             "sample-copy-gpu", "resume", "grpo-hf", "grpo-vllm", "sft-bf16-nccl-x2", "grpo-hf-nccl-x2"]


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_")}
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_lists_every_path_and_without_it_a_cpu_says_it_needs_a_gpu(tmp_path):
    proc = run("--dry-run", "--model", str(tmp_path / "no_model"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()[1:]
    assert [l.split(":")[0] for l in lines if not l.startswith("resume")] + ["resume"] == \
        [p for p in ALL_PATHS if p != "resume"] + ["resume"]
    said = {l.split(":")[0]: l for l in lines}
    assert "torch.distributed.run --standalone --nproc_per_node=1 -m trainer.fsdp_sft_trainer" in said["sft-bf16"]
    assert "model.fsdp_config.param_dtype=bf16" in said["sft-bf16"] and "trainer.device=cpu" not in said["sft-bf16"]
    assert "model.fsdp_config.cpu_offload=true" in said["cpu-offload"]
    assert "generation.gather_device=cuda" in said["sample-copy-gpu"]  # a dry run lists what a GPU would run
    assert sum(l.startswith("resume:") for l in lines) == 2  # save half way, then resume
    assert said["sft-bf16-nccl-x2"] == "sft-bf16-nccl-x2: skipped: needs 2 or more GPUs"
    assert not (tmp_path / "no_model").exists() and not (tmp_path / "out").exists()  # nothing made, nothing run

    proc = run()
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [gpu_check.NO_GPU]


def test_the_plan_on_a_two_gpu_machine_with_every_package():
    checks = {c.name: c for c in gpu_check.plan(2, have=lambda package: True)}
    assert list(checks) == ALL_PATHS
    assert all(c.skip is None for c in checks.values())
    assert checks["bf16-masters"].overrides == ("model.fsdp_config.model_dtype=bf16",)
    assert checks["sft-bf16-nccl-x2"].nproc == checks["grpo-hf-nccl-x2"].nproc == 2
    missing = {c.name: c.skip for c in gpu_check.plan(1, have=lambda package: False)}
    assert missing["padding-free-flash-attn"] == "flash-attn not installed (pip install flash-attn)"
    assert missing["liger"].startswith("liger-kernel not installed") and missing["grpo-vllm"].startswith("vllm not installed")


def test_every_command_it_would_run_is_a_valid_config(tiny_model, tmp_path):
    data = gpu_check.write_data(tmp_path / "data", train_rows=8, val_rows=4)
    checked = 0
    for check in gpu_check.plan(2, have=lambda package: True):
        for cmd in gpu_check.commands(check, tiny_model, data, tmp_path / check.name, steps=4):
            overrides = cmd[cmd.index(check.module) + 1:]
            name, schema = ("sft_trainer", SFTConfig) if check.module == gpu_check.SFT else ("grpo_trainer", RLConfig)
            with initialize_config_module(config_module="config", version_base="1.3"):
                cfg = compose(name, overrides=overrides)
            try:
                resolve(cfg, schema, overrides, {}, check.nproc)
            except ConfigError as err:  # flash-attention is checked against what is installed
                assert check.name == "padding-free-flash-attn" and "flash" in str(err), (check.name, str(err))
            checked += 1
    assert checked == 14  # the resume's two runs


@pytest.mark.distributed
def test_allow_cpu_runs_the_resume_path_and_prints_the_table(tiny_model, tmp_path):
    proc = run("--allow-cpu", "--model", str(tiny_model), "--out", str(tmp_path / "out"), "--only", "resume,liger",
               "--steps", "2", "--max-length", "48", timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.strip().strip("|").split("|")]
            for l in proc.stdout.splitlines() if l.startswith("| ") and not l.startswith("| path")}
    assert rows["resume"][1] == "pass", rows
    assert float(rows["resume"][3].replace(",", "")) > 0  # tokens/s from the run's metrics
    assert float(rows["resume"][2].replace(",", "")) > 0  # no nvidia-smi here: the trainer's own peak memory
    assert rows["liger"][1] == "skipped: needs a CUDA GPU"
    assert (tmp_path / "out" / "resume" / "global_step_1").is_dir() and (tmp_path / "out" / "resume" / "gpu_check.log").is_file()
