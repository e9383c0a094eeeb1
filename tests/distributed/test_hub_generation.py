"""Hub models as they come (2 gloo ranks): a model directory's generation_config.json
changes nothing in what the trainers sample, and its EOS ids end generations.

Rank 0 loads the weights with `from_pretrained` (and so sees the file); the other ranks, and
rank 0's gathered copy, are built from the config. Each run here is compared with the same run
on a copy of the directory without the file, same seed: every sampled or greedy token must agree.
"""

import json

import pytest
from transformers import AutoTokenizer

from helpers import make_tiny_model, read_metrics, run_module, with_generation_config

pytestmark = pytest.mark.distributed

# What a chat model's generation_config.json may carry; none of it is ours to sample with.
HUB_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_k": 5, "top_p": 0.8, "repetition_penalty": 1.8,
                "no_repeat_ngram_size": 2, "min_new_tokens": 3}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    # Untied embeddings: a tiny tied model only repeats the prompt's last token, which hides little.
    return make_tiny_model(tmp_path_factory.mktemp("hub_generation") / "base", seed=3, tie=False)


def samples(run_dir) -> list[tuple]:
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return [(r["step"], r["stage"], r["prompt"], r["generation"], r["generated_tokens"], r["stopped_at_eos"])
            for r in rows if r["kind"] == "sample"]


def without_timings(metrics: dict[int, dict[str, float]]) -> dict[int, dict[str, float]]:
    return {step: {k: v for k, v in m.items() if not k.endswith("_s")} for step, m in metrics.items()}


def grpo_args(model, data, run_dir):
    # Every key the comparison depends on is set here, so changed defaults cannot hollow it out.
    return [
        "--config-name", "grpo_trainer",
        f"model.partial_pretrain={model}", f"data.train_files={data['train']}", f"data.val_files={data['val']}",
        f"trainer.default_local_dir={run_dir}", "data.max_prompt_length=32", "data.prompts_per_step=4",
        "data.max_val_prompts=4", "rollout.responses_per_prompt=4", "rollout.max_new_tokens=6", "rollout.temperature=0.8",
        "rollout.top_k=0", "rollout.top_p=1.0", "rollout.val_do_sample=true", "actor.micro_batch_size_per_gpu=8",
        "actor.ppo_epochs=1", "actor.mini_batches_per_step=1", "algorithm.kl_coef=0.0", "optim.lr=1e-3",
        "trainer.total_epochs=1", "trainer.total_training_steps=2", "trainer.test_freq=-1", "trainer.log_freq=1",
        "trainer.save_freq=-1", "trainer.export_hf_model=false", "trainer.logger=[file]", "trainer.seed=1",
        # About half of the random responses hold a digit: GRPO groups have a spread, so the updates move.
        "reward.functions=[{name: exact, fn: arithmetic_exact_match},{name: digit, fn: format_regex, kwargs: {pattern: '.*[0-9].*'}}]",
        "logging.sample_logging.enabled=true", 'logging.sample_logging.prompts=["1+1=","22+33="]',
        "logging.sample_logging.num_samples=2", "logging.sample_logging.interval_steps=1",
        "logging.sample_logging.percent_of_max_steps=null", "logging.sample_logging.max_new_tokens=6",
        "logging.sample_logging.do_sample=true", "logging.sample_logging.temperature=0.7", "logging.sample_logging.top_p=0.9",
        "samples.history=true", "samples.report=false",
    ]


def test_grpo_rollouts_validation_and_samples_ignore_the_hub_generation_config(base_model, rl_data, tmp_path):
    plain = with_generation_config(base_model, tmp_path / "plain", None)
    # A random tiny model's logits are nearly flat, so a penalty alone moves few draws: also ban the
    # digits the reward looks for, which would show in the first step's rewards of rank 0.
    digits = AutoTokenizer.from_pretrained(base_model).convert_tokens_to_ids(list("0123456789"))
    hub = with_generation_config(base_model, tmp_path / "hub", {**HUB_SAMPLING, "suppress_tokens": digits})
    runs = {}
    for name, model in (("plain", plain), ("hub", hub)):
        run_module("trainer.rl_trainer", grpo_args(model, rl_data, tmp_path / f"run_{name}"), nproc=2)
        runs[name] = (without_timings(read_metrics(tmp_path / f"run_{name}")), samples(tmp_path / f"run_{name}"))
    metrics, logged = runs["plain"]
    # Rewards and lengths of rollouts on both ranks, losses of the update, held-out rewards, samples.
    assert {"train/response_length", "actor/pg_loss", "val/reward_mean"} <= set(metrics[2]) and "val/reward_mean" in metrics[0]
    assert [(s[0], s[1]) for s in logged] == [(1, "step_1")] * 2 + [(2, "post-train")] * 2
    assert runs["hub"] == runs["plain"]


def sft_args(model, data, run_dir):
    return [
        "--config-name", "sft_trainer",
        f"model.partial_pretrain={model}", f"data.train_files={data['train']}", f"data.val_files={data['val']}",
        f"trainer.default_local_dir={run_dir}", "data.prompt_key=prompt", "data.response_key=response",
        "data.max_length=24", "data.train_batch_size=16",
        "data.micro_batch_size_per_gpu=4", "optim.lr=3e-3", "trainer.total_epochs=1", "trainer.total_training_steps=2",
        "trainer.test_freq=1", "trainer.save_freq=-1", "trainer.export_hf_model=false", "trainer.logger=[file]",
        "trainer.max_val_samples=6", "generation.do_sample=false", "generation.max_new_tokens=10",
        "samples.history=true", "samples.report=false",
    ]


def test_sft_greedy_samples_ignore_the_hub_sampling_and_stop_at_its_second_eos(base_model, tiny_data, tmp_path):
    plain = with_generation_config(base_model, tmp_path / "plain", None)
    run_module("trainer.fsdp_sft_trainer", sft_args(plain, tiny_data, tmp_path / "run_plain"), nproc=2)
    expected = samples(tmp_path / "run_plain")
    assert sorted({s[0] for s in expected}) == [1, 2] and len(expected) == 12

    # A second EOS id: a character the plain run writes after the start of some generation (the
    # demo tokenizer has one token per character).
    texts = [s[3] for s in expected]
    stop_char = next(c for t in texts for c in t[1:] if not c.isspace())
    tok = AutoTokenizer.from_pretrained(base_model)
    hub = with_generation_config(base_model, tmp_path / "hub",
                                 {**HUB_SAMPLING, "eos_token_id": [tok.eos_token_id, tok.convert_tokens_to_ids(stop_char)]})
    run_module("trainer.fsdp_sft_trainer", sft_args(hub, tiny_data, tmp_path / "run_hub"), nproc=2)
    got = [s[:4] + s[5:] for s in samples(tmp_path / "run_hub")]
    # Greedy tokens unchanged by the file's penalties; each generation ends at its first stop character.
    assert got == [(step, stage, prompt, text.split(stop_char)[0], stopped or stop_char in text)
                   for step, stage, prompt, text, _, stopped in expected]
    assert any(stop_char in t for t in texts)
