"""Token-balanced, length-grouped, token-budget batching changes speed, never the maths."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from config.schema import DataConfig
from helpers import write_parquet
from trainer.data import (
    SFTBatches,
    balanced_shares,
    collate,
    length_grouped_order,
    load_sft_examples,
    split_to_count,
    token_budget_groups,
)
from trainer.fsdp_sft_trainer import token_loss_sum
from workers.model import lm_head_rows


def skewed_examples(tmp_path, tokenizer, n=40, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        long = rng.random() < 0.15
        response = "".join(rng.choice("0123456789 ") for _ in range(rng.randint(30, 60) if long else rng.randint(1, 6)))
        rows.append({"prompt": f"{i}+{i}=", "response": response})
    cfg = DataConfig(prompt_key="prompt", response_key="response", max_length=80, train_batch_size=8, micro_batch_size_per_gpu=2)
    return load_sft_examples(str(write_parquet(rows, tmp_path / "skewed.parquet")), "k", tokenizer, cfg)


def test_length_grouped_order_is_a_seeded_permutation_with_low_padding():
    rng = random.Random(1)
    lengths = [rng.choice([5, 6, 7, 300]) for _ in range(800)]
    order = length_grouped_order(lengths, batch_size=16, seed=3, epoch=0)
    assert sorted(order) == list(range(800))
    assert order == length_grouped_order(lengths, 16, 3, 0) and order != length_grouped_order(lengths, 16, 3, 1)
    def real_share(order):
        batches = [order[i : i + 16] for i in range(0, 800, 16)]
        return sum(lengths) / sum(max(lengths[i] for i in b) * len(b) for b in batches)

    assert real_share(order) > 0.9
    assert real_share(list(range(800))) < 0.3  # random batches: mostly padding


def test_rank_shares_are_equal_in_count_and_balanced_in_tokens():
    lengths = [100, 5, 5, 5, 90, 5, 5, 5]
    shares = balanced_shares(range(8), lengths, 2)
    assert [len(s) for s in shares] == [4, 4]
    assert sorted(shares[0] + shares[1]) == list(range(8))
    assert abs(sum(lengths[i] for i in shares[0]) - sum(lengths[i] for i in shares[1])) <= 10


def test_token_budget_groups_respect_the_budget_and_split_to_a_count():
    lengths = [50, 10, 12, 11, 40, 9]
    groups = token_budget_groups(range(6), lengths, budget=64)
    assert all(max(lengths[i] for i in g) * len(g) <= 64 for g in groups)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert len(split_to_count(groups, len(groups) + 2)) == len(groups) + 2


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_rank_runs_the_same_number_of_forwards(tmp_path, world_size):
    tok = AutoTokenizer.from_pretrained("config/demo_assets/model")
    examples = skewed_examples(tmp_path, tok)
    cfg = DataConfig(train_batch_size=12, max_token_len_per_gpu=80, max_length=80, group_by_length=False)
    plans = [SFTBatches(examples, cfg, 0, r, world_size, tok.pad_token_id).plan(1, 2) for r in range(world_size)]
    assert len({len(p) for p in plans}) == 1
    everyone = sorted(i for p in plans for g in p for i in g)
    assert everyone == sorted(SFTBatches(examples, cfg, 0, 0, world_size, 0).global_batch(1, 2))


def test_dynamic_micro_batches_give_the_loss_and_gradients_of_one_by_one(tmp_path, tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    examples = skewed_examples(tmp_path, tok)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    cfg = DataConfig(train_batch_size=16, max_token_len_per_gpu=100, max_length=80, group_by_length=False)
    batches = SFTBatches(examples, cfg, seed=0, rank=0, world_size=1, pad_id=tok.pad_token_id)
    chosen = batches.global_batch(0, 1)
    total_tokens = sum(examples[i].num_loss_tokens for i in chosen)

    def loss_and_grads(micro_batches):
        model.zero_grad()
        loss = sum(token_loss_sum(model, mb) / total_tokens for mb in micro_batches)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    dynamic = batches.micro_batches(0, 1)
    assert len(dynamic) > 1 and any(mb.input_ids.shape[0] > 1 for mb in dynamic)
    assert sum(mb.num_padded_tokens for mb in dynamic) < max(len(examples[i].input_ids) for i in chosen) * len(chosen)
    one_by_one = [collate([examples[i]], tok.pad_token_id) for i in chosen]
    loss_a, grads_a = loss_and_grads(dynamic)
    loss_b, grads_b = loss_and_grads(one_by_one)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_lm_head_on_target_positions_only_gives_the_full_logits_loss_and_gradients(tmp_path, tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    examples = skewed_examples(tmp_path, tok)[:6]
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    batch = collate(examples, tok.pad_token_id)
    targets = batch.labels[:, 1:] != -100
    keep = torch.zeros_like(batch.labels, dtype=torch.bool)
    keep[:, :-1] = targets
    with lm_head_rows(model, keep) as hooked:
        rows = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert hooked and rows.shape == (int(targets.sum()), model.config.vocab_size)
    assert targets.sum() < targets.numel() / 2  # the prompts and padding are most of the batch

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    def full_logits():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), batch.labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
        )

    loss_a, grads_a = loss_and_grads(lambda: token_loss_sum(model, batch))
    loss_b, grads_b = loss_and_grads(full_logits)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # A micro-batch with no target (a rank's padding share) still runs forward and backward.
    empty = collate(examples[:2], tok.pad_token_id, zero_loss=True)
    loss_e, grads_e = loss_and_grads(lambda: token_loss_sum(model, empty))
    assert loss_e == 0.0 and all(g.abs().sum() == 0 for g in grads_e)
