"""Reward-model pieces that need no process group: the config check before any model is built,
the reward set's weighted total with a reward scored elsewhere, and the text layout for a
reward-model tokenizer without a chat template."""

import pytest

from config.schema import ConfigError
from helpers import make_tiny_reward_model
from workers.reward_model import check_reward_model, hh_text
from workers.rewards import RewardError, build_reward_set


def test_a_causal_lm_is_refused_as_reward_model_in_one_line(tiny_model, tmp_path):
    with pytest.raises(ConfigError) as err:
        check_reward_model(str(tiny_model))
    message = str(err.value)
    assert message.startswith(f"reward.model.path={tiny_model}: LlamaForCausalLM has 2 outputs") and "num_labels=1" in message
    assert "\n" not in message
    assert check_reward_model(str(make_tiny_reward_model(tmp_path / "rm"))).num_labels == 1


def test_reward_scored_elsewhere_counts_by_weight_and_needs_its_own_name():
    rewards = build_reward_set([("short", lambda p, r, g: -len(r))]).with_scored_elsewhere("reward_model", 0.5)
    assert rewards.names == ["short", "reward_model"]
    scores = rewards.score("q", "abc", None)
    assert scores == {"short": -3.0}  # the functions' scores; the trainer adds the model's
    scores["reward_model"] = 2.0
    assert rewards.total(scores) == pytest.approx(-3.0 + 0.5 * 2.0)
    with pytest.raises(RewardError, match="reward name 'short' is taken"):
        rewards.with_scored_elsewhere("short", 1.0)


def test_hh_layout_for_a_tokenizer_without_chat_template():
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert hh_text(messages) == "Be kind.\n\nHuman: Hi\n\nAssistant: Hello"
