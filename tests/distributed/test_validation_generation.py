"""Validation samples on 2 gloo ranks: the seed document's examples, end to end."""

import json
import re

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import read_metrics, run_module, write_lm_eval_tasks
from workers.generation import GenerationSettings, encode_prompts, generate

pytestmark = pytest.mark.distributed
MODULE = "trainer.fsdp_sft_trainer"
BLOCK = re.compile(r"=== Validation Samples \(Step (\d+)\) ===\n((?:Prompt \d+: .*\nGeneration \d+: .*\n-{50}\n)+)")


def blocks(stdout: str) -> dict[int, list[tuple[str, str]]]:
    found = {}
    for step, body in BLOCK.findall(stdout):
        pairs = re.findall(r"Prompt (\d+): (.*)\nGeneration \1: (.*)\n", body)
        found[int(step)] = [(p, g) for _, p, g in pairs]
    return found


def base_args(model, data, run_dir):
    return [
        "--config-name", "sft_trainer_with_generation",
        f"model.partial_pretrain={model}", f"data.train_files={data['train']}", f"data.val_files={data['val']}",
        f"trainer.default_local_dir={run_dir}", "data.prompt_key=prompt", "data.response_key=response",
        "data.max_length=24", "data.train_batch_size=16",
        "data.micro_batch_size_per_gpu=4", "trainer.total_training_steps=3", "trainer.test_freq=2", "optim.lr=3e-3",
    ]


def test_env_variables_of_the_document_with_precedence(tiny_model, tiny_data, tmp_path):
    env = {
        "VERL_GENERATION_TEMPERATURE": "0.9",
        "VERL_GENERATION_TOP_K": "40",
        "VERL_GENERATION_TOP_P": "0.8",
        "VERL_GENERATION_DO_SAMPLE": "true",
        "VERL_GENERATION_MAX_NEW_TOKENS": "2",
        "VERL_MAX_VAL_SAMPLES": "3",
        "VERL_SFT_LOGGING_LEVEL": "DEBUG",
    }
    run_dir = tmp_path / "run"
    proc = run_module(MODULE, [*base_args(tiny_model, tiny_data, run_dir), "generation.top_k=7"], nproc=2, env=env)
    found = blocks(proc.stdout)
    # Each validation (step 2 by test_freq) and the early exit at total_training_steps (3).
    assert sorted(found) == [2, 3]
    assert all(len(samples) == 3 for samples in found.values())  # VERL_MAX_VAL_SAMPLES
    # The same prompts every time, and never the reference answer in them.
    assert [p for p, _ in found[2]] == [p for p, _ in found[3]]
    assert all(p.endswith("=") for p, _ in found[2])
    # Settings in force: env over YAML, command line (top_k=7) over env.
    assert "sampling, temperature=0.9, top_k=7, top_p=0.8, max_new_tokens=2" in proc.stderr
    assert "generation.temperature set from environment variable VERL_GENERATION_TEMPERATURE" in proc.stderr
    assert "generation.top_k: environment variable VERL_GENERATION_TOP_K ignored, the command line sets it" in proc.stderr
    assert re.search(r"validation samples: gather [\d.]+s, generation [\d.]+s", proc.stderr)
    metrics = read_metrics(run_dir)
    assert metrics[3]["val/samples_generated"] == 3.0
    assert metrics[3]["val/mean_generation_tokens"] <= 2.0  # max_new_tokens holds
    assert "val/generation_time_s" in metrics[3]
    # The live report: rewritten after each validation (its time logged), then marked finished.
    assert metrics[2]["val/report_time_s"] > 0 and metrics[3]["val/report_time_s"] > 0
    state = json.loads((run_dir / "run_state.json").read_text())
    assert (state["status"], state["total_steps"]) == ("finished", 3)
    page = (run_dir / "report.html").read_text()
    assert 'data-cols="2"' in page and 'data-rows="3"' in page and "finished: step 3 of 3 (100%)" in page


def test_greedy_samples_from_the_gathered_copy_equal_the_exported_model(tiny_model, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    env = {"VERL_GENERATION_DO_SAMPLE": "false", "VERL_GENERATION_MAX_NEW_TOKENS": "6", "VERL_MAX_VAL_SAMPLES": "4"}
    proc = run_module(MODULE, base_args(tiny_model, tiny_data, run_dir), nproc=2, env=env)
    final = blocks(proc.stdout)[3]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model")
    tok = AutoTokenizer.from_pretrained(run_dir / "hf_model")
    prompts = [p for p, _ in final]
    out = generate(model, tok, encode_prompts(tok, prompts), GenerationSettings(max_new_tokens=6, do_sample=False))
    assert [g for _, g in final] == [o.text for o in out]
    # And the same as plain transformers greedy decoding, prompt by prompt.
    for prompt, (_, shown) in zip(prompts, final):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        plain = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert tok.decode(plain[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == shown


def test_k_samples_and_lm_eval_on_two_ranks_repeat_after_a_resume(tiny_model, tiny_data, tmp_path):
    pytest.importorskip("lm_eval", reason="the [eval] extra")
    tasks = write_lm_eval_tasks(tmp_path / "tasks")
    common = ["trainer.total_training_steps=4", "trainer.test_freq=1", "trainer.save_freq=2", "trainer.max_val_samples=3",
              "generation.max_new_tokens=4", "generation.num_samples_per_prompt=4", "generation.also_greedy=true",
              "eval.every_n_validations=2", "eval.lm_eval.tasks=[sat_tiny_mc,sat_tiny_gen]",
              f"eval.lm_eval.include_path={tasks}", "trainer.export_hf_model=false"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_module(MODULE, [*base_args(tiny_model, tiny_data, full), *common], nproc=2)
    metrics = read_metrics(full)
    for step in (1, 2, 3, 4):
        for name in ("exact_match", "last_number_match"):
            assert metrics[step][f"val/metric/{name}/pass@4"] >= metrics[step][f"val/metric/{name}/mean@4"]
    assert [s for s in sorted(metrics) if "eval/sat_tiny_mc/acc" in metrics[s]] == [2, 4]
    run_module(MODULE, [*base_args(tiny_model, tiny_data, resumed), *common, "trainer.resume_mode=resume_path",
                        f"trainer.resume_from_path={full / 'global_step_2'}"], nproc=2)

    def samples(run_dir, step):
        rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
        return [(r["prompt_id"], r["generation"]) for r in rows if r["kind"] == "sample" and r["step"] == step]

    for step in (3, 4):
        assert len(samples(full, step)) == 3 * 5 and samples(resumed, step) == samples(full, step)
    # The resumed process counts its own validations: lm-eval at its 2nd, step 4, as the full run's.
    assert [s for s in sorted(read_metrics(resumed)) if "eval/sat_tiny_gen/exact_match" in read_metrics(resumed)[s]] == [4]
