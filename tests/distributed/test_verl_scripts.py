"""verl's own SFT example scripts, run as its users run them: the override list unchanged but for
the module path, the model and the data paths, plus what the scripts take in `$@` to keep the
run short; torchrun with 2 processes."""

import math

import pytest

from helpers import gsm8k_rows, read_metrics, run_module, write_parquet
from verl_scripts import SFT_LORA, SFT_NOT_YET, SFT_SCRIPTS, command_line

pytestmark = pytest.mark.distributed

# The LoRA script (gsm8k/run_qwen_05_peft.sh) trains in tests/distributed/test_lora.py.
PLAIN = sorted(set(SFT_SCRIPTS) - set(SFT_NOT_YET) - set(SFT_LORA))


@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory):
    root = tmp_path_factory.mktemp("gsm8k")
    return {"train": write_parquet(gsm8k_rows(48, seed=5), root / "train.parquet"),
            "test": write_parquet(gsm8k_rows(8, seed=6), root / "test.parquet")}


def test_there_are_three_plain_scripts():
    assert sorted(set(SFT_LORA) - set(SFT_NOT_YET)) == ["gsm8k/run_qwen_05_peft.sh"]
    assert PLAIN == ["gsm8k/run_deepseek_6b7.sh", "gsm8k/run_gemma_2b.sh", "gsm8k/run_gemma_7b.sh"]


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
