"""LoRA on the sharded model in this process (one rank): what the sample copy, the RL reference
and a bf16 compute dtype see, read from the trainer's own objects."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import workers.fsdp
from config.schema import ConfigError
from workers.lora import adapters_disabled, is_adapter_param
from workers.model import ModelLoadError
from test_sft_inprocess import make_trainer

INPUT_IDS = torch.tensor([[5, 17, 3, 42, 8, 11, 60, 2]])


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=INPUT_IDS, use_cache=False).logits.float()


def test_sample_copy_and_reference_see_the_adapters_as_trained(tiny_model, tiny_data, tmp_path):
    trainer = make_trainer(tiny_model, tiny_data, tmp_path / "run", "model.lora_rank=4", "model.lora_alpha=8",
                           "model.target_modules=[q_proj,v_proj,down_proj]", "optim.lr=5e-2", "trainer.max_val_samples=2")
    for index in range(2):
        trainer.train_step(trainer.batches.micro_batches(0, index))

    # Gradients and AdamW state for the adapters alone, every one of them.
    adapters = {n: p for n, p in trainer.model.named_parameters() if is_adapter_param(n)}
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == set(adapters)
    assert {n.split(".")[-4] for n in adapters} == {"q_proj", "v_proj", "down_proj"}
    state_elements = sum(t.numel() for s in trainer.optimizer.state.values() for k, t in s.items() if k != "step")
    assert state_elements == 2 * sum(p.numel() for p in adapters.values())  # exp_avg and exp_avg_sq

    trained = logits(trainer.model)
    base = logits(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32))
    assert not torch.allclose(trained, base, atol=1e-3)
    # Rank 0's generation copy carries the adapters: it computes what the sharded model computes.
    torch.testing.assert_close(logits(trainer.run.replica.refresh(trainer.model)), trained, rtol=0, atol=1e-5)
    # The RL reference: the same sharded model with its adapters off is the base, and they come back on.
    with adapters_disabled(trainer.model):
        torch.testing.assert_close(logits(trainer.model), base, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(trainer.model), trained, rtol=0, atol=0)
    assert all(p.requires_grad for p in adapters.values())

    # A LoRA checkpoint does not resume a full fine-tuning run: one line naming the key.
    trainer.run.position.global_step = 2  # train_step, unlike fit, leaves the count to its caller
    trainer.save_checkpoint()
    with pytest.raises(ConfigError, match=r"^model.lora_rank: .*global_step_2 holds a LoRA-adapted model; resume it with"):
        make_trainer(tiny_model, tiny_data, tmp_path / "full", f"trainer.resume_from_path={tmp_path / 'run' / 'global_step_2'}")

    # model.lora_adapter_path: a new run starts from the exported adapter (its rank and targets).
    trainer.run.checkpointer.export_hf_model(trainer.model, tmp_path / "adapter")
    again = make_trainer(tiny_model, tiny_data, tmp_path / "again", f"model.lora_adapter_path={tmp_path / 'adapter'}",
                         "trainer.max_val_samples=0")
    assert {n for n, p in again.model.named_parameters() if p.requires_grad} == set(adapters)
    torch.testing.assert_close(logits(again.model), trained, rtol=0, atol=1e-5)
    # An adapter that does not fit (here: one matrix of another rank) is named before any model loads.
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    key = next(k for k in weights if "q_proj.lora_A" in k)
    weights[key] = torch.zeros(3, weights[key].shape[1])
    save_file(weights, tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(ModelLoadError, match=r"^model.lora_adapter_path=.*: the adapter does not fit this model \(.*q_proj"
                                             r"\.lora_A\.default\.weight: \(3, 32\) in the adapter, \(4, 32\) here\)$"):
        make_trainer(tiny_model, tiny_data, tmp_path / "third", f"model.lora_adapter_path={tmp_path / 'adapter'}")


def test_frozen_base_is_kept_in_the_compute_dtype(tiny_model, tiny_data, tmp_path):
    trainer = make_trainer(tiny_model, tiny_data, tmp_path / "run", "model.lora_rank=4", "model.fsdp_config.param_dtype=bf16",
                           "optim.lr=5e-2", "trainer.max_val_samples=0")
    dtypes = {n: p.dtype for n, p in trainer.model.named_parameters()}
    assert {d for n, d in dtypes.items() if is_adapter_param(n)} == {torch.float32}  # fp32 master weights of what trains
    assert {d for n, d in dtypes.items() if not is_adapter_param(n)} == {torch.bfloat16}  # half the memory of the base
    first = trainer.train_step(trainer.batches.micro_batches(0, 0))
    second = trainer.train_step(trainer.batches.micro_batches(0, 1))
    assert torch.isfinite(first["train/grad_norm"]) and first["train/grad_norm"] > 0
    assert torch.isfinite(torch.as_tensor(second["train/loss"]))  # trains: not NaN, not inf


def test_target_modules_that_match_nothing_are_named_before_the_model_loads(tiny_model, tiny_data, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(workers.fsdp, "load_pretrained", never)
    with pytest.raises(ModelLoadError, match=r"^model.target_modules=\{'qkv_fused'\}: Target modules \{'qkv_fused'\} not found"):
        make_trainer(tiny_model, tiny_data, tmp_path / "run", "model.lora_rank=4", "model.target_modules=[qkv_fused]")


@pytest.mark.parametrize("lora_rank, models_built", [(4, 1), (0, 2)])
def test_rl_with_lora_builds_no_reference_model(lora_rank, models_built, tiny_model, rl_data, tmp_path, monkeypatch):
    import trainer.rl_trainer as rl
    from config.env import DistEnv
    from trainer.api import create_rl_trainer
    from trainer.distributed import init_distributed

    built = []
    real = rl.build_sharded_model

    def counted(*args, **kwargs):
        built.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(rl, "build_sharded_model", counted)
    config = create_rl_trainer(model_name=str(tiny_model), dataset_name=str(rl_data["dir"]), algorithm="grpo", batch_size=4,
                               **{"trainer.default_local_dir": str(tmp_path / "run"), "model.lora_rank": lora_rank,
                                  "algorithm.kl_coef": 0.1, "rollout.responses_per_prompt": 2}).config
    trainer = rl.RLTrainer(config, init_distributed(DistEnv(0, 0, 1, False), "cpu"))
    assert len(built) == models_built  # the actor, and without LoRA a frozen reference beside it
    assert (trainer.reference is None) == (lora_rank > 0)
