"""The shared-prompt forward (each distinct prompt once, then the responses) on a model really
sharded over 2 gloo ranks gives the plain forward's log-probs and gradients. tests/unit/test_actor.py
checks it on one rank, where every shard is the whole model and no all-gather runs between the forwards."""

import json

import pytest

from helpers import ROOT, run_module

pytestmark = pytest.mark.distributed


def test_shared_prompt_forward_with_two_shards_per_model_gives_the_plain_gradients(tiny_model, tmp_path):
    out = tmp_path / "report.json"
    run_module("shared_prompts_worker", [str(tiny_model), str(out)], nproc=2, cwd=tmp_path,
               env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests' / 'distributed'}"})
    got = json.loads(out.read_text())
    assert got["world_size"] == 2 and got["sharded_params"] >= got["params"] - 1  # (a 1-row tensor cannot split)
    assert got["max_log_prob_diff"] <= 1e-5, got
    assert got["max_grad"] > 0 and got["max_grad_diff"] <= 1e-5 * max(1.0, got["max_grad"]), got
