"""The sample generator: batched, left-padded, per-prompt seeds."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.generation import GenerationSettings, encode_prompts, generate


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
