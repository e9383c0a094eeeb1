"""The sample generator: batched, left-padded, per-prompt seeds."""

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor

from helpers import make_tiny_model, with_generation_config
from workers import generation
from workers.actor import build_rollout_batch, response_log_probs
from workers.generation import GenerationSettings, encode_prompts, generate, left_pad
from workers.model import ModelLoadError, build_from_config, load_config, load_stop_ids


def test_batched_generation_equals_one_prompt_at_a_time(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = encode_prompts(tok, ["1+2=", "33+44=", "5+60=", "hello there, how are you"])
    for settings in (GenerationSettings(max_new_tokens=6, do_sample=False),
                     GenerationSettings(max_new_tokens=6, do_sample=True, temperature=1.3, top_k=20, top_p=0.95)):
        seeds = [11, 22, 33, 44]
        batched = generate(model, tok, prompts, settings, seeds)
        single = [generate(model, tok, [p], settings, [s])[0] for p, s in zip(prompts, seeds)]
        assert [b.token_ids for b in batched] == [s.token_ids for s in single]
        assert all(b.num_tokens <= 6 for b in batched)


def test_per_prompt_seed_makes_sampling_independent_of_the_batch_and_global_rng(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    settings = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=2.0, top_k=0, top_p=1.0)
    a, b = encode_prompts(tok, ["12+3=", "7+7="])
    torch.manual_seed(0)
    first = generate(model, tok, [a, b], settings, [5, 6])
    torch.manual_seed(123)
    again = generate(model, tok, [b, a], settings, [6, 5])
    assert first[0].token_ids == again[1].token_ids and first[1].token_ids == again[0].token_ids
    other_seed = generate(model, tok, [a], settings, [7])
    assert other_seed[0].token_ids != first[0].token_ids  # temperature 2 over 103 tokens: a different seed differs


def test_generation_restores_train_mode_and_reports_eos(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model.train()
    out = generate(model, tok, encode_prompts(tok, ["1+1="]), GenerationSettings(max_new_tokens=3, do_sample=False))
    assert model.training
    assert out[0].stopped_at_eos == (tok.eos_token_id in out[0].token_ids)
    assert out[0].num_tokens <= 3


class PerRowSampler(LogitsProcessor):
    """The sampler as it was before it was vectorised: one `multinomial` per row per token step."""

    def __init__(self, seeds, device):
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids, scores):
        probs = torch.softmax(scores.float(), dim=-1)
        picks = torch.stack([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)])
        return torch.full_like(scores, float("-inf")).scatter_(1, picks, 0.0)


def test_vectorised_sampler_draws_the_samples_of_the_per_row_sampler(tiny_model, monkeypatch):
    """The same tokens as one multinomial per row and step, for the same seeds, with top-k/top-p
    masking, and whatever the noise block (one step at a time, or all steps in one draw)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = encode_prompts(tok, ["1+2=", "33+44=", "5+60=", "hello there, how are you", "9+9=", "70+1="])
    seeds = [3, 1_000_003, 77, 2**31 - 2, 5, 5]
    runs = {}
    for settings in (GenerationSettings(max_new_tokens=12, do_sample=True, temperature=1.7, top_k=0, top_p=1.0),
                     GenerationSettings(max_new_tokens=12, do_sample=True, temperature=1.3, top_k=20, top_p=0.9)):
        for budget in (1, 1 << 24):  # one step per draw / every step in one draw
            monkeypatch.setattr(generation.SeededSampler, "NOISE_BUDGET_ELEMENTS", budget)
            new = [g.token_ids for g in generate(model, tok, prompts, settings, seeds)]
            runs.setdefault(settings, []).append(new)
        monkeypatch.setattr(generation, "SeededSampler", lambda seeds, device, max_steps=1: PerRowSampler(seeds, device))
        old = [g.token_ids for g in generate(model, tok, prompts, settings, seeds)]
        monkeypatch.undo()
        assert runs[settings] == [old, old], settings
        assert len({tuple(t) for t in old}) > 2  # sampled at temperature > 1: the rows differ


def test_generation_micro_batches_give_the_same_samples(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = encode_prompts(tok, ["1+2=", "33+44=", "5+60=", "hello there, how are you", "9+9="])
    settings = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=0, top_p=1.0)
    seeds = [10, 20, 30, 40, 50]
    whole = [g.token_ids for g in generate(model, tok, prompts, settings, seeds)]
    for size in (1, 2, 3):
        assert [g.token_ids for g in generate(model, tok, prompts, settings, seeds, micro_batch_size=size)] == whole, size


# ---------------------------------------------------------------------- hub models as they come
# What a hub model's generation_config.json may carry. None of it may reach our sampling: rank 0
# loads the model with `from_pretrained` (and would see it), the other ranks build from the config.
HUB_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_k": 5, "top_p": 0.8, "repetition_penalty": 1.8,
                "no_repeat_ngram_size": 2, "min_new_tokens": 4}
PROMPTS = ["1+2=", "33+44=", "5+60=", "hello there, how are you"]
GREEDY = GenerationSettings(max_new_tokens=8, do_sample=False)
SAMPLED = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.3, top_k=20, top_p=0.95)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("hub")
    # Untied embeddings: a tiny tied model greedily repeats the prompt's last token forever.
    base = make_tiny_model(root / "base", seed=3, tie=False)
    tok = AutoTokenizer.from_pretrained(base)
    # The second EOS id is the third token the model writes for the first prompt.
    first = generate(AutoModelForCausalLM.from_pretrained(base), tok, encode_prompts(tok, PROMPTS[:1]),
                     GenerationSettings(max_new_tokens=3, do_sample=False))[0].token_ids
    second_eos = first[2]
    assert second_eos not in first[:2] and second_eos != tok.eos_token_id
    return SimpleNamespace(
        tok=tok, first=first, second_eos=second_eos,
        hub=with_generation_config(base, root / "hub", {**HUB_SAMPLING, "eos_token_id": [tok.eos_token_id, second_eos]}),
        plain=with_generation_config(base, root / "plain", None),
    )


def test_a_hub_generation_config_changes_neither_greedy_nor_sampled_generations(hub):
    tok = hub.tok
    loaded = AutoModelForCausalLM.from_pretrained(hub.hub)  # as rank 0 loads it
    built = build_from_config(load_config(str(hub.hub)), torch.float32)  # as the other ranks and rank 0's copy do
    built.load_state_dict(loaded.state_dict())
    plain = AutoModelForCausalLM.from_pretrained(hub.plain)
    prompts = encode_prompts(tok, PROMPTS)
    # The file has teeth: transformers' own greedy decoding follows it.
    ids, mask = left_pad(prompts, tok.pad_token_id, torch.device("cpu"))
    own = [m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, pad_token_id=tok.pad_token_id, do_sample=False)
           for m in (loaded, plain)]
    assert not torch.equal(*own)

    stop_ids = load_stop_ids(str(hub.hub), tok)
    for settings in (GREEDY, SAMPLED):
        seeds = [11, 22, 33, 44]
        outs = [[g.token_ids for g in generate(m, tok, prompts, settings, seeds, stop_ids=stop_ids)] for m in (loaded, built, plain)]
        assert outs[0] == outs[1] == outs[2], settings.describe()
    assert loaded.generation_config.repetition_penalty == 1.8  # the model's own config is back after each call


def test_generation_stops_at_every_eos_id_of_the_model_directory(hub, tmp_path):
    tok = hub.tok
    stop_ids = load_stop_ids(str(hub.hub), tok)
    assert stop_ids == (tok.eos_token_id, hub.second_eos)
    assert load_stop_ids(str(hub.plain), tok) == (tok.eos_token_id,)  # no generation_config.json
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert load_stop_ids(str(tmp_path), tok) == (tok.eos_token_id, 7)  # one int, not a list
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [7,')
    with pytest.raises(ModelLoadError, match="generation_config.json"):
        load_stop_ids(str(tmp_path), tok)

    model = AutoModelForCausalLM.from_pretrained(hub.hub)
    prompts = encode_prompts(tok, PROMPTS)
    full = generate(model, tok, prompts, GREEDY, stop_ids=(tok.eos_token_id,))
    cut = generate(model, tok, prompts, GREEDY, stop_ids=stop_ids)
    # Each row is the unstopped one up to and including its first stop id, whichever id it is.
    for f, c in zip(full, cut):
        k = next((i for i, t in enumerate(f.token_ids) if t in stop_ids), None)
        assert c.token_ids == (f.token_ids if k is None else f.token_ids[: k + 1])
        assert c.stopped_at_eos == (k is not None)
    assert cut[0].token_ids == hub.first and cut[0].stopped_at_eos and full[0].num_tokens > 3
    assert cut[0].text == tok.decode(hub.first[:2], skip_special_tokens=True)  # the stop token is not text


def test_response_log_probs_are_those_of_the_logits_divided_by_the_temperature(hub):
    tok = hub.tok
    model = AutoModelForCausalLM.from_pretrained(hub.plain)
    generated = generate(model, tok, encode_prompts(tok, PROMPTS[:2]), SAMPLED, [5, 6])
    generated[1] = replace(generated[1], token_ids=generated[1].token_ids[:3])  # as if it had stopped early
    batch = build_rollout_batch(generated, [0, 1], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
        p, r = batch.prompt_width, batch.response_mask.shape[1]
        targets = batch.input_ids[:, p:, None]
        mask = batch.response_mask  # the LM head runs on response positions only: 0 elsewhere
        assert 0 < mask.sum() < mask.numel()  # some rows stopped early: positions to leave out
        by_hand = {t: torch.log_softmax(logits[:, p - 1 : p - 1 + r].float() / t, dim=-1).gather(-1, targets).squeeze(-1) * mask
                   for t in (0.6, 1.0, 1.7)}
        for t, expected in by_hand.items():
            torch.testing.assert_close(response_log_probs(model, batch, temperature=t), expected)
        assert not response_log_probs(model, batch)[mask == 0].any()  # after a stop: no log-prob, no logits
    assert not torch.allclose(by_hand[0.6], by_hand[1.0])
