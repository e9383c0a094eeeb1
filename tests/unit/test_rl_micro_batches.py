"""Token-budget micro-batches in RL (verl's use_dynamic_bsz): the partition keeps the budget and
every row, ranks agree on one count, and the update and the log-probs are those of fixed-size
micro-batches. tests/distributed/test_rl_dynamic_batches.py runs two ranks of different lengths."""

import copy
import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification

from config.schema import ConfigError
from helpers import skewed_rollout
from workers import core_algos
from workers.actor import (
    CRITIC_MODEL_KWARGS,
    MicroBatching,
    UpdateSettings,
    forward_in_micro_batches,
    micro_batch_rows,
    response_log_probs,
    response_values,
    update_critic,
    update_policy,
)
from workers.micro_batches import balanced_groups, padded_tokens, token_budget_groups


def random_lengths(n: int, seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    return [rng.randint(2, 30) for _ in range(n)], [rng.choice([1, 2, 3, rng.randint(1, 90)]) for _ in range(n)]


@pytest.mark.parametrize("seed", range(4))
def test_partition_keeps_the_budget_and_every_row_once(seed):
    lengths = random_lengths(50, seed)
    budget = 240
    groups = token_budget_groups(range(50), lengths, budget)
    assert sorted(i for g in groups for i in g) == list(range(50))
    assert all(padded_tokens(g, lengths) <= budget for g in groups)
    # The padded width is the longest prompt plus the longest response, not the longest sequence.
    assert padded_tokens([0, 1], ([10, 2], [1, 9])) == 2 * (10 + 9)
    # A larger count (another rank needed more): exactly that many, each within the budget, every row once.
    for count in (len(groups), len(groups) + 1, len(groups) + 7):
        balanced = balanced_groups(range(50), lengths, budget, count)
        assert len(balanced) == count and all(balanced)
        assert sorted(i for g in balanced for i in g) == list(range(50))
        assert all(padded_tokens(g, lengths) <= budget for g in balanced)
    with pytest.raises(ValueError, match="do not fit in"):
        balanced_groups(range(50), lengths, budget, len(groups) - 1)


def test_balanced_micro_batches_even_out_the_padded_tokens():
    # Longest-first filling leaves a small last group; balancing at the same count lowers the largest.
    lengths = ([4] * 10, [16, 16, 16, 12, 12, 12, 12, 4, 4, 4])
    budget = 80
    greedy = token_budget_groups(range(10), lengths, budget)
    balanced = balanced_groups(range(10), lengths, budget, len(greedy))
    largest = lambda groups: max(padded_tokens(g, lengths) for g in groups)  # noqa: E731
    assert len(balanced) == len(greedy)
    assert largest(balanced) < largest(greedy), (greedy, balanced)


def test_ranks_with_different_lengths_agree_on_one_count():
    """What `micro_batch_rows` does with the all-reduce MAX, here for two ranks by hand."""
    short, long = ([3] * 12, [2] * 12), ([3] * 12, [60] * 12)
    budget = 128
    own = [len(token_budget_groups(range(12), lengths, budget)) for lengths in (short, long)]
    assert own[0] < own[1]  # left alone, the ranks would run different numbers of forwards (FSDP hangs)
    count = max(own)
    for lengths in (short, long):
        groups = balanced_groups(range(12), lengths, budget, count)
        assert len(groups) == count and all(padded_tokens(g, lengths) <= budget for g in groups)


def test_a_sequence_longer_than_the_budget_is_one_line_naming_the_key(tiny_model):
    batch = skewed_rollout(2, 2, (5, 5), (10, 10), 50, 0)
    with pytest.raises(ConfigError) as err:
        micro_batch_rows(batch, MicroBatching(4, 12, "actor.ppo_max_token_len_per_gpu"))
    message = str(err.value)
    assert message.startswith("actor.ppo_max_token_len_per_gpu=12: smaller than a sequence of 15 tokens") and "\n" not in message


@pytest.fixture(scope="module")
def models(tiny_model):
    torch.manual_seed(0)
    actor = AutoModelForCausalLM.from_pretrained(tiny_model)
    config = AutoConfig.from_pretrained(tiny_model)
    config.update(CRITIC_MODEL_KWARGS)  # the value head as the trainer builds it
    critic = AutoModelForTokenClassification.from_pretrained(tiny_model, config=config)
    return actor, critic


def rollout(actor) -> "object":
    batch = skewed_rollout(6, 3, (2, 12), (1, 24), actor.config.vocab_size, actor.config.pad_token_id, seed=3)
    torch.manual_seed(1)
    batch.advantages = torch.randn(len(batch), 1) * batch.response_mask
    return batch


FIXED = MicroBatching(3)
BUDGET = MicroBatching(3, 96, "actor.ppo_max_token_len_per_gpu")


@pytest.mark.parametrize("shared", [False, True])
def test_log_probs_come_back_in_order(models, one_rank, shared):
    actor, _ = models
    batch = rollout(actor)
    plan = micro_batch_rows(batch, BUDGET)
    assert len(plan) != len(micro_batch_rows(batch, FIXED))  # a different cut, with trimmed widths
    assert any(not torch.equal(rows, torch.arange(int(rows[0]), int(rows[0]) + len(rows))) for rows in plan)
    fn = lambda model, micro: response_log_probs(model, micro, 1.3, shared)  # noqa: E731
    fixed = forward_in_micro_batches(fn, actor, batch, FIXED)
    budget = forward_in_micro_batches(fn, actor, batch, BUDGET)
    assert budget.shape == fixed.shape == batch.response_mask.shape
    torch.testing.assert_close(budget, fixed, rtol=1e-5, atol=1e-5)
    assert torch.all(budget[batch.response_mask == 0] == 0)


def updated(model, fn):
    model = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = fn(model, torch.optim.SGD(model.parameters(), lr=0.5))
    return metrics, [p.detach() - b for p, b in zip(model.parameters(), before)]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_actor_update_with_a_token_budget_equals_the_fixed_one(models, one_rank, agg):
    actor, _ = models
    batch = rollout(actor)
    batch.old_log_prob = forward_in_micro_batches(response_log_probs, actor, batch, FIXED) + 0.05 * batch.response_mask
    batch.ref_log_prob = batch.old_log_prob - 0.1 * batch.response_mask
    loss_cfg = core_algos.PolicyLossConfig(loss_agg_mode=agg, max_response_length=batch.response_mask.shape[1])
    results = []
    for how in (FIXED, BUDGET):
        settings = UpdateSettings(how.size, ppo_epochs=1, mini_batches=2, clip_grad=1.0, world_size=1, seed=0,
                                  shared_prompts=True, max_tokens=how.max_tokens)
        results.append(updated(actor, lambda m, opt: update_policy(
            m, opt, None, batch, core_algos.get_policy_loss("vanilla"), loss_cfg, 0.1, "k3", settings, step=0, temperature=1.0)))
    (m_fixed, d_fixed), (m_budget, d_budget) = results
    assert m_budget["actor/pg_loss"] == pytest.approx(m_fixed["actor/pg_loss"], rel=1e-5, abs=1e-7)
    assert m_budget["actor/grad_norm"] == pytest.approx(m_fixed["actor/grad_norm"], rel=1e-5) and m_fixed["actor/grad_norm"] > 0
    for a, b in zip(d_budget, d_fixed):
        # A parameter change is a difference of two fp32 values of up to ~1: its rounding is ~1e-7.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert sum(float(d.abs().sum()) for d in d_fixed) > 0


def test_critic_update_with_a_token_budget_equals_the_fixed_one(models, one_rank):
    _, critic = models
    batch = rollout(critic)
    batch.values = forward_in_micro_batches(response_values, critic, batch, FIXED)
    values = forward_in_micro_batches(response_values, critic, batch, BUDGET)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(values[mask], batch.values[mask], rtol=1e-5, atol=1e-5)
    batch.returns = (batch.values + torch.randn_like(batch.values)) * batch.response_mask
    results = []
    for how in (FIXED, MicroBatching(3, 96, "critic.ppo_max_token_len_per_gpu")):
        settings = UpdateSettings(how.size, 1, 2, 1.0, 1, 0, max_tokens=how.max_tokens)
        results.append(updated(critic, lambda m, opt: update_critic(m, opt, batch, 0.5, "seq-mean-token-sum-norm", settings, 0)))
    (m_fixed, d_fixed), (m_budget, d_budget) = results
    assert m_budget["critic/vf_loss"] == pytest.approx(m_fixed["critic/vf_loss"], rel=1e-5)
    for a, b in zip(d_budget, d_fixed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert sum(float(d.abs().sum()) for d in d_fixed) > 0
