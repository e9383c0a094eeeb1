"""verl's own SFT example scripts, run as its users run them: the override list unchanged but for
the module path, the model and the data paths, plus what the scripts take in `$@` to keep the
run short; 2 gloo ranks."""

import math

import pytest

from helpers import gsm8k_rows, multiturn_rows, read_metrics, run_module, write_parquet
from verl_scripts import SFT_LORA, SFT_NEEDS_GPU, SFT_NOT_YET, SFT_SCRIPTS, SFT_SEQUENCE_PARALLEL, command_line

pytestmark = pytest.mark.distributed

# The LoRA-only script (gsm8k/run_qwen_05_peft.sh) trains in tests/distributed/test_lora.py.
PLAIN = sorted(set(SFT_SCRIPTS) - set(SFT_NOT_YET) - set(SFT_NEEDS_GPU) - set(SFT_SEQUENCE_PARALLEL) - set(SFT_LORA))


@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory):
    root = tmp_path_factory.mktemp("gsm8k")
    return {"train": write_parquet(gsm8k_rows(48, seed=5), root / "train.parquet"),
            "test": write_parquet(gsm8k_rows(8, seed=6), root / "test.parquet")}


@pytest.fixture(scope="module")
def multiturn(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiturn")
    return {"train": write_parquet(multiturn_rows(24, seed=7), root / "train.parquet"),
            "test": write_parquet(multiturn_rows(4, seed=8), root / "test.parquet")}


def test_which_scripts_run_where():
    assert sorted(set(SFT_LORA) - set(SFT_SEQUENCE_PARALLEL)) == ["gsm8k/run_qwen_05_peft.sh"]
    assert PLAIN == ["gsm8k/run_deepseek_6b7.sh", "gsm8k/run_gemma_2b.sh", "gsm8k/run_gemma_7b.sh"]
    assert SFT_SEQUENCE_PARALLEL == ["gsm8k/run_qwen3_8b_sft_peft_sp2_npu.sh", "gsm8k/run_qwen_05_sp2.sh",
                                     "gsm8k/run_seed_oss_36b_sft.sh", "multiturn/run_qwen_05_sp2.sh"]


@pytest.mark.parametrize("script", SFT_SEQUENCE_PARALLEL)
def test_verl_sequence_parallel_script_trains_with_two_processes(script, tiny_model, gsm8k, multiturn, tmp_path):
    run_dir = tmp_path / "run"
    paths = {"$HOME/data/gsm8k/train.parquet": str(gsm8k["train"]), "$HOME/data/gsm8k/test.parquet": str(gsm8k["test"]),
             "$HOME/data/multiturn/train.parquet": str(multiturn["train"]),
             "$HOME/data/multiturn/test.parquet": str(multiturn["test"]), "$save_path": str(run_dir),
             "Qwen/Qwen2.5-0.5B-Instruct": str(tiny_model), "ByteDance-Seed/Seed-OSS-36B-Base": str(tiny_model),
             "Qwen/Qwen3-8B": str(tiny_model)}
    # One step (most scripts set trainer.total_training_steps=1 themselves), a small batch and 2 samples.
    extra = ["data.train_batch_size=8", "trainer.total_training_steps=1", "trainer.max_val_samples=2",
             "generation.max_new_tokens=4"]
    if "data.micro_batch_size_per_gpu=64" in SFT_SCRIPTS[script]:  # the 8B NPU script's, for a batch of 8
        extra.append("data.micro_batch_size_per_gpu=4")
    proc = run_module("trainer.fsdp_sft_trainer", command_line(SFT_SCRIPTS[script], paths, extra), nproc=2)
    metrics = read_metrics(run_dir)
    assert metrics[1]["train/loss"] > 0 and metrics[1]["val/loss"] > 0
    assert "sequences split over 2 ranks (Ulysses), data-parallel 1" in proc.stderr + proc.stdout
    # sdpa on CPU has no varlen kernel: one line says what the run does instead of packing
    log = proc.stderr + proc.stdout
    assert log.count("this run uses length-grouped token-budget batches instead") == 1
    assert "=== Validation Samples (Step 1) ===" in proc.stdout
    # LoRA with sequence parallelism (the NPU script) exports the adapter
    exported = "adapter_model.safetensors" if script in SFT_LORA else "model.safetensors"
    assert (run_dir / "global_step_1").is_dir() and (run_dir / "hf_model" / exported).is_file()


@pytest.mark.parametrize("script", PLAIN)
def test_verl_sft_script_trains_with_two_processes(script, tiny_model, gsm8k, tmp_path):
    run_dir = tmp_path / "run"
    paths = {"$HOME/data/gsm8k/train.parquet": str(gsm8k["train"]), "$HOME/data/gsm8k/test.parquet": str(gsm8k["test"]),
             "$save_path": str(run_dir)}
    for hub_id in ("deepseek-ai/deepseek-coder-6.7b-instruct", "google/gemma-2b-it", "google/gemma-1.1-7b-it"):
        paths[hub_id] = str(tiny_model)
    # What a user passes in `$@` to try it small: 2 steps of 8 sequences, 2 samples.
    extra = ["data.train_batch_size=8", "trainer.total_training_steps=2", "trainer.max_val_samples=2",
             "generation.max_new_tokens=4"]
    proc = run_module("trainer.fsdp_sft_trainer", command_line(SFT_SCRIPTS[script], paths, extra), nproc=2,
                      env={"WANDB_MODE": "offline"})
    metrics = read_metrics(run_dir)
    assert {1, 2} <= set(metrics) and all("train/loss" in metrics[s] for s in (1, 2))
    assert "val/loss" in metrics[2]  # the early exit validates
    assert "=== Validation Samples (Step 2) ===" in proc.stdout
    assert (run_dir / "global_step_2").is_dir() and (run_dir / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert list((run_dir / "wandb").glob("offline-run-*")), "trainer.logger='[\"console\",\"wandb\"]' reached W&B"
    # verl's defaults, as verl would have trained: lr 1e-5, 10% warmup and a cosine over every epoch's
    # steps (6 a step of 8 of the 48 rows, times the script's trainer.total_epochs), not over the 2 run.
    epochs = int(next(a for a in command_line(SFT_SCRIPTS[script], paths) if a.startswith("trainer.total_epochs=")).split("=")[1])
    total = 6 * epochs
    for step in (1, 2):
        assert metrics[step]["train/lr"] == pytest.approx(verl_lr(step, total), rel=1e-6), (step, total)


def verl_lr(step: int, total: int, peak: float = 1e-5, warmup_ratio: float = 0.1) -> float:
    """verl's get_cosine_schedule_with_warmup after `step` steps (min_lr_ratio 0, one half-wave)."""
    warmup = int(total * warmup_ratio)
    if step < warmup:
        return peak * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))
