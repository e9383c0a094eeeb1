"""A GRPO group's responses share one prompt: each distinct prompt runs once, in the log-probs
(forward and backward) and in the rollout's prefill, with the numbers of the plain forward."""

import copy
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import DEMO_MODEL
from workers.actor import build_rollout_batch, response_log_probs
from workers.prompt_cache import prompt_groups
from workers.generation import GenerationSettings, encode_prompts, generate

PROMPTS = ["1+2=", "33+44=", "hello there, how are you", "5+60="]
GROUP = 3


class TokenCount:
    """Tokens through the model's input embeddings (what the forwards computed)."""

    def __init__(self, model):
        self.tokens = 0
        self.handle = model.get_input_embeddings().register_forward_hook(self._count)

    def _count(self, module, args, output):
        self.tokens += args[0].numel()


@pytest.fixture
def model_and_batch(tiny_model):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = encode_prompts(tok, PROMPTS)  # of different lengths: left padding inside the group's forward
    generated = generate(model, tok, [p for p in prompts for _ in range(GROUP)],
                         GenerationSettings(max_new_tokens=6, temperature=1.5, top_k=0), seeds=list(range(len(prompts) * GROUP)))
    generated[1] = replace(generated[1], token_ids=generated[1].token_ids[:2])  # stopped early
    generated[4] = replace(generated[4], token_ids=[])  # stopped at once: no response token
    batch = build_rollout_batch(generated, [i for i in range(len(prompts)) for _ in range(GROUP)], tok.pad_token_id)
    # Mini-batches draw rows in a random order: groups are scattered, not consecutive.
    return model, batch.select(torch.randperm(len(batch), generator=torch.Generator().manual_seed(3)))


def _log_probs_and_grads(model, batch, shared: bool, temperature: float = 0.7):
    model.zero_grad(set_to_none=True)
    count = TokenCount(model)
    log_probs = response_log_probs(model, batch, temperature, shared_prompts=shared)
    # A weight per token, so that every response position's gradient counts differently.
    (log_probs * torch.linspace(-1.0, 2.0, log_probs.numel()).view_as(log_probs)).sum().backward()
    count.handle.remove()
    return log_probs.detach(), [p.grad.clone() for p in model.parameters()], count.tokens


def test_shared_prompt_forward_gives_the_log_probs_and_gradients_of_the_plain_one(model_and_batch):
    model, batch = model_and_batch
    model.train()
    plain, plain_grads, plain_tokens = _log_probs_and_grads(model, batch, shared=False)
    shared, shared_grads, shared_tokens = _log_probs_and_grads(model, batch, shared=True)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    assert not shared[batch.response_mask == 0].any() and shared[batch.response_mask == 1].lt(0).all()
    for a, b in zip(shared_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in shared_grads)
    n, width = batch.input_ids.shape
    p, r = batch.prompt_width, width - batch.prompt_width
    assert plain_tokens == n * width
    assert shared_tokens == len(PROMPTS) * p + n * r  # each prompt once, then every response


def test_first_row_of_each_prompt_and_each_rows_prompt():
    first, inverse = prompt_groups(torch.tensor([2, 0, 2, 1, 0]))
    assert first.tolist() == [1, 3, 0] and inverse.tolist() == [2, 0, 2, 1, 0]


def test_with_activation_checkpointing_the_prompt_is_shared_with_the_same_gradients(model_and_batch, monkeypatch):
    """The backward runs each checkpointed layer again; the prompt and prefix caches give the
    replay what the first run got (a plain cache would append the states a second time)."""
    model, batch = model_and_batch
    plain = copy.deepcopy(model).train()
    expected, expected_grads, _ = _log_probs_and_grads(plain, batch, shared=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    from transformers.models.llama import modeling_llama

    mlp_calls = []
    mlp_forward = modeling_llama.LlamaMLP.forward
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", lambda self, x: mlp_calls.append(1) or mlp_forward(self, x))
    log_probs, grads, tokens = _log_probs_and_grads(model, batch, shared=True)
    n, width = batch.input_ids.shape
    assert tokens == len(PROMPTS) * batch.prompt_width + n * (width - batch.prompt_width)
    torch.testing.assert_close(log_probs, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # 2 forwards x layers, then each layer of both again in the backward: they were checkpointed.
    assert len(mlp_calls) == 4 * len(model.model.layers)
    assert all("_can_checkpoint_with_cache" not in vars(layer) for layer in model.model.layers)  # restored


def test_sliding_window_layers_get_the_plain_forward(tmp_path, model_and_batch):
    """What a sliding-window layer keeps is not every state: its model takes the plain forward."""
    from transformers import MistralConfig, MistralForCausalLM

    _, batch = model_and_batch
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2, sliding_window=4)).train()
    expected, _, _ = _log_probs_and_grads(model, batch, shared=False)
    log_probs, _, tokens = _log_probs_and_grads(model, batch, shared=True)
    assert tokens == batch.input_ids.numel()
    torch.testing.assert_close(log_probs, expected)


class NoCacheLM(torch.nn.Module):
    """A causal LM whose forward takes no KV cache (remote code, state-space models)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)


def test_a_model_that_takes_no_cache_gets_the_plain_forward(model_and_batch):
    model, batch = model_and_batch
    expected, _, _ = _log_probs_and_grads(model, batch, shared=False)
    log_probs, _, tokens = _log_probs_and_grads(NoCacheLM(model), batch, shared=True)
    assert tokens == batch.input_ids.numel()
    torch.testing.assert_close(log_probs, expected)


def test_rows_of_one_group_with_different_prompts_are_refused(model_and_batch):
    model, batch = model_and_batch
    wrong = replace(batch, group_index=torch.zeros_like(batch.group_index))
    with pytest.raises(RuntimeError, match="same group_index have different prompts"):
        response_log_probs(model, wrong, shared_prompts=True)


def test_a_rollout_prefills_each_distinct_prompt_once_with_the_same_generations():
    # The demo's trained model: what it writes depends on the whole prompt (a random tiny model's
    # outputs barely do, so a prefill of the wrong prompt could pass unseen).
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL)
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    distinct = encode_prompts(tok, PROMPTS)
    prompts = [p for p in distinct for _ in range(4)]
    seeds = list(range(100, 100 + len(prompts)))
    inputs = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: inputs.append(tuple(args[0].shape)))
    for settings in (GenerationSettings(max_new_tokens=8, do_sample=False),
                     GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=0)):
        # One prompt per call (nothing to share) against all in one call (each prompt once).
        alone = [g.token_ids for g in generate(model, tok, prompts, settings, seeds, micro_batch_size=1)]
        inputs.clear()
        shared = [g.token_ids for g in generate(model, tok, prompts, settings, seeds)]
        assert shared == alone, settings
        width = max(len(p) for p in prompts)
        # The distinct prompts but their last token, then that token for every row, then decoding.
        assert inputs[:2] == [(len(distinct), width - 1), (len(prompts), 1)], inputs
    assert len({tuple(alone[i]) for i in range(0, len(prompts), 4)}) == len(distinct)  # each prompt its own answer
