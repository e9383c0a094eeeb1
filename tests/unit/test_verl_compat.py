"""verl users' command lines and defaults: the base configs carry verl's defaults, verl's keys
mean here what they meant there (or are refused in one line saying why), and verl's own
example scripts compose unchanged but for the model and data paths."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from config.loading import resolve
from config.rl_schema import RLConfig, lift_flat_sample_logging
from config.schema import ConfigError, SFTConfig
from config.verl import PPO_KEYS, SFT_KEYS
from helpers import gsm8k_rows, multiturn_rows, write_parquet
from verl_scripts import GRPO_KEYS_USED, GRPO_SCRIPTS, PPO_SCRIPTS, SFT_LORA, SFT_NEEDS_GPU, SFT_NOT_YET, SFT_SCRIPTS, command_line, without

ROOT = Path(__file__).resolve().parents[2]

# verl/trainer/config/sft_trainer.yaml composed with optim/fsdp.yaml (verl b178a3c): every key.
VERL_SFT_DEFAULTS = {
    "data.train_batch_size": 256, "data.micro_batch_size": None, "data.micro_batch_size_per_gpu": 4,
    "data.train_files": "~/data/gsm8k/train.parquet", "data.val_files": "~/data/gsm8k/test.parquet",
    "data.train_max_samples": -1, "data.val_max_samples": -1, "data.prompt_key": "question", "data.response_key": "answer",
    "data.prompt_dict_keys": None, "data.response_dict_keys": None, "data.multiturn.enable": False,
    "data.multiturn.messages_key": "messages", "data.multiturn.tools_key": "tools",
    "data.multiturn.enable_thinking_key": "enable_thinking", "data.max_length": 1024, "data.truncation": "error",
    "data.balance_dp_token": False, "data.chat_template": None, "data.custom_cls.path": None, "data.custom_cls.name": None,
    "data.use_shm": False, "data.apply_chat_template_kwargs": {},
    "model.partial_pretrain": "~/models/gemma-1.1-7b-it", "model.use_shm": False, "model.fsdp_config.model_dtype": "fp32",
    "model.fsdp_config.wrap_policy.min_num_params": 0, "model.fsdp_config.cpu_offload": False,
    "model.fsdp_config.offload_params": False, "model.external_lib": None, "model.enable_gradient_checkpointing": True,
    "model.trust_remote_code": False, "model.lora_rank": 0, "model.lora_alpha": 16, "model.target_modules": "all-linear",
    "model.use_liger": False, "model.strategy": "fsdp2",
    "optim.optimizer": "AdamW", "optim.optimizer_impl": "torch.optim", "optim.lr": 1e-5, "optim.lr_warmup_steps_ratio": 0.1,
    "optim.total_training_steps": -1, "optim.weight_decay": 0.01, "optim.lr_warmup_steps": -1, "optim.betas": [0.9, 0.95],
    "optim.clip_grad": 1.0, "optim.min_lr_ratio": 0.0, "optim.num_cycles": 0.5, "optim.warmup_style": None,
    "optim.override_optimizer_config": None, "optim.lr_scheduler": "cosine",
    "ulysses_sequence_parallel_size": 1, "use_remove_padding": False,
    "trainer.default_local_dir": "checkpoints/gsm8k-sft/test",  # verl: checkpoints/${project_name}/${experiment_name}
    "trainer.default_hdfs_dir": None, "trainer.project_name": "gsm8k-sft", "trainer.experiment_name": "test",
    "trainer.total_epochs": 4, "trainer.total_training_steps": None, "trainer.seed": 1, "trainer.save_freq": -1,
    "trainer.test_freq": -1, "trainer.nnodes": 1, "trainer.n_gpus_per_node": 8, "trainer.max_ckpt_to_keep": None,
    "trainer.resume_mode": "auto", "trainer.resume_from_path": None,
}
# Kept different on purpose; docs/coming-from-verl.md says each and why.
SFT_DIFFERENT = {
    "trainer.logger": (["console", "wandb"], ["console"]),  # W&B needs an account
    "trainer.device": ("cuda", "auto"),  # CPU machines too
    # verl's SFT trainer never reads lr_scheduler_type (it is optim/fsdp.yaml's `constant`); here it
    # is a name of lr_scheduler, so it stays unset rather than turning the cosine off.
    "optim.lr_scheduler_type": ("constant", None),
}

# verl's PPO trainer (verl/trainer/config/ppo_trainer.yaml, b178a3c) where a key means the same
# as one of ours: verl key -> (verl default, our key, our value in ppo_trainer).
VERL_PPO_SAME = {
    "data.train_files": ("~/data/rlhf/gsm8k/train.parquet", "data.train_files", "~/data/rlhf/gsm8k/train.parquet"),
    "data.val_files": ("~/data/rlhf/gsm8k/test.parquet", "data.val_files", "~/data/rlhf/gsm8k/test.parquet"),
    "data.prompt_key": ("prompt", "data.prompt_key", "prompt"),
    "data.max_prompt_length": (512, "data.max_prompt_length", 512),
    "data.max_response_length": (512, "rollout.max_new_tokens", 512),
    "data.train_batch_size": (1024, "data.prompts_per_step", 1024),
    "data.shuffle": (True, "data.shuffle", True),
    "data.truncation": ("error", "data.truncation", "error"),
    "data.filter_overlong_prompts": (False, "data.filter_overlong_prompts", False),
    "data.apply_chat_template_kwargs": ({}, "data.apply_chat_template_kwargs", {}),
    "actor_rollout_ref.model.path": ("~/models/deepseek-llm-7b-chat", "model.partial_pretrain", "~/models/deepseek-llm-7b-chat"),
    "actor_rollout_ref.model.enable_gradient_checkpointing": (True, "model.enable_gradient_checkpointing", True),
    "actor_rollout_ref.model.trust_remote_code": (False, "model.trust_remote_code", False),
    "actor_rollout_ref.actor.optim.lr": (1e-6, "optim.lr", 1e-6),
    "actor_rollout_ref.actor.optim.betas": ([0.9, 0.999], "optim.betas", [0.9, 0.999]),
    "actor_rollout_ref.actor.optim.weight_decay": (0.01, "optim.weight_decay", 0.01),
    "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio": (0.0, "optim.lr_warmup_steps_ratio", 0.0),
    "actor_rollout_ref.actor.optim.lr_warmup_steps": (-1, "optim.lr_warmup_steps", -1),
    "actor_rollout_ref.actor.optim.lr_scheduler_type": ("constant", "optim.lr_scheduler", "constant"),
    "actor_rollout_ref.actor.optim.min_lr_ratio": (0.0, "optim.min_lr_ratio", 0.0),
    "actor_rollout_ref.actor.optim.num_cycles": (0.5, "optim.num_cycles", 0.5),
    "actor_rollout_ref.actor.grad_clip": (1.0, "optim.clip_grad", 1.0),
    "actor_rollout_ref.actor.ppo_mini_batch_size": (256, "actor.mini_batches_per_step", 4),  # 1024 / 256
    "actor_rollout_ref.actor.ppo_epochs": (1, "actor.ppo_epochs", 1),
    "actor_rollout_ref.actor.clip_ratio_low": (0.2, "algorithm.clip_ratio_low", 0.2),
    "actor_rollout_ref.actor.clip_ratio_high": (0.2, "algorithm.clip_ratio_high", 0.2),
    "actor_rollout_ref.actor.clip_ratio_c": (3.0, "algorithm.clip_ratio_c", 3.0),
    "actor_rollout_ref.actor.loss_agg_mode": ("token-mean", "algorithm.loss_agg_mode", "token-mean"),
    "actor_rollout_ref.actor.policy_loss.loss_mode": ("vanilla", "algorithm.policy_loss", "vanilla"),
    "actor_rollout_ref.actor.use_kl_loss": (False, "algorithm.kl_coef", 0.0),
    "actor_rollout_ref.actor.kl_loss_type": ("low_var_kl", "algorithm.kl_estimator", "k3"),
    "actor_rollout_ref.actor.fsdp_config.param_offload": (False, "model.fsdp_config.cpu_offload", False),
    "actor_rollout_ref.ref.fsdp_config.param_offload": (False, "ref.cpu_offload", False),
    "actor_rollout_ref.rollout.n": (1, "rollout.responses_per_prompt", 1),
    "actor_rollout_ref.rollout.temperature": (1.0, "rollout.temperature", 1.0),
    "actor_rollout_ref.rollout.top_k": (-1, "rollout.top_k", 0),  # off either way
    "actor_rollout_ref.rollout.top_p": (1.0, "rollout.top_p", 1.0),
    "actor_rollout_ref.rollout.val_kwargs.do_sample": (False, "rollout.val_do_sample", False),
    "algorithm.adv_estimator": ("gae", "algorithm.adv_estimator", "gae"),
    "algorithm.gamma": (1.0, "algorithm.gamma", 1.0),
    "algorithm.lam": (1.0, "algorithm.lam", 1.0),
    "algorithm.norm_adv_by_std_in_grpo": (True, "algorithm.norm_adv_by_std_in_grpo", True),
    "critic.optim.lr": (1e-5, "critic.lr", 1e-5),
    "critic.cliprange_value": (0.5, "critic.cliprange_value", 0.5),
    "trainer.critic_warmup": (0, "critic.warmup_steps", 0),
    "trainer.total_epochs": (30, "trainer.total_epochs", 30),
    "trainer.total_training_steps": (None, "trainer.total_training_steps", None),
    "trainer.project_name": ("verl_examples", "trainer.project_name", "verl_examples"),
    "trainer.save_freq": (-1, "trainer.save_freq", -1),
    "trainer.test_freq": (-1, "trainer.test_freq", -1),
    "trainer.val_before_train": (True, "trainer.val_before_train", True),
    "trainer.resume_mode": ("auto", "trainer.resume_mode", "auto"),
    "trainer.max_actor_ckpt_to_keep": (None, "trainer.max_ckpt_to_keep", None),
}


def composed(name: str, overrides=()):
    with initialize_config_module(config_module="config", version_base="1.3"):
        return compose(name, overrides=list(overrides))


def sft(overrides=(), world_size=1, name="sft_trainer"):
    return resolve(composed(name, overrides), SFTConfig, overrides, {}, world_size)


def rl(overrides=(), world_size=1, name="grpo_trainer"):
    return resolve(composed(name, overrides), RLConfig, overrides, {}, world_size, preprocess=lift_flat_sample_logging)


def select(cfg, key):
    value = OmegaConf.select(cfg, key, default="<absent>")
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory):
    root = tmp_path_factory.mktemp("gsm8k")
    return {"train": write_parquet(gsm8k_rows(48, seed=5), root / "train.parquet"),
            "test": write_parquet(gsm8k_rows(8, seed=6), root / "test.parquet")}


@pytest.fixture(scope="module")
def multiturn(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiturn")
    return {"train": write_parquet(multiturn_rows(24, seed=7), root / "train.parquet"),
            "test": write_parquet(multiturn_rows(4, seed=8), root / "test.parquet")}


def paths_for(model, gsm8k, multiturn, run_dir):
    paths = {"$HOME/data/gsm8k/train.parquet": str(gsm8k["train"]), "$HOME/data/gsm8k/test.parquet": str(gsm8k["test"]),
             "$HOME/data/multiturn/train.parquet": str(multiturn["train"]),
             "$HOME/data/multiturn/test.parquet": str(multiturn["test"]), "$save_path": str(run_dir)}
    for hub_id in ("deepseek-ai/deepseek-coder-6.7b-instruct", "google/gemma-2b-it", "google/gemma-1.1-7b-it",
                   "Qwen/Qwen3-8B", "Qwen/Qwen2.5-0.5B-Instruct", "ByteDance-Seed/Seed-OSS-36B-Base",
                   "Qwen/Qwen2-7B-Instruct", "Qwen/Qwen2.5-3B-Instruct"):
        paths[hub_id] = str(model)
    return paths


# ----------------------------------------------------------------------------- defaults
def test_sft_base_carries_verls_defaults():
    cfg = composed("sft_trainer")
    wrong = {k: (v, select(cfg, k)) for k, v in VERL_SFT_DEFAULTS.items() if select(cfg, k) != v}
    assert not wrong, f"base sft_trainer differs from verl's defaults (verl, ours): {wrong}"
    for key, (verl, ours) in SFT_DIFFERENT.items():
        assert select(cfg, key) == ours, key


def test_ppo_base_carries_verls_defaults_where_a_key_means_the_same(tiny_model, rl_data):
    inputs = [f"model.partial_pretrain={tiny_model}", f"data.train_files={rl_data['train']}"]
    typed = rl(inputs, name="ppo_trainer").config
    composed_cfg = composed("ppo_trainer")
    for verl_key, (verl_default, our_key, ours) in VERL_PPO_SAME.items():
        if our_key in ("model.partial_pretrain", "data.train_files", "data.val_files"):
            assert select(composed_cfg, our_key) == ours, our_key
            continue
        got = OmegaConf.select(OmegaConf.structured(typed), our_key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == ours, f"{verl_key} (verl {verl_default!r}) -> {our_key}: {got!r}, expected {ours!r}"
    # verl's own keys are present at verl's default, so its command lines compose.
    assert select(composed_cfg, "actor_rollout_ref.rollout.n") == 1
    assert select(composed_cfg, "actor_rollout_ref.actor.ppo_mini_batch_size") == 256


def test_every_verl_key_entry_is_in_the_composed_configs():
    sft_cfg, rl_cfg = composed("sft_trainer"), composed("grpo_trainer")
    for cfg, table in ((sft_cfg, SFT_KEYS), (rl_cfg, PPO_KEYS)):
        for entry in table:
            assert select(cfg, entry.key) == entry.default, entry.key


def test_demo_values_live_only_in_demo_configs():
    demo_asset = re.compile(r"demo_asset|sft_demo|rl_demo")
    for name in ("sft_trainer.yaml", "rl_trainer.yaml", "grpo_trainer.yaml", "gspo_trainer.yaml", "ppo_trainer.yaml",
                 "sft_trainer_with_generation.yaml", "trainer/default.yaml", "generation/default.yaml"):
        text = (ROOT / "config" / name).read_text()
        assert not demo_asset.search(text), f"config/{name} names a demo asset"


# ----------------------------------------------------------------------------- SFT keys
def test_a_run_without_model_or_data_says_what_is_missing_and_how_to_start_the_demo():
    with pytest.raises(ConfigError) as err:
        sft()
    message = str(err.value)
    assert message.startswith("model.partial_pretrain=") and "data.train_files=" in message and "\n" not in message
    assert "--config-name demo" in message


def test_logger_takes_a_string_or_a_list(tiny_model, tiny_data):
    inputs = [f"model.partial_pretrain={tiny_model}", f"data.train_files={tiny_data['train']}"]
    assert sft([*inputs, "trainer.logger=console"]).config.trainer.logger == ["console"]
    assert sft([*inputs, 'trainer.logger=["console","tensorboard"]']).config.trainer.logger == ["console", "tensorboard"]
    with pytest.raises(ConfigError, match=r"^trainer.logger: got 'graphite'"):
        sft([*inputs, "trainer.logger=graphite"])


def test_deprecated_micro_batch_size_and_inert_keys_are_logged(tiny_model, tiny_data):
    inputs = [f"model.partial_pretrain={tiny_model}", f"data.train_files={tiny_data['train']}"]
    resolved = sft([*inputs, "data.micro_batch_size=2", "model.strategy=fsdp", "trainer.nnodes=1", "data.use_shm=false"])
    assert resolved.config.data.micro_batch_size_per_gpu == 2
    notes = "\n".join(resolved.notes)
    assert "data.micro_batch_size=2 (verl): read as data.micro_batch_size_per_gpu=2" in notes
    for key in ("model.strategy=fsdp: changes nothing here", "trainer.nnodes=1: changes nothing here",
                "data.use_shm=False: changes nothing here"):
        assert key in notes, notes
    assert len(resolved.notes) == 4  # one line each, nothing for keys left at verl's defaults
    with pytest.raises(ConfigError, match=r"^data.micro_batch_size=2 and data.micro_batch_size_per_gpu=8 both set"):
        sft([*inputs, "data.micro_batch_size=2", "data.micro_batch_size_per_gpu=8"])


def test_unknown_keys_are_still_errors(tiny_model, tiny_data):
    inputs = [f"model.partial_pretrain={tiny_model}", f"data.train_files={tiny_data['train']}"]
    with pytest.raises(ConfigError, match=r"^model.lora_dropout: unknown key"):
        sft([*inputs, "+model.lora_dropout=0.1"])


def test_verl_optimizer_keys(tiny_model, tiny_data):
    inputs = [f"model.partial_pretrain={tiny_model}", f"data.train_files={tiny_data['train']}"]
    cfg = sft([*inputs, "optim.warmup_style=constant", "optim.lr_warmup_steps=7", "+optim.override_optimizer_config={eps: 1e-6}"]).config
    assert cfg.optim.lr_scheduler == "constant" and cfg.optim.warmup_steps(1000) == 7
    assert cfg.optim.override_optimizer_config == {"eps": 1e-6}
    assert sft([*inputs, "optim.lr_scheduler_type=wsd"]).config.optim.lr_scheduler == "wsd"
    with pytest.raises(ConfigError, match=r"^optim.optimizer=SGD: the optimizer is torch.optim.AdamW here"):
        sft([*inputs, "optim.optimizer=SGD"])


# ----------------------------------------------------------------------------- verl's SFT scripts
@pytest.mark.parametrize("script", sorted(SFT_SCRIPTS))
def test_verl_sft_scripts_compose_unchanged(script, tiny_model, gsm8k, multiturn, tmp_path):
    args = command_line(SFT_SCRIPTS[script], paths_for(tiny_model, gsm8k, multiturn, tmp_path / "run"),
                        ["data.train_batch_size=128"])  # what a user trying it on a small data set passes in `$@`
    sequence_parallel = "ulysses_sequence_parallel_size=2" in SFT_SCRIPTS[script]
    assert not SFT_NOT_YET  # every SFT script composes: nothing it asks for is pending
    cfg = sft(args, world_size=2).config
    # verl's top-level keys set ours; Liger is a key here too (a GPU is checked when the run starts)
    assert (cfg.model.ulysses_sequence_parallel_size, cfg.model.use_remove_padding) == (
        (2, True) if sequence_parallel else (1, False))
    assert cfg.model.use_liger == (script in SFT_NEEDS_GPU)
    if cfg.data.multiturn.enable:
        assert cfg.data.multiturn.messages_key == "messages" and cfg.data.micro_batch_size_per_gpu == 4
        return
    assert cfg.data.prompt_key == "extra_info" and cfg.data.prompt_dict_keys == ["question"]
    assert cfg.data.response_dict_keys == ["answer"] and cfg.data.max_length == 1024  # verl's default
    if script in SFT_LORA:  # LoRA: the script's own lr and logger
        assert (cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.target_modules) == (32, 16, "all-linear")
        assert cfg.optim.lr == 1e-4 and cfg.trainer.logger == ["console"]
        return
    assert cfg.model.lora_rank == 0
    if not sequence_parallel:
        assert cfg.trainer.logger == ["console", "wandb"] and cfg.optim.lr == 1e-5  # verl's defaults, as in verl


# ----------------------------------------------------------------------------- RL keys
def test_verl_grpo_keys_map_onto_ours(tiny_model, rl_data):
    args = [f"actor_rollout_ref.model.path={tiny_model}", f"data.train_files={rl_data['train']}",
            "algorithm.adv_estimator=grpo", "data.train_batch_size=16", "data.max_response_length=24",
            "actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
            "actor_rollout_ref.actor.use_kl_loss=True", "actor_rollout_ref.actor.kl_loss_coef=0.01",
            "actor_rollout_ref.actor.kl_loss_type=mse", "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.rollout.top_k=-1",
            "actor_rollout_ref.actor.optim.lr=3e-6", "actor_rollout_ref.ref.fsdp_config.param_offload=True",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16", "trainer.critic_warmup=0",
            "trainer.val_before_train=False", "trainer.n_gpus_per_node=2", "trainer.nnodes=1", "trainer.logger=console",
            "actor_rollout_ref.actor.entropy_coeff=0", "algorithm.use_kl_in_reward=False",
            "actor_rollout_ref.actor.fsdp_config.param_offload=False", "actor_rollout_ref.model.use_remove_padding=True"]
    resolved = rl(args, world_size=2)
    c = resolved.config
    assert str(c.model.partial_pretrain) == str(tiny_model)
    assert (c.data.prompts_per_step, c.rollout.max_new_tokens, c.actor.mini_batches_per_step) == (16, 24, 4)
    assert (c.actor.micro_batch_size_per_gpu, c.algorithm.kl_coef, c.algorithm.kl_estimator) == (8, 0.01, "k2")
    assert (c.rollout.responses_per_prompt, c.rollout.top_k, c.optim.lr, c.ref.cpu_offload) == (4, 0, 3e-6, True)
    assert c.rollout.log_prob_micro_batch_size_per_gpu == 16 and c.trainer.val_before_train is False
    assert c.trainer.logger == ["console"] and c.model.fsdp_config.cpu_offload is False
    assert any("trainer.n_gpus_per_node=2" in n for n in resolved.notes)
    assert any(n.startswith("actor_rollout_ref.model.use_remove_padding=True: changes nothing here") for n in resolved.notes)


def test_verl_engine_keys_map_onto_the_vllm_engine(tiny_model, rl_data):
    engine = {"gpu_memory_utilization": 0.6, "enforce_eager": True, "free_cache_engine": False, "max_num_batched_tokens": 4096,
              "max_num_seqs": 64, "enable_chunked_prefill": False, "load_format": "auto", "tensor_model_parallel_size": 1,
              "seed": 7}
    args = [f"actor_rollout_ref.model.path={tiny_model}", f"data.train_files={rl_data['train']}", "data.train_batch_size=16",
            "actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.mode=async",
            *(f"actor_rollout_ref.rollout.{k}={v}" for k, v in engine.items())]
    resolved = rl(args, world_size=2)
    c = resolved.config
    assert c.rollout.name == "vllm"
    assert {k: getattr(c.rollout.vllm, k) for k in engine} == engine
    assert any(n.startswith("actor_rollout_ref.rollout.mode=async: changes nothing here") for n in resolved.notes)
    fused = rl([*args, "actor_rollout_ref.model.use_fused_kernels=True"], world_size=2)
    assert any(n.startswith("actor_rollout_ref.model.use_fused_kernels=True: changes nothing here (log-probs here run "
                            "the LM head on the response positions only") for n in fused.notes)
    # verl's default engine name (vllm) does not switch engines unless written: the base config's hf stays.
    assert rl([f"model.partial_pretrain={tiny_model}", f"data.train_files={rl_data['train']}"]).config.rollout.name == "hf"


@pytest.mark.parametrize("override, message", [
    ("rollout.name=sglang", "rollout.name=sglang: SGLang is not available here; use rollout.name=vllm"),
    ("rollout.name=tgi", "rollout.name: got 'tgi', expected one of hf, vllm"),
    ("rollout.vllm.tensor_model_parallel_size=2", "rollout.vllm.tensor_model_parallel_size: 2: the colocated engine"),
    ("rollout.vllm.gpu_memory_utilization=1.5", "rollout.vllm.gpu_memory_utilization: must be in (0, 1]"),
])
def test_wrong_engine_settings_are_one_line_errors(override, message, tiny_model, rl_data):
    with pytest.raises(ConfigError) as err:
        rl([f"model.partial_pretrain={tiny_model}", f"data.train_files={rl_data['train']}", override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("override, reason", [
    ("actor_rollout_ref.rollout.name=sglang", "SGLang is not available here; use actor_rollout_ref.rollout.name=vllm"),
    ("actor_rollout_ref.rollout.name=trtllm", "TensorRT-LLM is not available here; use actor_rollout_ref.rollout.name=vllm"),
    ("actor_rollout_ref.rollout.tensor_model_parallel_size=2", "tensor parallel 1"),
    ("actor_rollout_ref.rollout.multi_stage_wake_up=True", "inference-engine setting"),
    ("algorithm.use_kl_in_reward=True", "no KL penalty in the reward"),
    ("actor_rollout_ref.actor.entropy_coeff=0.001", "no entropy bonus"),
    ("actor_rollout_ref.actor.ulysses_sequence_parallel_size=2", "not available yet"),
    ("critic.ulysses_sequence_parallel_size=2", "not available yet"),
    ("critic.optim.lr_warmup_steps_ratio=0.05", "the critic's learning rate is constant here"),
    ("critic.ppo_mini_batch_size=8", "the critic uses the actor's setting here (actor.mini_batches_per_step=4, i.e. mini-batches of 4 prompts)"),
    ("critic.ppo_epochs=2", "the critic uses the actor's setting here (actor.ppo_epochs=1"),
    ("critic.grad_clip=0.5", "the critic uses the actor's setting here (optim.clip_grad=1.0"),
    ("actor_rollout_ref.actor.kl_loss_type=abs", "the estimators here are"),
    ("trainer.n_gpus_per_node=8", "torchrun started 2 process(es)"),
    ("actor_rollout_ref.actor.ppo_mini_batch_size=5", "must divide data.train_batch_size"),
])
def test_verl_keys_with_no_meaning_here_are_refused_with_the_reason(override, reason, tiny_model, rl_data):
    inputs = [f"model.partial_pretrain={tiny_model}", f"data.train_files={rl_data['train']}", "data.train_batch_size=16"]
    with pytest.raises(ConfigError) as err:
        rl([*inputs, override], world_size=2)
    message = str(err.value)
    assert message.startswith(override.split("=")[0]) and reason in message and "\n" not in message, message


def test_verl_reward_model_keys_map_onto_ours(tiny_model, rl_data, tmp_path):
    """verl's Skywork/FsfairX RM scripts: reward_model.enable, .model.path and the micro-batch size."""
    rm_dir = tmp_path / "rm"
    rm_dir.mkdir()
    inputs = [f"model.partial_pretrain={tiny_model}", f"data.train_files={rl_data['train']}", "data.train_batch_size=16"]
    resolved = rl([*inputs, "reward_model.enable=True", f"reward_model.model.path={rm_dir}",
                   "reward_model.micro_batch_size_per_gpu=8", "reward_model.max_length=1024",
                   "reward_model.model.input_tokenizer=/models/policy"], world_size=2)
    m = resolved.config.reward.model
    assert (m.enable, m.path, m.micro_batch_size_per_gpu, m.max_length, m.name, m.weight) == (
        True, str(rm_dir), 8, 1024, "reward_model", 1.0)
    assert any(n.startswith("reward_model.model.input_tokenizer=/models/policy: changes nothing here") for n in resolved.notes)
    # verl's default path is not taken as asked for; enabling without a path, or one that is not there, is one line.
    with pytest.raises(ConfigError, match=r"^reward.model.path: is required when reward.model.enable=true$"):
        rl([*inputs, "reward_model.enable=True"], world_size=2)
    with pytest.raises(ConfigError, match=r"^reward.model.path: /no/such/rm: not found \(a local directory or a hub id\)$"):
        rl([*inputs, "reward_model.enable=True", "reward_model.model.path=/no/such/rm"], world_size=2)
    with pytest.raises(ConfigError, match=r"^reward.functions: names must be unique \(reward.model.name too\)"):
        rl([*inputs, "reward.model.enable=true", f"reward.model.path={rm_dir}", "reward.model.name=last_number_match"],
           world_size=2)


def test_verl_critic_settings_that_ask_for_the_actors_are_accepted(tiny_model, rl_data):
    inputs = [f"model.partial_pretrain={tiny_model}", f"data.train_files={rl_data['train']}", "data.train_batch_size=16",
              "actor_rollout_ref.actor.ppo_mini_batch_size=8", "actor_rollout_ref.actor.ppo_epochs=2",
              "actor_rollout_ref.actor.grad_clip=0.5"]
    critic = ["critic.ppo_mini_batch_size=8", "critic.ppo_epochs=2", "critic.grad_clip=0.5"]
    resolved = rl([*inputs, *critic], world_size=2, name="ppo_trainer")
    c = resolved.config
    assert (c.actor.mini_batches_per_step, c.actor.ppo_epochs, c.optim.clip_grad) == (2, 2, 0.5)
    assert all(any(n.startswith(k.split("=")[0]) and "the actor's setting" in n for n in resolved.notes) for k in critic)


def test_verl_token_budget_keys_map_onto_ours(tiny_model, rl_data):
    """verl's use_dynamic_bsz keys: the actor's, and the log-prob and critic ones that default to it."""
    inputs = [f"model.partial_pretrain={tiny_model}", f"data.train_files={rl_data['train']}", "data.train_batch_size=16",
              "actor_rollout_ref.actor.use_kl_loss=True"]
    off = rl(inputs, world_size=2).config
    assert all(off.token_budget(f) is None for f in RLConfig.FORWARDS)  # verl's default: micro-batches count sequences
    resolved = rl([*inputs, "actor_rollout_ref.actor.use_dynamic_bsz=True", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=4096",
                   "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=8192"], world_size=2)
    c = resolved.config
    assert (c.actor.use_dynamic_bsz, c.actor.ppo_max_token_len_per_gpu) == (True, 4096)
    assert c.token_budget("actor") == c.token_budget("old_log_prob") == (4096, "actor.ppo_max_token_len_per_gpu")
    assert c.token_budget("ref_log_prob") == (8192, "ref.log_prob_max_token_len_per_gpu")
    assert any(n.startswith("actor_rollout_ref.actor.use_dynamic_bsz=True (verl): read as actor.use_dynamic_bsz=True")
               for n in resolved.notes)
    # Each log-prob forward can say otherwise, as in verl.
    c = rl([*inputs, "actor_rollout_ref.actor.use_dynamic_bsz=True", "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=False",
            "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=2048"], world_size=2).config
    assert c.token_budget("old_log_prob") is None and c.rollout.log_prob_max_token_len_per_gpu == 2048
    c = rl([*inputs, "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True"], world_size=2).config
    assert c.token_budget("actor") is None and c.token_budget("old_log_prob") == (16384, "actor.ppo_max_token_len_per_gpu")
    # The critic's keys are ours by the same names; its budget is its own (verl: 32768), the value forward's defaults to it.
    ppo = [f"model.partial_pretrain={tiny_model}", f"data.train_files={rl_data['train']}", "data.train_batch_size=16"]
    c = rl([*ppo, "actor_rollout_ref.actor.use_dynamic_bsz=True"], world_size=2, name="ppo_trainer").config
    assert c.token_budget("critic") == c.token_budget("values") == (32768, "critic.ppo_max_token_len_per_gpu")
    c = rl([*ppo, "critic.use_dynamic_bsz=True", "critic.ppo_max_token_len_per_gpu=4096", "critic.forward_max_token_len_per_gpu=8192"],
           world_size=2, name="ppo_trainer").config
    assert c.token_budget("actor") is None
    assert (c.token_budget("critic"), c.token_budget("values")) == ((4096, "critic.ppo_max_token_len_per_gpu"),
                                                                    (8192, "critic.forward_max_token_len_per_gpu"))


def test_verl_seq_balance_script_cuts_every_actor_forward_by_its_budget(tiny_model, gsm8k):
    paths = {"$HOME/data/gsm8k/train.parquet": str(gsm8k["train"]), "Qwen/Qwen2-7B-Instruct": str(tiny_model)}
    args = command_line(GRPO_SCRIPTS["run_qwen2-7b_seq_balance.sh"], paths, ["data.train_batch_size=16",
                        "actor_rollout_ref.actor.ppo_mini_batch_size=8", "trainer.n_gpus_per_node=2"])
    c = rl(without(args, "actor_rollout_ref.rollout.name", "actor_rollout_ref.rollout.tensor_model_parallel_size",
                   "actor_rollout_ref.rollout.multi_turn.format"), world_size=2).config
    assert c.forwards_run() == ["actor", "old_log_prob", "ref_log_prob"]
    assert {c.token_budget(f) for f in c.forwards_run()} == {(24000, "actor.ppo_max_token_len_per_gpu")}


@pytest.mark.parametrize("overrides, message", [
    (["actor_rollout_ref.actor.use_dynamic_bsz=True", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=600"],
     "actor.ppo_max_token_len_per_gpu (verl: actor_rollout_ref.actor.ppo_max_token_len_per_gpu): 600 tokens is less than the "
     "longest sequence, data.max_prompt_length + rollout.max_new_tokens = 512 + 512 = 1024"),
    (["actor.use_dynamic_bsz=true", "ref.log_prob_max_token_len_per_gpu=1000"],
     "ref.log_prob_max_token_len_per_gpu (verl: actor_rollout_ref.ref.log_prob_max_token_len_per_gpu): 1000 tokens is less"),
    (["critic.use_dynamic_bsz=true", "critic.forward_max_token_len_per_gpu=64", "algorithm.adv_estimator=gae",
      "algorithm.name=ppo"], "critic.forward_max_token_len_per_gpu: 64 tokens is less than the longest sequence"),
])
def test_a_token_budget_below_the_longest_sequence_is_one_line_naming_the_key(overrides, message, tiny_model, rl_data):
    inputs = [f"model.partial_pretrain={tiny_model}", f"data.train_files={rl_data['train']}", "data.train_batch_size=16",
              "actor_rollout_ref.actor.use_kl_loss=True", "data.max_prompt_length=512", "data.max_response_length=512"]
    with pytest.raises(ConfigError) as err:
        rl([*inputs, *overrides], world_size=2)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)
    # The same budget without token-budget micro-batches asks for nothing.
    rl([*inputs, *[o for o in overrides if "use_dynamic_bsz" not in o]], world_size=2)


@pytest.mark.parametrize("script", sorted(GRPO_SCRIPTS))
def test_verl_grpo_scripts_are_refused_only_for_what_has_no_meaning_here(script, tiny_model, gsm8k, tmp_path):
    paths = {"$HOME/data/gsm8k/train.parquet": str(gsm8k["train"]), "$HOME/data/gsm8k/test.parquet": str(gsm8k["test"]),
             "Qwen/Qwen2-7B-Instruct": str(tiny_model), "Qwen/Qwen2.5-3B-Instruct": str(tiny_model)}
    # What a user scaling it down to two processes passes in `$@`.
    args = command_line(GRPO_SCRIPTS[script], paths, ["data.train_batch_size=16", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
                                                      "trainer.n_gpus_per_node=2"])
    with pytest.raises(ConfigError) as err:
        rl(args, world_size=2)
    message = str(err.value)
    refused = set(re.findall(r"(?:^|; )([\w.]+)=", message))
    table = docs_verl_rl_table()
    for key in refused:  # refused outright, or for some values (rollout.name=sglang)
        assert key in table and (table[key].startswith("refused") or " are refused" in table[key]), key
    cleaned = without(args, *refused)
    c = rl(cleaned, world_size=2).config
    assert c.algorithm.adv_estimator == "grpo" and c.rollout.responses_per_prompt == 5 and c.algorithm.kl_coef == 0.001


@pytest.mark.parametrize("script", sorted(PPO_SCRIPTS))
def test_verl_ppo_script_with_its_critic_keys_is_refused_only_for_engine_tensor_parallel(script, tiny_model, gsm8k):
    # verl's main_ppo with gae is our ppo_trainer config (--config-name ppo_trainer).
    paths = {"$HOME/data/gsm8k/train.parquet": str(gsm8k["train"]), "$HOME/data/gsm8k/test.parquet": str(gsm8k["test"]),
             "deepseek-ai/deepseek-llm-7b-chat": str(tiny_model)}
    args = command_line(PPO_SCRIPTS[script], paths, ["data.train_batch_size=16", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
                                                     "trainer.n_gpus_per_node=2"])
    with pytest.raises(ConfigError) as err:
        rl(args, world_size=2, name="ppo_trainer")
    refused = set(re.findall(r"(?:^|; )([\w.]+)=", str(err.value)))
    # vLLM is an engine here (rollout.name=vllm, its gpu_memory_utilization mapped); tensor parallel 2 is not.
    assert refused == {"actor_rollout_ref.rollout.tensor_model_parallel_size"}, str(err.value)
    resolved = rl(without(args, *refused), world_size=2, name="ppo_trainer")
    c = resolved.config
    assert c.algorithm.adv_estimator == "gae" and c.critic.lr == 1e-5 and c.critic.enable_gradient_checkpointing is True
    assert any(n.startswith("critic.model.path=") and "the actor's model" in n for n in resolved.notes)
    # A critic from another model is not what happens here: one line says so.
    other = [a.replace(f"critic.model.path={tiny_model}", "critic.model.path=/models/other-7b") for a in without(args, *refused)]
    with pytest.raises(ConfigError, match=r"^critic.model.path=/models/other-7b: the critic starts from the actor's model"):
        rl(other, world_size=2, name="ppo_trainer")


def docs_verl_rl_table() -> dict[str, str]:
    page = (ROOT / "docs" / "reference" / "verl-keys.md").read_text(encoding="utf-8")
    section = page.split("## RL (`verl.trainer.main_ppo`)", 1)[1]
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\| `([^`]+)` \| ([^|]+)\|", section, re.M)}


def test_docs_say_what_every_key_of_verls_grpo_scripts_does_here():
    table = docs_verl_rl_table()
    for key in GRPO_KEYS_USED:
        parts = key.split(".")
        assert any(".".join(parts[:i]) in table for i in range(len(parts), 0, -1)), f"docs/reference/verl-keys.md lacks {key}"


def test_resume_from_path_wins_in_auto_mode_as_in_verl(tmp_path):
    from config.schema import CheckpointConfig
    from trainer.checkpoint import STATE_FILE, Checkpointer

    run = tmp_path / "run"
    for step in (2, 4):
        (run / f"global_step_{step}").mkdir(parents=True)
        (run / f"global_step_{step}" / STATE_FILE).write_text(f'{{"global_step": {step}}}')
    elsewhere = tmp_path / "other" / "global_step_3"
    elsewhere.mkdir(parents=True)
    (elsewhere / STATE_FILE).write_text('{"global_step": 3}')
    ckpt = Checkpointer(run, -1, None, 0, 1, CheckpointConfig(), hf=None)
    assert ckpt.resolve_resume("auto", None) == run / "global_step_4"
    assert ckpt.resolve_resume("auto", str(elsewhere)) == elsewhere
    assert ckpt.resolve_resume("resume_path", str(elsewhere)) == elsewhere
    assert ckpt.resolve_resume("disable", str(elsewhere)) is None
    with pytest.raises(FileNotFoundError, match="is not a complete checkpoint"):
        ckpt.resolve_resume("auto", str(tmp_path / "nowhere"))


def test_filter_overlong_prompts_leaves_them_out(tmp_path, tiny_model, caplog):
    from config.rl_schema import RLDataConfig
    from helpers import rl_rows
    from trainer.data import DataError
    from trainer.data.rl_prompts import load_rl_prompts
    from workers.model import load_tokenizer

    rows = rl_rows(4, seed=1)
    rows[2]["prompt"] = [{"role": "user", "content": "1+1=" * 40}]
    path = write_parquet(rows, tmp_path / "p.parquet")
    tok = load_tokenizer(str(tiny_model))
    with pytest.raises(DataError, match=r"row 2: prompt has \d+ tokens, more than data.max_prompt_length=40"):
        load_rl_prompts(str(path), "data.train_files", tok, RLDataConfig(max_prompt_length=40))
    kept = load_rl_prompts(str(path), "data.train_files", tok, RLDataConfig(max_prompt_length=40, filter_overlong_prompts=True))
    assert [p.text for p in kept] == [r["prompt"][0]["content"] for i, r in enumerate(rows) if i != 2]


def test_external_lib_and_optimizer_overrides(tiny_model):
    import torch

    from config.schema import OptimConfig
    from trainer.optim import build_optimizer
    from workers.model import ModelLoadError, import_external_lib

    import_external_lib("json")  # importable: nothing to say
    with pytest.raises(ModelLoadError, match=r"^model.external_lib='no_such_lib_here': cannot import it"):
        import_external_lib("no_such_lib_here")
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, OptimConfig(override_optimizer_config={"eps": 1e-6}), torch.device("cpu"))
    assert optimizer.param_groups[0]["eps"] == 1e-6


# ----------------------------------------------------------------------------- LoRA keys
def test_lora_keys_are_ours_under_verls_names(tiny_model, tiny_data, rl_data, tmp_path):
    inputs = [f"model.partial_pretrain={tiny_model}", f"data.train_files={tiny_data['train']}"]
    m = sft([*inputs, "model.lora_rank=8", "model.lora_alpha=32", "model.target_modules=[q_proj,v_proj]"]).config.model
    assert (m.lora_rank, m.lora_alpha, m.target_modules, m.lora) == (8, 32, ["q_proj", "v_proj"], True)
    assert sft(inputs).config.model.lora is False  # verl's default: lora_rank 0
    r = rl([f"actor_rollout_ref.model.path={tiny_model}", f"data.train_files={rl_data['train']}", "data.train_batch_size=16",
            "actor_rollout_ref.model.lora_rank=64", "actor_rollout_ref.model.lora_alpha=32",
            "actor_rollout_ref.model.target_modules=all-linear", "actor_rollout_ref.model.exclude_modules=[o_proj]"]).config.model
    assert (r.lora_rank, r.lora_alpha, r.target_modules, r.exclude_modules) == (64, 32, "all-linear", ["o_proj"])


@pytest.mark.parametrize("override, message", [
    ("model.lora_rank=-1", r"^model.lora_rank: must be >= 0"),
    ("model.target_modules=[]", r"^model.target_modules: must be all-linear or a list of module names"),
    ("model.lora_alpha=0", r"^model.lora_alpha: must be > 0"),
])
def test_wrong_lora_values_are_one_line_errors(override, message, tiny_model, tiny_data):
    inputs = [f"model.partial_pretrain={tiny_model}", f"data.train_files={tiny_data['train']}", "model.lora_rank=8"]
    with pytest.raises(ConfigError, match=message):
        sft([*inputs, override])


def test_an_adapter_path_without_an_adapter_is_named(tiny_model, tiny_data, tmp_path):
    inputs = [f"model.partial_pretrain={tiny_model}", f"data.train_files={tiny_data['train']}"]
    with pytest.raises(ConfigError, match=r"^model.lora_adapter_path: .* is not a peft adapter directory \(no adapter_config.json\)$"):
        sft([*inputs, f"model.lora_adapter_path={tmp_path}"])


def test_verl_appends_of_keys_we_define_are_overrides(tiny_model, rl_data):
    from trainer.cli import appends_as_overrides

    inputs = [f"model.partial_pretrain={tiny_model}", f"data.train_files={rl_data['train']}"]
    # verl's gpt-oss script appends these: here the config has them, and Hydra alone would refuse
    # ("Could not append to config. An item is already at ...").
    args = appends_as_overrides([*inputs, "+actor_rollout_ref.rollout.name=vllm", "+rollout.max_new_tokens=7",
                                 "++trainer.seed=3", "+trainer.not_ours=1"])
    assert args[2:] == ["actor_rollout_ref.rollout.name=vllm", "rollout.max_new_tokens=7", "++trainer.seed=3",
                        "+trainer.not_ours=1"]  # `++` and unknown keys stay Hydra's
    c = rl(args[:4]).config
    assert (c.rollout.name, c.rollout.max_new_tokens) == ("vllm", 7)
    # the gpt-oss script's bf16 master weights: our model.fsdp_config.model_dtype
    appended = rl([*inputs, *appends_as_overrides(["+actor_rollout_ref.actor.fsdp_config.model_dtype=bfloat16"])])
    assert appended.config.model.fsdp_config.model_dtype == "bf16"
    with pytest.raises(ConfigError, match=r"^model.fsdp_config.model_dtype: fp16 weights need loss scaling"):
        rl([*inputs, "actor_rollout_ref.actor.fsdp_config.model_dtype=fp16"])
