"""A sharded sequence-classification reward model on 2 gloo ranks scores every response as the
unsharded model does on that sequence alone (padding, uneven micro-batch counts, a sample event
scored collectively from rank 0's texts)."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from helpers import ROOT, make_tiny_reward_model, run_module

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
