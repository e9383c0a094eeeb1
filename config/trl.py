"""TRL's argument names (SFTConfig, GRPOConfig) as this project's config keys.

`create_sft_trainer` and `create_rl_trainer` (trainer/api.py) accept TRL's names where they mean
the same here, translated by the registries below; a TRL name with no counterpart is refused in
one line naming the nearest key. docs/coming-from-trl.md is the table a user reads; a test
holds it to these registries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from config.schema import ConfigError


@dataclass(frozen=True)
class TRLContext:
    """What a translation may need beside its own value: the other TRL arguments given, the
    world size, and the config's current value of a key (defaults and the caller's own keys)."""

    given: Mapping[str, Any]
    world_size: int
    lookup: Callable[[str], Any]


Translate = Callable[[Any, TRLContext], dict]


def _to(key: str, convert: Callable[[Any], Any] = lambda v: v) -> Translate:
    return lambda value, ctx: {key: convert(value)}


def _report_to(value: Any, ctx: TRLContext) -> dict:
    names = [value] if isinstance(value, str) else list(value or [])
    if "all" in names:
        raise ConfigError("report_to='all': name the trackers (trainer.logger: console, file, mlflow, swanlab, wandb, tensorboard)")
    trackers = [n for n in names if n != "none"]
    return {"trainer.logger": ["console", *[t for t in trackers if t != "console"]]}


def _use_vllm(value: Any, ctx: TRLContext) -> dict:
    return {"rollout.name": "vllm" if value else "hf"}


def _vllm_mode(value: Any, ctx: TRLContext) -> dict:
    # TRL's colocate mode is what rollout.name=vllm does here (one engine per rank, in process).
    if value != "colocate":
        raise ConfigError(f"vllm_mode={value!r} (GRPOConfig): only 'colocate' here (an engine in each training "
                          "process, rollout.name=vllm); a separate vLLM server is not supported")
    return {}


def _bf16(value: Any, ctx: TRLContext) -> dict:
    return {"model.fsdp_config.param_dtype": "bf16" if value else "fp32"}


def _epochs(value: Any, ctx: TRLContext) -> dict:
    # TRL's max_steps wins over num_train_epochs; without it the epochs decide here too.
    return {"trainer.total_epochs": value, **({} if "max_steps" in ctx.given else {"trainer.total_training_steps": None})}


def _max_steps(value: Any, ctx: TRLContext) -> dict:
    return {"trainer.total_training_steps": None if value is None or value < 0 else value}


def _accumulation_alone(value: Any, ctx: TRLContext) -> dict:
    if "per_device_train_batch_size" not in ctx.given:
        raise ConfigError("gradient_accumulation_steps: give per_device_train_batch_size with it "
                          "(together they make the global batch, as in TRL)")
    return {}  # used by per_device_train_batch_size


def _behaviour_here(name: str, here: bool, what: str) -> Translate:
    """A TRL switch whose one setting is this project's fixed behaviour: that setting is accepted."""
    def translate(value: Any, ctx: TRLContext) -> dict:
        if value is None or bool(value) == here:
            return {}
        raise ConfigError(f"{name}={value!r}: {what}")
    return translate


# Both trainers' TRL names (TrainingArguments') that mean the same here.
_COMMON: dict[str, Translate] = {
    "learning_rate": _to("optim.lr"),
    "num_train_epochs": _epochs,
    "max_steps": _max_steps,
    "gradient_accumulation_steps": _accumulation_alone,
    "output_dir": _to("trainer.default_local_dir"),
    "run_name": _to("trainer.experiment_name"),
    "report_to": _report_to,
    "seed": _to("trainer.seed"),
    "logging_steps": _to("trainer.log_freq"),
    "eval_steps": _to("trainer.test_freq"),
    "save_steps": _to("trainer.save_freq"),
    "save_total_limit": _to("trainer.max_ckpt_to_keep"),
    "warmup_ratio": _to("optim.lr_warmup_steps_ratio"),
    "warmup_steps": _to("optim.lr_warmup_steps"),
    "lr_scheduler_type": _to("optim.lr_scheduler"),
    "weight_decay": _to("optim.weight_decay"),
    "max_grad_norm": _to("optim.clip_grad"),
    "gradient_checkpointing": _to("model.enable_gradient_checkpointing"),
    "bf16": _bf16,
}
_COMMON_NEAREST: dict[str, str] = {
    "args": "pass the config's fields as keywords (learning_rate=..., max_length=...)",
    "eval_strategy": "nearest: trainer.test_freq (validation also runs at each epoch end and the last step)",
    "save_strategy": "nearest: trainer.save_freq (-1: only at the end)",
    "logging_strategy": "nearest: trainer.log_freq",
    "per_device_eval_batch_size": "nearest: data.micro_batch_size_per_gpu (validation uses the training micro-batch size)",
    "fp16": "nearest: model.fsdp_config.param_dtype (bf16 or fp32; fp16 is not offered)",
    "resume_from_checkpoint": "nearest: trainer.resume_from_path (resume is automatic from the run directory's latest checkpoint)",
    "push_to_hub": "none: the run exports a Hugging Face folder (trainer.export_hf_model) to push yourself",
    "peft_config": "nearest: model.lora_rank, model.lora_alpha, model.target_modules",
    "processing_class": "nearest: the model folder's tokenizer, with data.chat_template to replace its template",
    "model_init_kwargs": "nearest: model.* keys (model.attn_implementation, model.trust_remote_code; its dtype: "
                         "model.fsdp_config.model_dtype for the weights, model.fsdp_config.param_dtype for compute)",
    "optim": "none: the optimizer is AdamW (optim.betas, optim.weight_decay)",
    "deepspeed": "none: FSDP2 shards the model (model.fsdp_config.*)",
    "fsdp": "none: FSDP2 is always on (model.fsdp_config.*)",
}


# ----------------------------------------------------------------------------- SFT
def _sft_batch(value: Any, ctx: TRLContext) -> dict:
    accumulation = ctx.given.get("gradient_accumulation_steps") or 1
    return {"data.micro_batch_size_per_gpu": value, "data.train_batch_size": value * accumulation * ctx.world_size}


SFT: dict[str, Translate] = {
    **_COMMON,
    "max_length": _to("data.max_length"),
    "per_device_train_batch_size": _sft_batch,
    "completion_only_loss": _behaviour_here(
        "completion_only_loss", True, "the loss here is always on the completion (response) only"),
    "assistant_only_loss": _behaviour_here(
        "assistant_only_loss", True, "the loss on conversations here is always on assistant turns only"),
}
SFT_NEAREST: dict[str, str] = {
    **_COMMON_NEAREST,
    "packing": "nearest: data.use_dynamic_bsz and data.group_by_length (on by default), model.use_remove_padding with flash-attention",
    "padding_free": "nearest: model.use_remove_padding (flash-attention varlen; CPU uses length-grouped batches)",
    "dataset_text_field": "none: SFT here trains on responses; give prompt/completion or messages columns",
    "max_seq_length": "nearest: max_length (data.max_length)",
    "dataset_num_proc": "none: tokenization runs once into the token cache (data.cache_dir)",
    "formatting_func": "none: give prompt/completion or messages columns (data.prompt_key, data.response_key, data.multiturn.*)",
    "chat_template_path": "nearest: data.chat_template",
    "eos_token": "none: the tokenizer's EOS ends every response",
    "neftune_noise_alpha": "none",
}


# ----------------------------------------------------------------------------- GRPO
_LOSS_TYPES = {"dapo": "token-mean", "grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm"}


def _loss_type(value: Any, ctx: TRLContext) -> dict:
    if value == "bnpo":
        raise ConfigError("loss_type='bnpo': nearest: algorithm.loss_agg_mode=token-mean (normalised over the global batch's tokens)")
    if value not in _LOSS_TYPES:
        raise ConfigError(f"loss_type={value!r}: one of {', '.join(_LOSS_TYPES)} (algorithm.loss_agg_mode)")
    return {"algorithm.loss_agg_mode": _LOSS_TYPES[value]}


def _epsilon(value: Any, ctx: TRLContext) -> dict:
    # TRL: epsilon_high defaults to epsilon (a symmetric clip).
    return {"algorithm.clip_ratio_low": value, **({} if "epsilon_high" in ctx.given else {"algorithm.clip_ratio_high": value})}


def _scale_rewards(value: Any, ctx: TRLContext) -> dict:
    if value in (True, "group"):
        return {"algorithm.norm_adv_by_std_in_grpo": True}
    if value in (False, "none"):
        return {"algorithm.norm_adv_by_std_in_grpo": False}
    raise ConfigError(f"scale_rewards={value!r}: 'group' (True) or 'none' (False) (algorithm.norm_adv_by_std_in_grpo); "
                      "'batch' has no counterpart")


def _importance_sampling_level(value: Any, ctx: TRLContext) -> dict:
    levels = {"token": "vanilla", "sequence": "gspo"}
    if value not in levels:
        raise ConfigError(f"importance_sampling_level={value!r}: 'token' or 'sequence' (algorithm.policy_loss=vanilla|gspo)")
    return {"algorithm.policy_loss": levels[value]}


def _grpo_batch(value: Any, ctx: TRLContext) -> dict:
    """TRL counts completions per device per step; here prompts per step over all ranks."""
    completions = value * (ctx.given.get("gradient_accumulation_steps") or 1) * ctx.world_size
    group = ctx.given.get("num_generations") or ctx.lookup("rollout.responses_per_prompt")
    if completions % group:
        raise ConfigError(f"per_device_train_batch_size={value}: {completions} completions per step (× accumulation × "
                          f"{ctx.world_size} rank(s)) do not divide into groups of num_generations={group}")
    return {"actor.micro_batch_size_per_gpu": value, "data.prompts_per_step": completions // group}


def _top_k(value: Any, ctx: TRLContext) -> dict:
    return {"rollout.top_k": value or 0}  # TRL's None (off) is 0 here


GRPO: dict[str, Translate] = {
    **_COMMON,
    "num_generations": _to("rollout.responses_per_prompt"),
    "max_prompt_length": _to("data.max_prompt_length"),
    "max_completion_length": _to("rollout.max_new_tokens"),
    "temperature": _to("rollout.temperature"),
    "top_p": _to("rollout.top_p"),
    "top_k": _top_k,
    "beta": _to("algorithm.kl_coef"),
    "epsilon": _epsilon,
    "epsilon_high": _to("algorithm.clip_ratio_high"),
    "loss_type": _loss_type,
    "scale_rewards": _scale_rewards,
    "importance_sampling_level": _importance_sampling_level,
    "num_iterations": _to("actor.ppo_epochs"),
    "steps_per_generation": _to("actor.mini_batches_per_step"),
    "log_completions": _to("logging.sample_logging.enabled", bool),
    "per_device_train_batch_size": _grpo_batch,
    "use_vllm": _use_vllm,
    "vllm_mode": _vllm_mode,
}
GRPO_NEAREST: dict[str, str] = {
    **_COMMON_NEAREST,
    "reward_funcs": "nearest: the reward_functions argument (reward.functions)",
    "reward_weights": "nearest: reward.functions[i].weight",
    "generation_batch_size": "nearest: data.prompts_per_step × rollout.responses_per_prompt",
    "num_completions_to_print": "nearest: logging.sample_logging.num_samples",
    "mask_truncated_completions": "none",
    "delta": "nearest: algorithm.clip_ratio_c (dual clip of negative advantages; not INTELLECT-2's two-sided clip)",
    "sync_ref_model": "none: the reference model stays frozen (algorithm.kl_coef > 0 builds it)",
    "max_length": "nearest: max_prompt_length (data.max_prompt_length) and max_completion_length (rollout.max_new_tokens)",
}


def translate(given: Mapping[str, Any], names: Mapping[str, Translate], nearest: Mapping[str, str], trainer: str,
              world_size: int, lookup: Callable[[str], Any]) -> dict[str, Any]:
    """Config values for the TRL names in `given` (others are left to the caller); a name with no
    counterpart is refused in one line naming the nearest key."""
    for name in given:
        if name in nearest:
            raise ConfigError(f"{name} ({trainer}): not accepted here; {nearest[name]}")
    ctx = TRLContext(given, world_size, lookup)
    values: dict[str, Any] = {}
    for name, value in given.items():
        if name in names:
            values.update(names[name](value, ctx))
    return values


def is_trl_name(name: str, names: Mapping[str, Translate], nearest: Mapping[str, str]) -> bool:
    return name in names or name in nearest
