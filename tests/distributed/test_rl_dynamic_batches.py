"""Token-budget micro-batches in RL over 2 gloo ranks: ranks whose own counts differ run the same
number of forwards (all-reduce MAX) and the update ends, equal to the one with fixed micro-batches;
verl's GRPO script with use_dynamic_bsz trains."""

import json
import math

import pytest

from helpers import ROOT, read_metrics, run_module
from verl_scripts import GRPO_SCRIPTS, command_line, without

pytestmark = pytest.mark.distributed


def test_ranks_of_different_lengths_run_as_many_micro_batches_and_update_alike(tiny_model, tmp_path):
    out = tmp_path / "report.json"
    run_module("dynbsz_worker", [str(tiny_model), str(out)], nproc=2, cwd=tmp_path, timeout=180,
               env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}:{ROOT / 'tests' / 'distributed'}"})
    long, short = json.loads(out.read_text())
    assert long["own_count"] > short["own_count"]  # alone, rank 1 would stop early and FSDP would hang
    assert long["common_count"] == short["common_count"] == long["own_count"]
    for rank in (long, short):
        assert rank["max_log_prob_diff"] <= 1e-5, rank
        assert rank["max_delta"] > 0 and rank["max_delta_diff"] <= 1e-5 * max(1.0, rank["max_delta"]), rank
        assert rank["pg_loss_budget"] == pytest.approx(rank["pg_loss_fixed"], rel=1e-5, abs=1e-7)


def test_verl_seq_balance_script_trains_with_two_processes(tiny_model, rl_data, tmp_path):
    """verl's GRPO script with use_dynamic_bsz, scaled down in `$@`: a budget that holds a few rows
    per forward, for the update, the rollout's log-probs (2 mini-batches) and the reference's."""
    run_dir = tmp_path / "run"
    paths = {"$HOME/data/gsm8k/train.parquet": str(rl_data["train"]), "$HOME/data/gsm8k/test.parquet": str(rl_data["val"]),
             "Qwen/Qwen2-7B-Instruct": str(tiny_model)}
    args = command_line(GRPO_SCRIPTS["run_qwen2-7b_seq_balance.sh"], paths, [
        "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=2", "data.max_prompt_length=32",
        "data.max_response_length=4", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=48", "trainer.total_training_steps=2",
        "trainer.n_gpus_per_node=2", f"trainer.default_local_dir={run_dir}", "trainer.logger=[console,file]"])
    # What the one-line error asks: drop the SGLang engine, its tensor parallel and multi-turn format.
    args = without(args, "actor_rollout_ref.rollout.name", "actor_rollout_ref.rollout.tensor_model_parallel_size",
                   "actor_rollout_ref.rollout.multi_turn.format")
    proc = run_module("trainer.rl_trainer", ["--config-name", "grpo_trainer", *args], nproc=2, timeout=240)
    log = proc.stdout + proc.stderr
    assert ("token-budget micro-batches (tokens per forward on one rank, padding included): "
            "actor 48, old_log_prob 48, ref_log_prob 48") in log
    metrics = read_metrics(run_dir)
    for step in (1, 2):
        assert all(math.isfinite(metrics[step][k]) for k in ("actor/pg_loss", "actor/kl_loss", "actor/grad_norm")), metrics[step]
