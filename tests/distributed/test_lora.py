"""LoRA on FSDP2 on 2 gloo ranks: verl's own LoRA scripts, paths swapped.

SFT: verl's `run_qwen_05_peft.sh` trains 4 steps with a checkpoint (with `hf_model`) at 2 and 4
and exports the adapter and the merged model; a second run resumes from step 2. One run serves every SFT test:
  frozen base and optimizer state for the adapters alone (read from the checkpoint itself),
  exact resume, and the exports giving the trained model's logits with plain peft/transformers.
RL: verl's `run_qwen2_5-3b_gsm8k_grpo_lora.sh`, with the keys that have no meaning here dropped
(what its one-line error asks), trains 2 steps: the KL to the reference (the base with the
adapters off) is 0 before the first update and not after it.
"""

import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForCausalLM

from helpers import gsm8k_rows, read_metrics, run_module, write_parquet
from trainer.checkpoint import load_model_state
from trainer.export import export
from verl_scripts import GRPO_SCRIPTS, SFT_SCRIPTS, command_line, without
from workers.lora import LoraSpec, add_adapters, is_adapter_param

pytestmark = pytest.mark.distributed
SFT = "trainer.fsdp_sft_trainer"
PROMPT_IDS = torch.tensor([[5, 17, 3, 42, 8, 11, 60, 2, 9, 33]])


@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory):
    root = tmp_path_factory.mktemp("gsm8k_lora")
    return {"train": write_parquet(gsm8k_rows(48, seed=5), root / "train.parquet"),
            "test": write_parquet(gsm8k_rows(8, seed=6), root / "test.parquet")}


def peft_script(tiny_model, gsm8k, run_dir, *extra):
    paths = {"$HOME/data/gsm8k/train.parquet": str(gsm8k["train"]), "$HOME/data/gsm8k/test.parquet": str(gsm8k["test"]),
             "$save_path": str(run_dir), "Qwen/Qwen2.5-0.5B-Instruct": str(tiny_model)}
    # What a user passes in `$@` to try it small: 4 steps of 8 sequences, 2 samples, checkpoints at 2 and 4.
    # The script's lr (1e-4) barely moves a tiny random model in 4 steps; 1e-2 makes the adapters count.
    return command_line(SFT_SCRIPTS["gsm8k/run_qwen_05_peft.sh"], paths,
                        ["data.train_batch_size=8", "trainer.total_training_steps=4", "trainer.save_freq=2",
                         "trainer.max_val_samples=2", "generation.max_new_tokens=4", "model.lora_export_merged=true",
                         "optim.lr=1e-2", *extra])


@pytest.fixture(scope="module")
def sft_runs(tiny_model, gsm8k, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_sft")
    full, resumed = root / "full", root / "resumed"
    proc = run_module(SFT, peft_script(tiny_model, gsm8k, full, "trainer.checkpoint.save_contents=[model,optimizer,extra,hf_model]"),
                      nproc=2)
    run_module(SFT, peft_script(tiny_model, gsm8k, resumed, "trainer.resume_mode=resume_path",
                                f"trainer.resume_from_path={full / 'global_step_2'}", "trainer.export_hf_model=false"), nproc=2)
    return {"full": full, "resumed": resumed, "log": proc.stdout + proc.stderr, "root": root}


def adapted(base_dir, state) -> torch.nn.Module:
    """The trained model as training held it: the base with the same adapters, the checkpoint's state."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    add_adapters(model, LoraSpec(32, 16, "all-linear"), load_weights=False)
    model.load_state_dict(state, strict=False)
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROMPT_IDS).logits


def test_verl_peft_script_trains_adapters_only(sft_runs, tiny_model):
    full, log = sft_runs["full"], sft_runs["log"]
    metrics = read_metrics(full)
    assert all("train/loss" in metrics[s] for s in (1, 2, 3, 4)) and "val/loss" in metrics[4]
    assert "=== Validation Samples (Step 4) ===" in log  # rank 0's copy took the adapters (else: unexpected keys)
    assert re.search(r"LoRA \(rank 32, alpha 16, targets all-linear\): [\d.]+M trainable parameters", log), log[-3000:]

    # The checkpoint itself: AdamW state exists for the adapters alone, every adapter has it.
    metadata = FileSystemReader(str(full / "global_step_2")).read_metadata().state_dict_metadata
    model_keys = {k.removeprefix("model.") for k in metadata if k.startswith("model.")}
    optim_params = {k.removeprefix("optim.state.").rsplit(".", 1)[0] for k in metadata if k.startswith("optim.state.")}
    adapters = {k for k in model_keys if is_adapter_param(k)}
    assert adapters and optim_params == adapters, sorted(optim_params ^ adapters)[:4]
    assert any(k.endswith("base_layer.weight") for k in model_keys)

    # The base is frozen: at step 4 its weights are the original ones; the adapters moved.
    state = load_model_state(full / "global_step_4")
    original = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    for key, value in state.items():
        if is_adapter_param(key):
            continue
        assert torch.equal(value, original[key.replace(".base_layer.", ".")]), key
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in state.items())


def test_resume_continues_with_the_same_losses(sft_runs):
    want, got = read_metrics(sft_runs["full"]), read_metrics(sft_runs["resumed"])
    assert sorted(s for s in got if "train/loss" in got[s]) == [3, 4]
    for step in (3, 4):
        assert got[step]["train/loss"] == pytest.approx(want[step]["train/loss"], rel=1e-6, abs=1e-7), step
        assert got[step]["train/grad_norm"] == pytest.approx(want[step]["train/grad_norm"], rel=1e-5), step


def test_exports_give_the_trained_models_logits(sft_runs, tiny_model):
    full = sft_runs["full"]
    trained = logits(adapted(tiny_model, load_model_state(full / "global_step_4")))
    base = logits(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval())
    assert not torch.allclose(trained, base, atol=1e-3)  # the adapters changed the model

    adapter_dir = full / "hf_model"
    assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "adapter_model.safetensors").is_file()
    assert all(is_adapter_param(k) for k in load_file(adapter_dir / "adapter_model.safetensors"))  # the adapter alone
    with_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), adapter_dir)
    torch.testing.assert_close(logits(with_peft.eval()), trained, rtol=0, atol=1e-5)
    # transformers follows adapter_config.json to the base and loads the adapter onto it.
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(adapter_dir).eval()), trained, rtol=0, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(full / "hf_model_merged", dtype=torch.float32).eval()
    assert not any(is_adapter_param(k) for k in merged.state_dict())
    torch.testing.assert_close(logits(merged), trained, rtol=0, atol=1e-5)

    # A checkpoint's huggingface/ with hf_model: the base's config and the adapter of that step.
    step_2 = full / "global_step_2" / "huggingface"
    assert (step_2 / "config.json").is_file() and (step_2 / "adapter_model.safetensors").is_file()
    at_2 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), step_2).eval()
    torch.testing.assert_close(logits(at_2), logits(adapted(tiny_model, load_model_state(full / "global_step_2"))),
                               rtol=0, atol=1e-5)

    # python -m trainer.export on the checkpoint: the same adapter, and with --merge the same merged model.
    out = sft_runs["root"] / "exported"
    export(full / "global_step_4", out / "adapter")
    export(full / "global_step_4", out / "merged", merge=True)
    assert load_file(out / "adapter" / "adapter_model.safetensors").keys() == load_file(adapter_dir / "adapter_model.safetensors").keys()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out / "merged").eval()), trained, rtol=0, atol=1e-5)


def test_verl_grpo_lora_script_reference_is_the_base(tiny_model, gsm8k, tmp_path):
    run_dir = tmp_path / "grpo_lora"
    paths = {"$HOME/data/gsm8k/train.parquet": str(gsm8k["train"]), "$HOME/data/gsm8k/test.parquet": str(gsm8k["test"]),
             "Qwen/Qwen2.5-3B-Instruct": str(tiny_model)}
    # `$@`: 4 prompts a step, 4-token responses, 2 steps; a length reward so that groups differ.
    args = command_line(GRPO_SCRIPTS["run_qwen2_5-3b_gsm8k_grpo_lora.sh"], paths, [
        "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4", "data.max_response_length=4",
        "trainer.total_training_steps=2", f"trainer.default_local_dir={run_dir}", "trainer.logger=[console,file]",
        "actor_rollout_ref.actor.optim.lr=1e-2",
        "reward.functions=[{name: short, fn: length_penalty, kwargs: {max_chars: 2}}]"])
    # What the one-line error asks: drop the vLLM knobs (use_remove_padding stays: accepted in RL).
    args = without(args, "actor_rollout_ref.rollout.name", "actor_rollout_ref.rollout.tensor_model_parallel_size",
                   "actor_rollout_ref.rollout.gpu_memory_utilization", "actor_rollout_ref.rollout.load_format",
                   "actor_rollout_ref.rollout.layered_summon")
    proc = run_module("trainer.rl_trainer", ["--config-name", "grpo_trainer", *args], nproc=2)
    log = proc.stdout + proc.stderr
    assert "LoRA on the actor (rank 64, alpha 32, targets all-linear)" in log
    assert "reference = the actor's base with adapters disabled" in log and "frozen reference" not in log  # no copy built
    metrics = read_metrics(run_dir)
    # Step 1 updates from the base itself: KL 0. After it the adapters differ from zero: KL > 0.
    assert metrics[1]["actor/kl_loss"] == pytest.approx(0.0, abs=1e-7)
    assert metrics[2]["actor/kl_loss"] > 1e-6, metrics[2]
    assert (run_dir / "hf_model" / "adapter_model.safetensors").is_file()
