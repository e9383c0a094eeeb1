"""The override lists of verl's own example scripts (volcengine/verl at b178a3c, 2026-01-29),
as its users paste them: `examples/sft/gsm8k/*.sh`, `examples/sft/multiturn/run_qwen_05_sp2.sh`,
three of `examples/grpo_trainer/*.sh` and one of `examples/ppo_trainer/*.sh`. Only what follows `-m verl.trainer.<module>` is kept;
`command_line()` swaps the model and data paths for a test's assets, as a user with their own
files would, and puts the caller's extra arguments where the script has `$@`.
"""

from __future__ import annotations

import shlex

SFT_SCRIPTS = {
    "gsm8k/run_deepseek_6b7.sh": """
    data.train_files=$HOME/data/gsm8k/train.parquet
    data.val_files=$HOME/data/gsm8k/test.parquet
    data.prompt_key=extra_info
    data.response_key=extra_info
    data.prompt_dict_keys=['question']
    +data.response_dict_keys=['answer']
    data.micro_batch_size_per_gpu=4
    model.partial_pretrain=deepseek-ai/deepseek-coder-6.7b-instruct
    trainer.default_local_dir=$save_path
    trainer.project_name=gsm8k-sft
    trainer.experiment_name=gsm8k-sft-deepseek-coder-6.7b-instruct
    trainer.total_epochs=4
    trainer.logger='["console","wandb"]' $@
    """,
    "gsm8k/run_gemma_2b.sh": """
    data.train_files=$HOME/data/gsm8k/train.parquet
    data.val_files=$HOME/data/gsm8k/test.parquet
    data.prompt_key=extra_info
    data.response_key=extra_info
    data.prompt_dict_keys=['question']
    +data.response_dict_keys=['answer']
    data.micro_batch_size_per_gpu=4
    model.partial_pretrain=google/gemma-2b-it
    trainer.default_local_dir=$save_path
    trainer.project_name=gsm8k-sft
    trainer.experiment_name=gsm8k-sft-gemma-2b-it
    trainer.total_epochs=2
    trainer.logger='["console","wandb"]' $@
    """,
    "gsm8k/run_gemma_7b.sh": """
    data.train_files=$HOME/data/gsm8k/train.parquet
    data.val_files=$HOME/data/gsm8k/test.parquet
    data.prompt_key=extra_info
    data.response_key=extra_info
    data.prompt_dict_keys=['question']
    data.response_dict_keys=['answer']
    data.micro_batch_size_per_gpu=4
    model.partial_pretrain=google/gemma-1.1-7b-it
    trainer.default_local_dir=$save_path
    trainer.project_name=gsm8k-sft
    trainer.experiment_name=gsm8k-sft-gemma-1.1-7b-it
    trainer.total_epochs=4
    trainer.logger='["console","wandb"]' $@
    """,
    "gsm8k/run_qwen3_8b_sft_peft_sp2_npu.sh": """
    data.train_files=$HOME/data/gsm8k/train.parquet
    data.val_files=$HOME/data/gsm8k/test.parquet
    data.prompt_key=extra_info
    data.response_key=extra_info
    optim.lr=1e-4
    data.prompt_dict_keys=['question']
    +data.response_dict_keys=['answer']
    data.micro_batch_size_per_gpu=64
    model.partial_pretrain=Qwen/Qwen3-8B
    trainer.default_local_dir=$save_path
    trainer.project_name=gsm8k-sft
    trainer.experiment_name=gsm8k-sft-qwen3-8b-instruct
    trainer.logger=console
    trainer.total_epochs=2 $@
    model.lora_rank=32
    model.lora_alpha=16
    model.target_modules=all-linear
    model.strategy=fsdp
    ulysses_sequence_parallel_size=2
    use_remove_padding=true
    """,
    "gsm8k/run_qwen_05_peft.sh": """
    data.train_files=$HOME/data/gsm8k/train.parquet
    data.val_files=$HOME/data/gsm8k/test.parquet
    data.prompt_key=extra_info
    data.response_key=extra_info
    optim.lr=1e-4
    data.prompt_dict_keys=['question']
    +data.response_dict_keys=['answer']
    data.micro_batch_size_per_gpu=4
    model.partial_pretrain=Qwen/Qwen2.5-0.5B-Instruct
    trainer.default_local_dir=$save_path
    trainer.project_name=gsm8k-sft
    trainer.experiment_name=gsm8k-sft-qwen-2.5-0.5b-instruct
    trainer.logger=console
    trainer.total_epochs=1 $@
    model.lora_rank=32
    model.lora_alpha=16
    model.target_modules=all-linear
    """,
    "gsm8k/run_qwen_05_sp2.sh": """
    data.train_files=$HOME/data/gsm8k/train.parquet
    data.val_files=$HOME/data/gsm8k/test.parquet
    data.prompt_key=extra_info
    data.response_key=extra_info
    optim.lr=1e-4
    data.prompt_dict_keys=['question']
    +data.response_dict_keys=['answer']
    data.micro_batch_size=4
    model.partial_pretrain=Qwen/Qwen2.5-0.5B-Instruct
    trainer.default_local_dir=$save_path
    trainer.project_name=gsm8k-sft
    trainer.experiment_name=gsm8k-sft-qwen-2.5-0.5b-instruct-sp2
    trainer.logger=console
    trainer.total_training_steps=1 $@
    ulysses_sequence_parallel_size=2
    use_remove_padding=true
    """,
    "gsm8k/run_qwen_05_sp2_liger.sh": """
    data.train_files=$HOME/data/gsm8k/train.parquet
    data.val_files=$HOME/data/gsm8k/test.parquet
    data.prompt_key=extra_info
    data.response_key=extra_info
    optim.lr=1e-4
    data.prompt_dict_keys=['question']
    +data.response_dict_keys=['answer']
    data.micro_batch_size=4
    model.partial_pretrain=Qwen/Qwen2.5-0.5B-Instruct
    model.use_liger=True
    trainer.default_local_dir=$save_path
    trainer.project_name=gsm8k-sft
    trainer.experiment_name=gsm8k-sft-qwen-2.5-0.5b-instruct-sp2-liger
    trainer.logger=console $@
    ulysses_sequence_parallel_size=2
    use_remove_padding=true
    """,
    "gsm8k/run_seed_oss_36b_sft.sh": """
    data.train_files=$HOME/data/gsm8k/train.parquet
    data.val_files=$HOME/data/gsm8k/test.parquet
    data.prompt_key=extra_info
    data.response_key=extra_info
    optim.lr=1e-4
    data.prompt_dict_keys=['question']
    +data.response_dict_keys=['answer']
    data.micro_batch_size=4
    model.partial_pretrain=ByteDance-Seed/Seed-OSS-36B-Base
    trainer.default_local_dir=$save_path
    trainer.project_name=gsm8k-sft
    trainer.experiment_name=gsm8k-sft-seed-oss-36b
    trainer.logger=console
    trainer.total_training_steps=1
    ulysses_sequence_parallel_size=2
    use_remove_padding=true $@
    """,
    "multiturn/run_qwen_05_sp2.sh": """
    data.train_files=$HOME/data/multiturn/train.parquet
    data.val_files=$HOME/data/multiturn/test.parquet
    data.multiturn.enable=true
    data.multiturn.messages_key=messages
    data.micro_batch_size=4
    model.partial_pretrain=Qwen/Qwen2.5-0.5B-Instruct
    trainer.default_local_dir=$save_path
    trainer.project_name=multiturn-sft
    trainer.experiment_name=multiturn-sft-qwen-2.5-0.5b-instruct-sp2
    trainer.logger=console
    trainer.total_training_steps=1 $@
    ulysses_sequence_parallel_size=2
    use_remove_padding=true
    """,
}

# What each SFT script asks for that is not here yet: nothing since LoRA and sequence parallelism landed.
SFT_NOT_YET: dict[str, tuple[str, ...]] = {}

# What needs a GPU: the run stops before the model is built, in one line naming the key.
SFT_NEEDS_GPU = {"gsm8k/run_qwen_05_sp2_liger.sh": "model.use_liger"}

# The SFT scripts that train LoRA adapters (model.lora_rank > 0).
SFT_LORA = ("gsm8k/run_qwen3_8b_sft_peft_sp2_npu.sh", "gsm8k/run_qwen_05_peft.sh")

# Ulysses sequence parallelism and padding-free batches (2 ranks: one sequence-parallel group).
SFT_SEQUENCE_PARALLEL = sorted(
    name for name, body in SFT_SCRIPTS.items()
    if "ulysses_sequence_parallel_size=2" in body and name not in SFT_NOT_YET and name not in SFT_NEEDS_GPU
)


GRPO_SCRIPTS = {
    "run_qwen2-7b.sh": """
    algorithm.adv_estimator=grpo
    data.train_files=$HOME/data/gsm8k/train.parquet
    data.val_files=$HOME/data/gsm8k/test.parquet
    data.train_batch_size=1024
    data.max_prompt_length=512
    data.max_response_length=1024
    data.filter_overlong_prompts=True
    data.truncation='error'
    actor_rollout_ref.model.path=Qwen/Qwen2-7B-Instruct
    actor_rollout_ref.actor.optim.lr=1e-6
    actor_rollout_ref.model.use_remove_padding=True
    actor_rollout_ref.actor.ppo_mini_batch_size=256
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=40
    actor_rollout_ref.actor.use_kl_loss=True
    actor_rollout_ref.actor.kl_loss_coef=0.001
    actor_rollout_ref.actor.kl_loss_type=low_var_kl
    actor_rollout_ref.actor.entropy_coeff=0
    actor_rollout_ref.model.enable_gradient_checkpointing=True
    actor_rollout_ref.actor.fsdp_config.param_offload=False
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=False
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=40
    actor_rollout_ref.rollout.tensor_model_parallel_size=2
    actor_rollout_ref.rollout.name=vllm
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6
    actor_rollout_ref.rollout.n=5
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=40
    actor_rollout_ref.ref.fsdp_config.param_offload=True
    algorithm.use_kl_in_reward=False
    trainer.critic_warmup=0
    trainer.logger='["console","wandb"]'
    trainer.project_name='verl_grpo_example_gsm8k'
    trainer.experiment_name='qwen2_7b_function_rm'
    trainer.n_gpus_per_node=8
    trainer.nnodes=1
    trainer.save_freq=20
    trainer.test_freq=5
    trainer.total_epochs=15 $@
    """,
    "run_qwen2_5-3b_gsm8k_grpo_lora.sh": """
    algorithm.adv_estimator=grpo
    trainer.val_before_train=False
    data.train_files=$HOME/data/gsm8k/train.parquet
    data.val_files=$HOME/data/gsm8k/test.parquet
    data.train_batch_size=16
    data.max_prompt_length=512
    data.max_response_length=1024
    data.filter_overlong_prompts=True
    data.truncation='error'
    data.shuffle=False
    actor_rollout_ref.model.path=Qwen/Qwen2.5-3B-Instruct
    actor_rollout_ref.model.lora_rank=64
    actor_rollout_ref.model.lora_alpha=32
    actor_rollout_ref.actor.optim.lr=3e-6
    actor_rollout_ref.model.use_remove_padding=True
    actor_rollout_ref.actor.ppo_mini_batch_size=16
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=40
    actor_rollout_ref.actor.use_kl_loss=True
    actor_rollout_ref.actor.kl_loss_coef=0.001
    actor_rollout_ref.actor.kl_loss_type=low_var_kl
    actor_rollout_ref.actor.entropy_coeff=0
    actor_rollout_ref.model.enable_gradient_checkpointing=True
    actor_rollout_ref.actor.fsdp_config.param_offload=False
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=False
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=40
    actor_rollout_ref.rollout.tensor_model_parallel_size=2
    actor_rollout_ref.rollout.name=vllm
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6
    actor_rollout_ref.rollout.n=5
    actor_rollout_ref.rollout.load_format=safetensors
    actor_rollout_ref.rollout.layered_summon=True
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=40
    actor_rollout_ref.ref.fsdp_config.param_offload=True
    algorithm.use_kl_in_reward=False
    trainer.critic_warmup=0
    trainer.logger='["console","wandb"]'
    trainer.project_name='verl_grpo_example_gsm8k'
    trainer.experiment_name='qwen2.5_3b_grpo_lora'
    trainer.n_gpus_per_node=2
    trainer.nnodes=1
    trainer.save_freq=20
    trainer.test_freq=5
    trainer.total_epochs=15 $@
    """,
    # Token-budget micro-batches (3f38806). The script's shell variables as it sets them:
    # rollout_name="sglang", rollout_mode="async", so return_raw_chat="True".
    "run_qwen2-7b_seq_balance.sh": """
    algorithm.adv_estimator=grpo
    data.train_files=$HOME/data/gsm8k/train.parquet
    data.val_files=$HOME/data/gsm8k/test.parquet
    data.return_raw_chat=True
    data.train_batch_size=1024
    data.max_prompt_length=512
    data.max_response_length=1024
    data.filter_overlong_prompts=True
    data.truncation='error'
    actor_rollout_ref.model.path=Qwen/Qwen2-7B-Instruct
    actor_rollout_ref.actor.optim.lr=1e-6
    actor_rollout_ref.model.use_remove_padding=True
    actor_rollout_ref.actor.ppo_mini_batch_size=256
    actor_rollout_ref.actor.use_dynamic_bsz=True
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=24000
    actor_rollout_ref.actor.use_kl_loss=True
    actor_rollout_ref.actor.kl_loss_coef=0.001
    actor_rollout_ref.actor.kl_loss_type=low_var_kl
    actor_rollout_ref.actor.entropy_coeff=0
    actor_rollout_ref.model.enable_gradient_checkpointing=True
    actor_rollout_ref.actor.fsdp_config.param_offload=False
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=False
    actor_rollout_ref.rollout.tensor_model_parallel_size=2
    actor_rollout_ref.rollout.name=sglang
    actor_rollout_ref.rollout.mode=async
    actor_rollout_ref.rollout.multi_turn.format=hermes
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6
    actor_rollout_ref.rollout.n=5
    actor_rollout_ref.ref.fsdp_config.param_offload=True
    algorithm.use_kl_in_reward=False
    trainer.critic_warmup=0
    trainer.logger=['console','wandb']
    trainer.project_name='verl_grpo_example_gsm8k'
    trainer.experiment_name='qwen2_7b_function_rm_kl1e-3'
    trainer.val_before_train=False
    trainer.n_gpus_per_node=8
    trainer.nnodes=1
    trainer.save_freq=20
    trainer.test_freq=5
    trainer.total_epochs=15 $@
    """,
}


# verl's PPO example (examples/ppo_trainer/run_deepseek7b_llm.sh at 2ddb493): an actor, a critic
# from the same model, GAE.
PPO_SCRIPTS = {
    "run_deepseek7b_llm.sh": """
    algorithm.adv_estimator=gae
    data.train_files=$HOME/data/gsm8k/train.parquet
    data.val_files=$HOME/data/gsm8k/test.parquet
    data.train_batch_size=1024
    data.max_prompt_length=512
    data.max_response_length=512
    data.filter_overlong_prompts=True
    data.truncation='error'
    actor_rollout_ref.model.path=deepseek-ai/deepseek-llm-7b-chat
    actor_rollout_ref.actor.optim.lr=1e-6
    actor_rollout_ref.model.use_remove_padding=True
    actor_rollout_ref.actor.ppo_mini_batch_size=256
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16
    actor_rollout_ref.actor.fsdp_config.param_offload=False
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=False
    actor_rollout_ref.actor.use_kl_loss=False
    actor_rollout_ref.model.enable_gradient_checkpointing=True
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=32
    actor_rollout_ref.rollout.tensor_model_parallel_size=4
    actor_rollout_ref.rollout.name=vllm
    actor_rollout_ref.rollout.gpu_memory_utilization=0.4
    critic.optim.lr=1e-5
    critic.model.use_remove_padding=False
    critic.model.path=deepseek-ai/deepseek-llm-7b-chat
    critic.model.enable_gradient_checkpointing=True
    critic.ppo_micro_batch_size_per_gpu=32
    critic.model.fsdp_config.param_offload=False
    critic.model.fsdp_config.optimizer_offload=False
    algorithm.use_kl_in_reward=False
    trainer.critic_warmup=0
    trainer.logger=['console']
    trainer.project_name='verl_example_gsm8k'
    trainer.experiment_name='deepseek_llm_7b_function_rm'
    trainer.n_gpus_per_node=8
    trainer.nnodes=1
    trainer.total_training_steps=2
    trainer.use_legacy_worker_impl=False
    trainer.total_epochs=15 $@
    """,
}


def command_line(body: str, paths: dict[str, str], extra: list[str] = ()) -> list[str]:
    """The script's overrides as the shell hands them to Python: `$HOME/...` data files and hub
    model ids replaced by `paths` (keyed by the text they replace), `$@` by `extra`."""
    for old, new in sorted(paths.items(), key=lambda kv: -len(kv[0])):
        body = body.replace(old, new)
    args: list[str] = []
    for word in shlex.split(body):
        if word == "$@":
            args += list(extra)
        else:
            args.append(word)
    if "$@" not in body:
        args += list(extra)
    return args


def without(args: list[str], *prefixes: str) -> list[str]:
    """The command line with the overrides of these keys dropped (what the error asks the user to do)."""
    return [a for a in args if not any(a.lstrip("+").split("=", 1)[0] == p for p in prefixes)]


# Every key the FSDP GRPO example scripts of verl set (the 33 scripts of examples/grpo_trainer/ that
# do not use Megatron, at b178a3c): docs/reference/verl-keys.md must say what each does here.
GRPO_KEYS_USED = (
    "actor_rollout_ref.actor.entropy_coeff",
    "actor_rollout_ref.actor.freeze_vision_tower",
    "actor_rollout_ref.actor.fsdp_config.forward_prefetch",
    "actor_rollout_ref.actor.fsdp_config.mixed_precision.buffer_dtype",
    "actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype",
    "actor_rollout_ref.actor.fsdp_config.mixed_precision.reduce_dtype",
    "actor_rollout_ref.actor.fsdp_config.model_dtype",
    "actor_rollout_ref.actor.fsdp_config.optimizer_offload",
    "actor_rollout_ref.actor.fsdp_config.param_offload",
    "actor_rollout_ref.actor.fsdp_config.use_orig_params",
    "actor_rollout_ref.actor.kl_loss_coef",
    "actor_rollout_ref.actor.kl_loss_type",
    "actor_rollout_ref.actor.optim.lr",
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
    "actor_rollout_ref.actor.ppo_mini_batch_size",
    "actor_rollout_ref.actor.profiler.all_ranks",
    "actor_rollout_ref.actor.profiler.enable",
    "actor_rollout_ref.actor.profiler.ranks",
    "actor_rollout_ref.actor.profiler.tool_config.npu.analysis",
    "actor_rollout_ref.actor.profiler.tool_config.npu.contents",
    "actor_rollout_ref.actor.profiler.tool_config.npu.discrete",
    "actor_rollout_ref.actor.profiler.tool_config.npu.level",
    "actor_rollout_ref.actor.strategy",
    "actor_rollout_ref.actor.ulysses_sequence_parallel_size",
    "actor_rollout_ref.actor.use_dynamic_bsz",
    "actor_rollout_ref.actor.use_kl_loss",
    "actor_rollout_ref.actor.use_torch_compile",
    "actor_rollout_ref.hybrid_engine",
    "actor_rollout_ref.model.enable_gradient_checkpointing",
    "actor_rollout_ref.model.exclude_modules",
    "actor_rollout_ref.model.lora_adapter_path",
    "actor_rollout_ref.model.lora_alpha",
    "actor_rollout_ref.model.lora_rank",
    "actor_rollout_ref.model.path",
    "actor_rollout_ref.model.target_modules",
    "actor_rollout_ref.model.trust_remote_code",
    "actor_rollout_ref.model.use_fused_kernels",
    "actor_rollout_ref.model.use_remove_padding",
    "actor_rollout_ref.model.use_shm",
    "actor_rollout_ref.nccl_timeout",
    "actor_rollout_ref.ref.fsdp_config.forward_prefetch",
    "actor_rollout_ref.ref.fsdp_config.param_offload",
    "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu",
    "actor_rollout_ref.ref.log_prob_use_dynamic_bsz",
    "actor_rollout_ref.ref.profiler.all_ranks",
    "actor_rollout_ref.ref.profiler.enable",
    "actor_rollout_ref.ref.profiler.ranks",
    "actor_rollout_ref.ref.profiler.tool_config.npu.analysis",
    "actor_rollout_ref.ref.profiler.tool_config.npu.contents",
    "actor_rollout_ref.ref.profiler.tool_config.npu.discrete",
    "actor_rollout_ref.ref.profiler.tool_config.npu.level",
    "actor_rollout_ref.ref.strategy",
    "actor_rollout_ref.ref.ulysses_sequence_parallel_size",
    "actor_rollout_ref.ref.use_torch_compile",
    "actor_rollout_ref.rollout.calculate_log_probs",
    "actor_rollout_ref.rollout.checkpoint_engine.update_weights_bucket_megabytes",
    "actor_rollout_ref.rollout.data_parallel_size",
    "actor_rollout_ref.rollout.enable_chunked_prefill",
    "actor_rollout_ref.rollout.enforce_eager",
    "actor_rollout_ref.rollout.engine_kwargs.sglang.attention_backend",
    "actor_rollout_ref.rollout.engine_kwargs.trtllm.batch_wait_max_tokens_ratio",
    "actor_rollout_ref.rollout.engine_kwargs.trtllm.batch_wait_timeout_iters",
    "actor_rollout_ref.rollout.engine_kwargs.vllm.disable_mm_preprocessor_cache",
    "actor_rollout_ref.rollout.expert_parallel_size",
    "actor_rollout_ref.rollout.free_cache_engine",
    "actor_rollout_ref.rollout.gpu_memory_utilization",
    "actor_rollout_ref.rollout.layered_summon",
    "actor_rollout_ref.rollout.load_format",
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu",
    "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz",
    "actor_rollout_ref.rollout.max_num_batched_tokens",
    "actor_rollout_ref.rollout.max_num_seqs",
    "actor_rollout_ref.rollout.mode",
    "actor_rollout_ref.rollout.multi_stage_wake_up",
    "actor_rollout_ref.rollout.multi_turn.format",
    "actor_rollout_ref.rollout.n",
    "actor_rollout_ref.rollout.name",
    "actor_rollout_ref.rollout.temperature",
    "actor_rollout_ref.rollout.tensor_model_parallel_size",
    "actor_rollout_ref.rollout.top_k",
    "actor_rollout_ref.rollout.top_p",
    "actor_rollout_ref.rollout.val_kwargs.do_sample",
    "actor_rollout_ref.rollout.val_kwargs.n",
    "actor_rollout_ref.rollout.val_kwargs.temperature",
    "actor_rollout_ref.rollout.val_kwargs.top_k",
    "actor_rollout_ref.rollout.val_kwargs.top_p",
    "algorithm.adv_estimator",
    "algorithm.kl_ctrl.kl_coef",
    "algorithm.rollout_correction.rollout_is_threshold",
    "algorithm.use_kl_in_reward",
    "custom_reward_function.name",
    "custom_reward_function.path",
    "data.apply_chat_template_kwargs.reasoning_effort",
    "data.custom_cls.name",
    "data.custom_cls.path",
    "data.filter_overlong_prompts",
    "data.image_key",
    "data.max_prompt_length",
    "data.max_response_length",
    "data.prompt_key",
    "data.return_raw_chat",
    "data.shuffle",
    "data.train_batch_size",
    "data.train_files",
    "data.truncation",
    "data.trust_remote_code",
    "data.val_files",
    "global_profiler.global_tool_config.torch_memory.stack_depth",
    "global_profiler.global_tool_config.torch_memory.trace_alloc_max_entries",
    "global_profiler.save_path",
    "global_profiler.steps",
    "global_profiler.tool",
    "reward_model.enable",
    "reward_model.model.path",
    "reward_model.num_workers",
    "reward_model.rollout.gpu_memory_utilization",
    "reward_model.rollout.name",
    "reward_model.rollout.prompt_length",
    "reward_model.rollout.response_length",
    "reward_model.rollout.tensor_model_parallel_size",
    "reward_model.use_reward_loop",
    "trainer.critic_warmup",
    "trainer.default_local_dir",
    "trainer.experiment_name",
    "trainer.logger",
    "trainer.n_gpus_per_node",
    "trainer.nnodes",
    "trainer.project_name",
    "trainer.resume_from_path",
    "trainer.resume_mode",
    "trainer.save_freq",
    "trainer.test_freq",
    "trainer.total_epochs",
    "trainer.use_legacy_worker_impl",
    "trainer.val_before_train",
)
