"""verl's GRPO example scripts run as its users run them, through scripts/verl_grpo_examples.py:
the script text itself (vendored in tests/verl_examples/, verl b178a3c), its paths swapped for
tiny stand-ins, scaled down at the end of the command line, 2 gloo ranks.

The vLLM one runs in the engine's venv (`pytest -m vllm`, .ci/run) and is skipped elsewhere.
"""

import sys

import pytest

from helpers import NEEDS_VLLM, ROOT, read_metrics

sys.path.insert(0, str(ROOT / "scripts"))
import verl_grpo_examples as vge  # noqa: E402

pytestmark = pytest.mark.distributed
VENDORED = ROOT / "tests" / "verl_examples"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return vge.make_assets(tmp_path_factory.mktemp("assets"))


def run(name, assets, work, extra=()):
    return vge.run_one(name, vge.read_script(VENDORED, None, name), assets, work, sys.executable, 600, extra)


def test_the_sglang_script_stops_in_one_line_before_any_model_is_built(assets, tmp_path):
    row = run("run_gptoss_20b.sh", assets, tmp_path)
    assert row.engine == "sglang" and row.returncode != 0
    # one line on rank 0, naming the engine and what to use instead; verl's `+key=value` appends of
    # keys the config has are plain overrides (no Hydra "Could not append" error)
    assert row.outcome.startswith("refused: ") and "\n" not in row.outcome
    assert "actor_rollout_ref.rollout.name=sglang: SGLang is not available here; use actor_rollout_ref.rollout.name=vllm" in row.outcome
    log = (tmp_path / "logs" / "run_gptoss_20b.log").read_text()
    assert "Could not append" not in log and "validation at step" not in log
    assert not (tmp_path / "runs" / "run_gptoss_20b" / "metrics.jsonl").exists()


@pytest.mark.vllm
@NEEDS_VLLM
def test_verls_qwen2_7b_grpo_script_trains_on_the_vllm_engine(assets, tmp_path):
    # The stand-in model is random: its sums are never right, so the script's GSM8K reward is 0 for
    # every response and GRPO's advantages are 0. A length reward makes the groups differ, so the
    # update moves the weights and the pushed weights matter.
    row = run("run_qwen2-7b.sh", assets, tmp_path, ["reward.functions=[{name: chars, fn: length_chars}]"])
    assert row.engine == "vllm" and row.outcome == "trained 2 steps", row.outcome
    log = (tmp_path / "logs" / "run_qwen2-7b.log").read_text()
    assert "actor_rollout_ref.rollout.name=vllm (verl): read as rollout.name=vllm" in log
    assert "actor_rollout_ref.rollout.tensor_model_parallel_size=1 (verl): read as rollout.vllm.tensor_model_parallel_size=1" in log
    assert "vLLM engine built" in log and "held-out rewards (greedy), step 0 -> 2" in log
    metrics = read_metrics(tmp_path / "runs" / "run_qwen2-7b")
    for step in (1, 2):
        assert 0 < metrics[step]["train/response_length"] <= 8  # data.max_response_length=8, appended
    assert any(metrics[step]["actor/grad_norm"] > 0 for step in (1, 2))
    assert "val/reward/chars" in metrics[0] and "val/reward/chars" in metrics[2]  # test_freq scaled to the last step
