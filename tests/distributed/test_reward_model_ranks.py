"""A sharded sequence-classification reward model on 2 gloo ranks scores every response as the
unsharded model does on that sequence alone (padding, uneven micro-batch counts, a sample event
scored collectively from rank 0's texts); a GRPO run on preference data trains on its score."""

import json
import re

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from helpers import ROOT, make_tiny_reward_model, read_metrics, run_module, write_jsonl

pytestmark = pytest.mark.distributed


def test_sharded_reward_model_scores_equal_an_unsharded_forward(tmp_path):
    rm_dir = make_tiny_reward_model(tmp_path / "rm")
    run_module("reward_model_worker", [str(rm_dir), str(tmp_path)], nproc=2, cwd=tmp_path,
               env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests' / 'distributed'}"}, timeout=240)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    tok = AutoTokenizer.from_pretrained(rm_dir)

    def alone(ids):
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0, 0].item()

    for r in ranks:
        assert len(r["scores"]) == len(r["encoded"]) > 0
        for ids, score in zip(r["encoded"], r["scores"]):
            assert score == pytest.approx(alone(ids), abs=1e-5)
    # The reward model's own chat template renders the conversation and the response.
    assert ranks[0]["encoded"][1] == tok(tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "3+3="},
         {"role": "assistant", "content": "6 is it"}], tokenize=False), add_special_tokens=False)["input_ids"]
    # Rank 0's micro-batch of two had padding (different lengths): still equal to the forwards alone.
    assert len(ranks[0]["encoded"][0]) != len(ranks[0]["encoded"][1])
    # The sample event: rank 0's rewards gain the reward model's scores; rank 1 has no samples.
    rewards = ranks[0]["sample_rewards"]
    assert [set(r) for r in rewards] == [{"reward_0", "reward_model"}, {"reward_model"}] and rewards[0]["reward_0"] == 0.5
    for reward, ids in zip(rewards, ranks[0]["sample_ids"]):
        assert reward["reward_model"] == pytest.approx(alone(ids), abs=1e-5)
    assert ranks[1]["sample_rewards"] is None
    # Rank 1 alone could not encode: both ranks raised the same kind of error, before any forward.
    assert ranks[0]["failed"] == "ScoringFailed: the reward model could not encode the texts of another rank"
    assert ranks[1]["failed"] == "ScoringFailed: the reward model could not encode the texts of this rank (UnicodeError: rank 1 only)"
    assert ranks[0]["survived"] == rewards  # the sample event went on with what rank 0 had


HH = [("What is a good name for a cat?", "Whiskers.", "No."), ("Name a colour.", "Blue.", "Cheese."),
      ("Say thanks.", "Thanks!", "Why?"), ("Count to three.", "1, 2, 3.", "4."), ("Greet me.", "Hello!", "Bye.")]


def test_grpo_with_a_reward_model_on_two_ranks(tiny_model, tmp_path):
    """A whole run on 2 ranks: rollouts scored on both ranks, validation with uneven shares
    (3 prompts on 2 ranks, one per reward-model forward: a spare forward keeps rank 1 in step),
    and sample events scored collectively. The training reward is the weighted model score."""
    rows = [{"chosen": f"\n\nHuman: {q}\n\nAssistant: {good}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {bad}"}
            for q, good, bad in HH]
    train = write_jsonl(rows[:4], tmp_path / "hh_train.jsonl")
    val = write_jsonl(rows[2:], tmp_path / "hh_val.jsonl")
    rm_dir = make_tiny_reward_model(tmp_path / "rm")
    run_dir = tmp_path / "run"
    proc = run_module("trainer.rl_trainer", [
        "--config-name", "grpo_trainer", f"model.partial_pretrain={tiny_model}", f"data.train_files={train}",
        f"data.val_files={val}", f"trainer.default_local_dir={run_dir}", "trainer.log_freq=1", "rollout.max_new_tokens=3",
        "data.prompts_per_step=2", "rollout.responses_per_prompt=2", "actor.micro_batch_size_per_gpu=2",
        "trainer.total_training_steps=2", "trainer.test_freq=2", "trainer.save_freq=-1", "trainer.logger=[console,file]",
        "reward.functions=[]", "reward_model.enable=True", f"reward_model.model.path={rm_dir}", "reward.model.weight=0.5",
        "reward_model.micro_batch_size_per_gpu=1", "logging.sample_logging.enabled=true",
        "logging.sample_logging.max_new_tokens=3", 'logging.sample_logging.prompts=["Name a fruit."]',
    ], nproc=2, timeout=300)
    metrics = read_metrics(run_dir)
    for step in (1, 2):
        m = metrics[step]
        assert m["train/reward_mean"] == pytest.approx(0.5 * m["train/reward/reward_model"], rel=1e-6)
    assert "val/reward/reward_model" in metrics[0] and "val/reward/reward_model" in metrics[2]
    assert re.search(r"\[Sample 1/1\] Rewards: \{'reward_model': -?[\d.]+", proc.stdout), proc.stdout[-2000:]
