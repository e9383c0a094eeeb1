"""The RL trainers on 2 gloo ranks: GRPO and PPO on a tiny model, samples with
rewards during and after training, trackers, and exact resume."""

import json
import math
import re

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForCausalLM

from helpers import read_metrics, run_module

pytestmark = pytest.mark.distributed
MODULE = "trainer.rl_trainer"


def rl_args(model, data, run_dir, *extra):
    return [
        f"model.partial_pretrain={model}", f"data.train_files={data['train']}", f"data.val_files={data['val']}",
        f"trainer.default_local_dir={run_dir}", "trainer.log_freq=1", "rollout.max_new_tokens=4", "data.prompts_per_step=4",
        "actor.micro_batch_size_per_gpu=4", "trainer.total_training_steps=6", "trainer.test_freq=3", "optim.lr=1e-3",
        # Random tiny models rarely write digits: a length reward gives GRPO groups some spread.
        "reward.functions=[{name: exact, fn: arithmetic_exact_match},{name: short, fn: length_penalty, kwargs: {max_chars: 2}}]",
        "logging.sample_logging.enabled=true", "logging.sample_logging.interval_steps=2",
        "logging.sample_logging.percent_of_max_steps=0.5", "logging.sample_logging.max_new_tokens=4",
        'logging.sample_logging.prompts=["1+1=","22+33="]', "trainer.logger=[console,file,tensorboard]", *extra,
    ]


SAMPLE_BLOCK = re.compile(r"={80}\nQualitative samples \((.+?)\) - prompts: 2\n((?:\[Sample \d/2\] .*\n)+)={80}")


def check_run(proc, run_dir, first_actor_step=1):
    stages = [m.group(1) for m in SAMPLE_BLOCK.finditer(proc.stdout)]
    assert stages == ["step_2", "50%", "step_4", "post-train"], stages  # interval, percentage, interval, after training
    body = SAMPLE_BLOCK.search(proc.stdout).group(2)
    assert "[Sample 1/2] Prompt: 1+1=" in body and "[Sample 2/2] Prompt: 22+33=" in body
    assert re.search(r"\[Sample 1/2\] Rewards: \{'exact': [01]\.0, 'short': -?[\d.]+\}", body), body
    assert re.search(r"held-out rewards \((greedy|sampled)\), step \d+ -> 6: exact [\d.]+ -> [\d.]+", proc.stdout + proc.stderr)
    metrics = read_metrics(run_dir)
    for step in range(1, 7):
        keys = ("train/reward_mean", "train/reward/short") + (("actor/pg_loss", "actor/grad_norm") if step >= first_actor_step else ())
        for key in keys:
            assert key in metrics[step] and math.isfinite(metrics[step][key]), (step, key)  # present, not NaN or inf
    assert "val/reward/exact" in metrics[0] and "val/reward/exact" in metrics[6]
    assert metrics[6]["samples/samples_generated"] == 2.0
    samples = [json.loads(l) for l in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert sorted({(s["step"], s["stage"]) for s in samples if s["kind"] == "sample"}) == [
        (2, "step_2"), (3, "50%"), (4, "step_4"), (6, "post-train")]
    assert all(set(s["rewards"]) == {"exact", "short"} for s in samples if s["kind"] == "sample")
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "report.html").is_file() and (run_dir / "hf_model" / "model.safetensors").is_file()
    # the live report, rewritten at each sample-logging event: its grid has the 2 prompts x 4 events
    assert all(metrics[step]["samples/report_time_s"] > 0 for step in (2, 3, 4, 6))
    page = (run_dir / "report.html").read_text()
    assert 'data-rows="2" data-cols="4"' in page and "finished: step 6 of 6 (100%)" in page
    return metrics


def test_grpo_two_processes(tiny_model, rl_data, tmp_path):
    run_dir = tmp_path / "grpo"
    proc = run_module(MODULE, ["--config-name", "grpo_trainer", *rl_args(tiny_model, rl_data, run_dir, "trainer.save_freq=3")], nproc=2)
    metrics = check_run(proc, run_dir)
    assert "critic/vf_loss" not in metrics[1]

    # Resume from the step-3 checkpoint: the remaining steps replay exactly.
    resumed = tmp_path / "resumed"
    run_module(MODULE, ["--config-name", "grpo_trainer", *rl_args(tiny_model, rl_data, resumed, "trainer.save_freq=3",
               "trainer.resume_mode=resume_path", f"trainer.resume_from_path={run_dir / 'global_step_3'}")], nproc=2)
    again = read_metrics(resumed)
    for step in (4, 5, 6):
        for key in ("train/reward_mean", "actor/pg_loss", "actor/grad_norm"):
            assert again[step][key] == pytest.approx(metrics[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_ppo_two_processes_with_critic_and_kl(tiny_model, rl_data, tmp_path):
    run_dir = tmp_path / "ppo"
    proc = run_module(MODULE, ["--config-name", "ppo_trainer", *rl_args(tiny_model, rl_data, run_dir, "critic.warmup_steps=1",
                                                                         "algorithm.kl_coef=0.05")], nproc=2)
    metrics = check_run(proc, run_dir, first_actor_step=2)
    assert "critic/vf_loss" in metrics[1] and "actor/pg_loss" not in metrics[1]  # critic warm-up step
    assert math.isfinite(metrics[2]["critic/vf_loss"]) and "actor/kl_loss" in metrics[2]

    # The checkpoint holds actor and critic; the export is the actor, the same model as hf_model.
    checkpoint = run_dir / "global_step_6"
    assert {"model", "critic_model"} <= {k.split(".", 1)[0] for k in FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata}
    run_module("trainer.export", [str(checkpoint), str(tmp_path / "exported")], nproc=0)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").state_dict()
    for key, value in AutoModelForCausalLM.from_pretrained(run_dir / "hf_model").state_dict().items():
        assert torch.equal(exported[key], value), key


def test_logged_losses_do_not_depend_on_the_number_of_ranks(tiny_model, rl_data, tmp_path):
    """pg_loss, kl_loss and vf_loss are each rank's share of a globally normalised loss: logged
    as their sum over ranks, a run on 1 and on 2 processes (here as HSDP) logs the same values."""
    extra = ["trainer.total_training_steps=1", "critic.warmup_steps=0", "algorithm.kl_coef=0.05", "trainer.test_freq=-1",
             "logging.sample_logging.enabled=false", "trainer.export_hf_model=false", "trainer.logger=[file]",
             "samples.report=false", "data.val_files=null",
             # One update per step on the whole batch: with more, each rank's mini-batches are drawn
             # from its own rollouts, a different split of the data than one rank's.
             "actor.ppo_epochs=1", "actor.mini_batches_per_step=1",
             "rollout.responses_per_prompt=2"]  # groups of 2: the shared-prompt forward on 1 and 2 ranks
    logged = {}
    for nproc in (1, 2):
        run_dir = tmp_path / f"ranks{nproc}"
        # 1 rank: a plain process (no torchrun), the command most users run first. 2 ranks as
        # HSDP (fsdp_size=1: each rank a whole replica), the multi-node layout, for actor,
        # reference and critic alike.
        layout = ["model.fsdp_config.fsdp_size=1"] if nproc == 2 else []
        proc = run_module(MODULE, ["--config-name", "ppo_trainer", *rl_args(tiny_model, rl_data, run_dir, *extra, *layout)],
                          nproc=0 if nproc == 1 else nproc)
        assert ("HSDP: 2 replica groups × 1 shards" in proc.stderr) == (nproc == 2)
        logged[nproc] = read_metrics(run_dir)
    for key in ("actor/pg_loss", "actor/kl_loss", "critic/vf_loss", "actor/pg_clipfrac", "train/reward_mean", "actor/grad_norm"):
        # GAE advantages are whitened over all tokens, so pg_loss (their mean) is 0 up to rounding
        # of terms of size ~1, while each rank's share alone is not: abs 1e-5 tells them apart.
        assert logged[1][1][key] == pytest.approx(logged[2][1][key], rel=1e-4, abs=1e-5), key
