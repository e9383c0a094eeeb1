"""The policy update: on-policy it needs no old-log-prob forward (the ratio is exactly 1)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers import core_algos
from workers.actor import UpdateSettings, build_rollout_batch, forward_in_micro_batches, on_policy, response_log_probs, update_policy
from workers.generation import GenerationSettings, encode_prompts, generate


def sampled_groups(tiny_model, texts: list[str], group: int):
    """The tiny model, its tokenizer and a rollout batch of `group` sampled responses per prompt."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = encode_prompts(tok, texts)
    generated = generate(model, tok, [p for p in prompts for _ in range(group)],
                         GenerationSettings(max_new_tokens=5, temperature=1.5, top_k=0), seeds=list(range(len(texts) * group)))
    batch = build_rollout_batch(generated, [i for i in range(len(texts)) for _ in range(group)], tok.pad_token_id)
    return model, tok, batch


@pytest.mark.parametrize("policy_loss", ["vanilla", "gspo"])
def test_on_policy_update_without_old_log_probs_equals_the_one_with_them(tiny_model, one_rank, policy_loss):
    torch.manual_seed(0)
    model, tok, batch = sampled_groups(tiny_model, ["1+2=", "33+44=", "5+60="], group=2)
    batch.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])[:, None] * batch.response_mask
    settings = UpdateSettings(micro_batch_size=4, ppo_epochs=1, mini_batches=1, clip_grad=1.0, world_size=1, seed=0)
    assert on_policy(settings) and not on_policy(UpdateSettings(4, 1, 2, 1.0, 1, 0))
    results = []
    for with_old in (True, False):
        actor = copy.deepcopy(model)
        optimizer = torch.optim.AdamW(actor.parameters(), lr=1e-2)
        b = copy.copy(batch)
        b.old_log_prob = forward_in_micro_batches(response_log_probs, actor, b, 4) if with_old else None
        metrics = update_policy(actor, optimizer, None, b, core_algos.get_policy_loss(policy_loss),
                                core_algos.PolicyLossConfig(), 0.0, "k3", settings, step=0, temperature=1.0)
        results.append((metrics, [p.detach().clone() for p in actor.parameters()]))
    (m_old, p_old), (m_new, p_new) = results
    assert m_new["actor/ppo_kl"] == 0 and m_new["actor/pg_clipfrac"] == 0  # ratio exactly 1
    assert m_new["actor/pg_loss"] == pytest.approx(m_old["actor/pg_loss"], abs=1e-6)
    assert m_new["actor/grad_norm"] == pytest.approx(m_old["actor/grad_norm"], rel=1e-5) and m_new["actor/grad_norm"] > 0
    for a, b in zip(p_old, p_new):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, b0) for a, b0 in zip(p_new, model.parameters()))  # the update did move the weights


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompt_forward_on_an_fsdp_model_gives_the_plain_gradients(tiny_model, one_rank, checkpointing):
    """Two forwards of the sharded model (the distinct prompts, then the responses) before one
    backward: FSDP2 reduces the gradients of both, the same as one plain forward's, also with
    its layers checkpointed (FSDP2's hooks stay outside HF's checkpoint)."""
    from workers.fsdp import ShardingSpec, device_mesh, shard_model

    torch.manual_seed(0)
    plain, tok, batch = sampled_groups(tiny_model, ["1+2=", "33+44=", "hello there"], group=3)
    sharded = copy.deepcopy(plain)
    if checkpointing:
        sharded.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sharded = shard_model(sharded, device_mesh(torch.device("cpu"), 1), ShardingSpec(torch.float32, torch.float32, False, True, -1))
    grads = []
    for model, shared in ((plain, False), (sharded, True)):
        model.train()
        weights = torch.linspace(-1.0, 2.0, batch.response_mask.numel()).view_as(batch.response_mask)
        (response_log_probs(model, batch, shared_prompts=shared) * weights).sum().backward()
        grads.append({n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for n, p in model.named_parameters()})
    for name, expected in grads[0].items():
        torch.testing.assert_close(grads[1][name], expected, rtol=1e-4, atol=1e-6, msg=name)
    assert sum(float(g.abs().sum()) for g in grads[1].values()) > 0
