"""scripts/verl_grpo_examples.py: verl's GRPO example scripts read as bash hands their command
line to Python, paths swapped, sizes scaled down; and what each one's command line resolves to
here (the scripts vendored in tests/verl_examples/, verl b178a3c). The runs themselves:
tests/distributed/test_verl_grpo_examples_run.py."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from config.loading import resolve
from config.rl_schema import RLConfig, lift_flat_sample_logging
from config.schema import ConfigError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import verl_grpo_examples as vge  # noqa: E402

VENDORED = ROOT / "tests" / "verl_examples"
SCRIPTS = vge.list_scripts(VENDORED, None)


def script(name: str) -> str:
    return vge.read_script(VENDORED, None, name)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return vge.make_assets(tmp_path_factory.mktemp("assets"))


def test_the_vendored_scripts_are_the_13_in_scope_and_the_rule_sorts_the_others():
    assert len(SCRIPTS) == 13 and all(vge.out_of_scope(n, script(n)) is None for n in SCRIPTS)
    assert vge.out_of_scope("run_x.sh", "python3 -m verl.trainer.main_ppo --config-name='ppo_megatron_trainer'") == "Megatron"
    assert vge.out_of_scope("run_qwen2_5_vl-7b.sh", "    data.image_key=images \\\n") == "vision-language"
    assert vge.out_of_scope("run_qwen2_5_7b_grpo_npu.sh", "python3 -m verl.trainer.main_ppo") == "NPU"
    assert vge.out_of_scope("run_x.sh", "trainer.device=npu") == "NPU"


def test_variables_lists_and_comments_expand_as_bash_would():
    env = {"HOME": "/home/u", "PWD": "/work"}
    math = vge.command_line(script("run_qwen2-7b_math.sh"), env)
    assert "data.train_files=['/home/u/data/gsm8k/train.parquet', '/home/u/data/math/train.parquet']" in math
    assert math[-1] == "trainer.total_epochs=15"  # `$@` without arguments adds no word
    rm = vge.command_line(script("run_mistral13b_skyworkrm_hhrlhf.sh"), env)
    # `test_files=... # no use`: the comment is not part of the value
    assert "data.val_files=data/full_hh_rlhf/rl/train.parquet" in rm
    assert "actor_rollout_ref.rollout.n=5" in rm and "actor_rollout_ref.rollout.tensor_model_parallel_size=4" in rm
    # a here-document (get_model.py) is skipped; `${model_dir}` and a variable the script expects exported
    oss = vge.command_line(script("run_gptoss_20b.sh"), {**env, "gsm8k_train_path": "/d/train.parquet"})
    assert oss[:2] == ["algorithm.adv_estimator=grpo", "data.train_files=/d/train.parquet"]
    assert "actor_rollout_ref.model.path=/home/u/models/gpt-oss-20b-bf16" in oss
    assert "+actor_rollout_ref.actor.fsdp_config.model_dtype=bfloat16" in oss


def test_positional_arguments_if_branches_and_the_splice_of_the_rest():
    env = {"HOME": "/home/u", "PWD": "/work"}
    default = vge.command_line(script("run_qwen2-7b_math_trtllm.sh"), env)
    assert "trainer.experiment_name=trtllm-qwen2-7b-tp4-8gpus" in default  # TP=${1:-4}
    assert "actor_rollout_ref.rollout.max_num_seqs=1024" in default  # the `if [ $TP -eq 4 ]` branch
    assert "data.train_files=['/work/data/gsm8k/train.parquet', '/work/data/math/train.parquet']" in default
    given = vge.command_line(script("run_qwen2-7b_math_trtllm.sh"), {**env, "EXP_NAME_SUFFIX": "x"}, ["2", "a=1", "b=2"])
    assert "trainer.experiment_name=trtllm-qwen2-7b-tp2-8gpus-x" in given  # ${X:+"-"}${X}
    assert "actor_rollout_ref.rollout.max_num_seqs=384" in given  # the else branch
    assert given[-2:] == ["a=1", "b=2"]  # "${@:2}"


def test_shell_words():
    sh = vge.Shell({"A": "x y"}, ["p q", "r"])
    assert sh.words('k="$A" k2=$A') == ["k=x y", "k2=x", "y"]  # unquoted expansions split
    assert sh.words("'$A' \"$@\" # gone") == ["$A", "p q", "r"]
    assert sh.words("${B:-d e}") == ["d", "e"] and sh.words('"${B:-d e}"') == ["d e"]
    with pytest.raises(vge.ShellError, match="command substitution"):
        sh.words("x=$(date)")


def test_paths_are_swapped_and_the_scale_down_comes_last(assets, tmp_path):
    args = vge.build_command(script("run_deepseek7b_llm_math.sh"), assets, tmp_path / "run", ["x=1"])
    value = dict(a.split("=", 1) for a in args)
    assert value["data.train_files"] == f"[{assets.root}/data/gsm8k/train.parquet,{assets.root}/data/math/train.parquet]"
    assert value["actor_rollout_ref.model.path"] == str(assets.model)
    tail = args[args.index("actor_rollout_ref.rollout.tensor_model_parallel_size=1"):]
    assert "trainer.n_gpus_per_node=8" in args and tail[-1] == "x=1"
    # the script's own sizes first, then ours: Hydra keeps the last
    assert args.index("data.train_batch_size=1024") < args.index("data.train_batch_size=2")
    assert "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2" in tail and "trainer.test_freq=2" in tail
    rm = vge.build_command(script("run_mistral13b_skyworkrm_hhrlhf.sh"), assets, tmp_path / "rm")
    assert f"reward_model.model.path={assets.reward_model}" in rm
    assert "trainer.test_freq=-1" in rm and "trainer.test_freq=2" not in rm  # a script that does not validate still does not
    adapter = vge.build_command(script("run_qwen2_5-3b_gsm8k_grpo_lora_from_adapter.sh"), assets, tmp_path / "a")
    assert f"actor_rollout_ref.model.lora_adapter_path={assets.adapter}" in adapter
    assert (assets.adapter / "adapter_config.json").is_file() and (assets.reward_model / "config.json").is_file()
    with pytest.raises(vge.ShellError, match="no local stand-in"):
        assets.data_file("~/data/geo3k/train.parquet")


def resolved(args):
    from trainer.cli import appends_as_overrides

    args = appends_as_overrides(args)  # what the command line does with verl's `+key=value`
    with initialize_config_module(config_module="config", version_base="1.3"):
        cfg = compose("grpo_trainer", overrides=list(args))
    return resolve(cfg, RLConfig, args, {}, 2, preprocess=lift_flat_sample_logging)


ENGINE_STOPS = {"run_gptoss_20b.sh": "sglang", "run_qwen2-7b_seq_balance.sh": "sglang", "run_qwen2-7b_math_trtllm.sh": "trtllm"}
DYNAMIC_BSZ = ("use_dynamic_bsz", "log_prob_use_dynamic_bsz")


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_scripts_command_line_here_resolves_or_stops_in_one_line(name, assets, tmp_path):
    args = vge.build_command(script(name), assets, tmp_path / "run")
    if name in ENGINE_STOPS:
        with pytest.raises(ConfigError) as err:
            resolved(args)
        message = str(err.value)
        assert "\n" not in message and f"actor_rollout_ref.rollout.name={ENGINE_STOPS[name]}:" in message
        assert "use actor_rollout_ref.rollout.name=vllm" in message
        return
    try:
        c = resolved(args).config
    except ConfigError as err:
        # token-budget micro-batches in RL are on their way; until then only they may stop a script
        refused = re.findall(r"(?:^|; )([\w.]+)=", str(err))
        assert refused and all(k.rsplit(".", 1)[-1] in DYNAMIC_BSZ for k in refused), str(err)
        return
    assert c.rollout.name == "vllm" and c.rollout.vllm.tensor_model_parallel_size == 1
    assert (c.data.prompts_per_step, c.rollout.responses_per_prompt, c.rollout.max_new_tokens) == (2, 2, 8)
    assert c.trainer.total_training_steps == 2 and c.model.partial_pretrain == str(assets.model)


AGENT_REPORT = """E1206 10:36:42.615000 29491 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 2) local_rank: 1
Traceback (most recent call last):
  File "torch/distributed/run.py", line 1, in <module>
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
"""


def test_outcomes_read_from_the_log():
    refused = "INFO x\n[rank 1] error: k=1: no (on vm)\nerror: k=1: no\n" + AGENT_REPORT
    assert vge.summarise(1, refused, 0) == "refused: k=1: no"  # torchrun's own traceback does not count
    crashed = "error: k=1\nTraceback (most recent call last):\n  File x\nRuntimeError: boom\n" + AGENT_REPORT
    assert vge.summarise(1, crashed, 0) == "failed (1): RuntimeError: boom"
    assert vge.summarise(0, "step 2: ...", 2) == "trained 2 steps"
    assert vge.summarise(0, "", 0) == "exited 0 without a training step"
