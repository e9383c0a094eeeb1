"""verl's configuration keys: what each means here.
(Over 400 lines: mostly the table of verl's keys, one line each; the rules stay beside it.)

verl users paste their command lines. Every key verl's SFT trainer config has (and every key
verl's FSDP GRPO example scripts use) is listed here with what it does in this project:

- `Alias`: the same meaning as one of our keys, which it sets (`data.micro_batch_size`,
  `actor_rollout_ref.rollout.n`, ...). Setting both to different values is an error.
- `Inert`: nothing to do here (launch placement decided by torchrun, FSDP1 knobs, /dev/shm
  copies). Accepted; one log line says why it changes nothing, when it is set.
- `Pending`: a capability this project does not have yet (sequence parallelism and padding-free
  batches in RL; SFT has them). Refused in one line naming the feature, unless it asks for
  nothing (`use_remove_padding=false`).
- `Refused`: no meaning here (vLLM engine knobs, profilers): refused in one line
  with the reason, unless it asks for nothing (`use_kl_in_reward=false`). Never silently ignored.

Hydra accepts only keys the config has: `register_with_hydra()` puts these keys, at verl's
defaults, into Hydra's config store, which the base YAML files list in their defaults;
`translate()` takes them out of the composed config before the typed schema sees it.
"""

from __future__ import annotations

import os

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

from config.schema import ConfigError

_ABSENT = object()

@dataclass
class Context:
    """What a converter may look at: the whole composed config and the launch."""

    raw: dict
    world_size: int
    cli_keys: set[str]
    notes: list[str] = field(default_factory=list)  # log lines for rank 0
    refusals: list[str] = field(default_factory=list)  # all reported at once, one line

    def get(self, key: str, default: Any = None) -> Any:
        node: Any = self.raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def set(self, key: str, value: Any) -> None:
        parts = key.split(".")
        node = self.raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    def pop(self, key: str) -> Any:
        parts = key.split(".")
        node: Any = self.raw
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                return _ABSENT
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            return _ABSENT
        value = node.pop(parts[-1])
        for depth in range(len(parts) - 1, 0, -1):  # drop sections only verl's keys filled
            parent = self.get(".".join(parts[: depth - 1])) if depth > 1 else self.raw
            if parent.get(parts[depth - 1]) == {}:
                del parent[parts[depth - 1]]
        return value

    def on_command_line(self, key: str) -> bool:
        return key in self.cli_keys


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


@dataclass(frozen=True)
class VerlKey:
    key: str
    default: Any = None  # verl's default, which the YAML carries; a value that asks for nothing

    def asks_nothing(self, value: Any) -> bool:
        return value is None or _same(value, self.default)

    def wanted(self, value: Any, on_command_line: bool) -> bool:
        """Whether `value` asks for anything (then `apply` handles it)."""
        return not self.asks_nothing(value)

    def apply(self, value: Any, ctx: Context) -> None:  # pragma: no cover - every kind overrides
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - every kind overrides
        """What the key does here, for docs/reference/verl-keys.md."""
        raise NotImplementedError


@dataclass(frozen=True)
class Alias(VerlKey):
    target: str = ""
    convert: Optional[Callable[[Any, Context], Any]] = None
    why: str = ""  # shown in the log line when the conversion is not the identity
    doc: str = ""  # the reference page's text, when the conversion also refuses some values

    def wanted(self, value: Any, on_command_line: bool) -> bool:
        # verl's default value only counts when the user wrote it
        return value is not None and (on_command_line or not _same(value, self.default))

    def apply(self, value: Any, ctx: Context) -> None:
        ours = self.convert(value, ctx) if self.convert else value
        if ctx.on_command_line(self.target) and not _same(ctx.get(self.target), ours):
            ctx.refusals.append(
                f"{self.key}={value} and {self.target}={ctx.get(self.target)} both set; {self.key} is verl's name of "
                f"{self.target}: keep one"
            )
            return
        ctx.set(self.target, ours)
        how = f" ({self.why})" if self.why else ""
        ctx.notes.append(f"{self.key}={value} (verl): read as {self.target}={ours}{how}")

    def describe(self) -> str:
        return self.doc or f"our `{self.target}`" + (f" ({self.why})" if self.why else "")


@dataclass(frozen=True)
class Inert(VerlKey):
    reason: str = ""

    def wanted(self, value: Any, on_command_line: bool) -> bool:
        return on_command_line or not self.asks_nothing(value)

    def apply(self, value: Any, ctx: Context) -> None:
        ctx.notes.append(f"{self.key}={value}: changes nothing here ({self.reason})")

    def describe(self) -> str:
        return f"accepted, changes nothing: {self.reason}"


@dataclass(frozen=True)
class Pending(VerlKey):
    feature: str = ""

    def apply(self, value: Any, ctx: Context) -> None:
        ctx.refusals.append(f"{self.key}={value}: not available yet ({self.feature})")

    def describe(self) -> str:
        unless = f" unless {self.default}" if self.default is not None else ""
        return f"refused{unless}: {self.feature}, not available yet"


@dataclass(frozen=True)
class Refused(VerlKey):
    reason: str = ""
    allowed: tuple = ()  # further values that ask for nothing
    when_written: bool = False  # refused whenever the user writes it (an inference-engine knob asks for the engine)

    def asks_nothing(self, value: Any) -> bool:
        return super().asks_nothing(value) or any(_same(value, a) for a in self.allowed)

    def wanted(self, value: Any, on_command_line: bool) -> bool:
        return (self.when_written and on_command_line) or not self.asks_nothing(value)

    def apply(self, value: Any, ctx: Context) -> None:
        ctx.refusals.append(f"{self.key}={value}: {self.reason}")

    def describe(self) -> str:
        fine = list(dict.fromkeys(v for v in (self.default, *self.allowed) if v is not None))
        when = "refused" if self.when_written or not fine else f"refused unless {' or '.join(map(str, fine))}"
        return f"{when}: {self.reason}"


@dataclass(frozen=True)
class Rule(VerlKey):
    """A verl key whose meaning here takes a few lines (several of our keys, or a check)."""

    fn: Optional[Callable[[Any, Context], None]] = None
    doc: str = ""  # what it does here, for docs/reference/verl-keys.md

    def wanted(self, value: Any, on_command_line: bool) -> bool:
        return value is not None and (on_command_line or not _same(value, self.default))

    def apply(self, value: Any, ctx: Context) -> None:
        self.fn(value, ctx)

    def describe(self) -> str:
        return self.doc


def translate(raw: dict, table: Sequence[VerlKey], world_size: int, cli_keys: Iterable[str]) -> Context:
    """Remove every verl key of `table` from `raw`, applying its meaning. Raises one ConfigError
    listing every refused key; returns the context with the notes to log."""
    ctx = Context(raw, world_size, set(cli_keys))
    for entry in table:
        value = ctx.pop(entry.key)
        if value is _ABSENT:
            continue
        if entry.wanted(value, ctx.on_command_line(entry.key)):
            try:
                entry.apply(value, ctx)
            except ConfigError as err:
                ctx.refusals.append(str(err))
    if ctx.refusals:  # all of them at once: one edit of the command line, not one per run
        raise ConfigError("; ".join(ctx.refusals))
    return ctx


def as_list(value: Any) -> Any:
    """verl takes `trainer.logger=console` as well as a list."""
    return [value] if isinstance(value, str) else value


# ----------------------------------------------------------------------------- SFT
def _micro_batch_size(value: Any, ctx: Context) -> int:
    return int(value)


SFT_KEYS: tuple[VerlKey, ...] = (
    Alias("ulysses_sequence_parallel_size", 1, target="model.ulysses_sequence_parallel_size"),
    Alias("use_remove_padding", False, target="model.use_remove_padding"),
    Alias("data.micro_batch_size", None, target="data.micro_batch_size_per_gpu", convert=_micro_batch_size,
          why="verl's deprecated micro-batch key; its SFT examples use it per GPU"),
    Inert("data.balance_dp_token", False, reason="every rank's share of a batch is already balanced by tokens, and the "
          "loss is normalised by the global token count"),
    Inert("data.use_shm", False, reason="verl copies data to /dev/shm first; files are read in place here"),
    Refused("data.custom_cls.path", None, reason="custom dataset classes are verl's Dataset API; give parquet/JSONL "
            "columns (data.prompt_key/response_key or data.multiturn)"),
    Refused("data.custom_cls.name", None, reason="custom dataset classes are verl's Dataset API"),
    Inert("model.use_shm", False, reason="verl copies the model to /dev/shm first; it is loaded in place here"),
    Inert("model.strategy", "fsdp2", reason="always FSDP2 (fully_shard) here"),
    Inert("model.fsdp_config.wrap_policy.min_num_params", 0, reason="FSDP2 shards each decoder layer, then the root"),
    Alias("model.fsdp_config.offload_params", False, target="model.fsdp_config.cpu_offload",
          why="FSDP2 offloads parameters, gradients and optimizer state together"),
    Refused("optim.optimizer", "AdamW", reason="the optimizer is torch.optim.AdamW here"),
    Refused("optim.optimizer_impl", "torch.optim", reason="the optimizer is torch.optim.AdamW here"),
    Inert("optim.total_training_steps", -1, reason="the trainer sets the schedule's length from the data and epochs"),
    Alias("optim.lr_scheduler_type", None, target="optim.lr_scheduler", why="verl's newer name"),
    Alias("optim.warmup_style", None, target="optim.lr_scheduler", why="verl's deprecated name"),
    Inert("trainer.default_hdfs_dir", None, reason="nothing is copied to HDFS; the run stays in trainer.default_local_dir"),
    Inert("trainer.nnodes", 1, reason="torchrun decides the placement: --nnodes"),
    Inert("trainer.n_gpus_per_node", 8, reason="torchrun decides the placement: --nproc_per_node"),
)


def translate_sft(raw: dict, world_size: int, cli_keys: Iterable[str]) -> Context:
    trainer = raw.get("trainer")
    if isinstance(trainer, dict) and "logger" in trainer:
        trainer["logger"] = as_list(trainer["logger"])
    return translate(raw, SFT_KEYS, world_size, cli_keys)


def translator(schema: type) -> Optional[Callable[[dict, int, Iterable[str]], Context]]:
    """The verl-key translation for a config schema (None: it has no verl counterpart)."""
    from config.rl_schema import RLConfig
    from config.schema import SFTConfig

    return {SFTConfig: translate_sft, RLConfig: translate_rl}.get(schema)


def defaults_node(table: Sequence[VerlKey]) -> dict:
    """verl's keys with verl's default values, nested: the config node Hydra composes them from."""
    ctx = Context({}, 1, set())
    for entry in table:
        ctx.set(entry.key, entry.default)
    return ctx.raw


def register_with_hydra() -> None:
    """`verl_sft_keys` and `verl_ppo_keys` in Hydra's config store, so the base YAML files can
    list them in their defaults: Hydra accepts a command-line key only if the config has it,
    and this table stays the one place where verl's keys are written."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="verl_sft_keys", node=defaults_node(SFT_KEYS), package="_global_", provider="sample-aware-trainer")
    store.store(name="verl_ppo_keys", node=defaults_node(PPO_KEYS), package="_global_", provider="sample-aware-trainer")


# ----------------------------------------------------------------------------- RL (verl's main_ppo)
ARA = "actor_rollout_ref"
ENGINE = "not read by the rollout engines here (rollout.name=hf or vllm, docs/rollout-engines.md)"
DTYPE_NAMES = {"bf16": "bf16", "bfloat16": "bf16", "fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16"}
KL_ESTIMATORS = {"kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


def _dtype(key: str) -> Callable[[Any, Context], str]:
    def convert(value: Any, ctx: Context) -> str:
        if str(value) not in DTYPE_NAMES:
            raise ConfigError(f"{key}={value}: expected one of {', '.join(DTYPE_NAMES)}")
        return DTYPE_NAMES[str(value)]

    return convert


def _kl_estimator(value: Any, ctx: Context) -> str:
    if value not in KL_ESTIMATORS:
        raise ConfigError(f"{ARA}.actor.kl_loss_type={value}: the estimators here are {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[value]


def _top_k(value: Any, ctx: Context) -> int:
    return max(int(value), 0)  # verl's -1 is our 0: off


def _mini_batches(value: Any, ctx: Context) -> int:
    """verl counts a mini-batch in prompts; here, how many mini-batches a step's rollout is cut into."""
    prompts = int(ctx.get("data.prompts_per_step"))
    if int(value) <= 0 or prompts % int(value):
        raise ConfigError(f"{ARA}.actor.ppo_mini_batch_size={value}: must divide data.train_batch_size "
                          f"(data.prompts_per_step) = {prompts}")
    return prompts // int(value)


def _kl_loss(value: Any, ctx: Context) -> None:
    """use_kl_loss and kl_loss_coef together are our algorithm.kl_coef (0: no reference model)."""
    coef = ctx.pop(f"{ARA}.actor.kl_loss_coef")
    coef = 0.001 if coef is _ABSENT or coef is None else float(coef)  # verl's default coefficient
    ours = coef if value else 0.0
    ctx.set("algorithm.kl_coef", ours)
    ctx.notes.append(f"{ARA}.actor.use_kl_loss={value}: set algorithm.kl_coef={ours} (verl's kl_loss_coef)")


def _clip_ratio(value: Any, ctx: Context) -> None:
    """verl's clip_ratio is both ends unless clip_ratio_low/high say otherwise."""
    for end in ("low", "high"):
        if ctx.get(f"{ARA}.actor.clip_ratio_{end}") is None:
            ctx.set(f"algorithm.clip_ratio_{end}", float(value))
    ctx.notes.append(f"{ARA}.actor.clip_ratio={value}: set algorithm.clip_ratio_low/high (where not given)")


def _placement(value: Any, ctx: Context) -> None:
    """torchrun decides the placement; verl's node and GPU counts must agree with it."""
    nodes = ctx.pop("trainer.nnodes")
    nodes = 1 if nodes in (_ABSENT, None) else int(nodes)
    if nodes * int(value) != ctx.world_size:
        raise ConfigError(f"trainer.n_gpus_per_node={value}: trainer.nnodes × n_gpus_per_node = {nodes} × {value}, but "
                          f"torchrun started {ctx.world_size} process(es); torchrun decides the placement (drop both, or match them)")
    ctx.notes.append(f"trainer.nnodes={nodes} trainer.n_gpus_per_node={value}: match the {ctx.world_size} process(es) "
                     "torchrun started (torchrun decides the placement)")


def _critic_path(value: Any, ctx: Context) -> None:
    """verl builds the critic from its own path; here it is the actor's model with a value head."""
    actor = ctx.get("model.partial_pretrain")
    if os.path.expanduser(str(value)) != os.path.expanduser(str(actor)):
        raise ConfigError(f"critic.model.path={value}: the critic starts from the actor's model (model.partial_pretrain={actor}) "
                          "with a value head; a critic from another model is not available here")
    ctx.notes.append(f"critic.model.path={value}: the actor's model, with a value head")


def _critic_as_actor(key: str, ours: str, actors: Callable[[Context], Any], convert: Callable[[Any, Context], Any] = lambda v, ctx: v):
    """A critic setting that here is the actor's (`ours`): accepted when it asks for the actor's value."""
    def check(value: Any, ctx: Context) -> None:
        try:
            same = _same(convert(value, ctx), ctx.get(ours))
        except (TypeError, ValueError, ZeroDivisionError):
            same = False
        if not same:
            ctx.refusals.append(f"{key}={value}: the critic uses the actor's setting here ({ours}={ctx.get(ours)}, "
                                f"i.e. {actors(ctx)}); give the critic the same value or drop {key}")
        else:
            ctx.notes.append(f"{key}={value}: the actor's setting ({ours}), as here the critic shares it")
    return check


def _mini_batch_prompts(value: Any, ctx: Context) -> int:
    prompts = int(ctx.get("data.prompts_per_step"))
    if int(value) <= 0 or prompts % int(value):
        raise ValueError(value)
    return prompts // int(value)


def _rollout_name(value: Any, ctx: Context) -> None:
    """verl's engine name is our rollout.name; verl's scripts say vllm (or sglang)."""
    from config.rl_schema import OTHER_ENGINES, ROLLOUT_ENGINES

    name = str(value)
    if name in OTHER_ENGINES:
        raise ConfigError(f"{ARA}.rollout.name={name}: {OTHER_ENGINES[name]}; use {ARA}.rollout.name=vllm "
                          "(the same kind of engine, colocated) or hf")
    if name not in ROLLOUT_ENGINES:
        raise ConfigError(f"{ARA}.rollout.name={name}: expected one of {', '.join(ROLLOUT_ENGINES)}")
    if ctx.on_command_line("rollout.name") and ctx.get("rollout.name") != name:
        raise ConfigError(f"{ARA}.rollout.name={name} and rollout.name={ctx.get('rollout.name')} both set; keep one")
    ctx.set("rollout.name", name)
    ctx.notes.append(f"{ARA}.rollout.name={name} (verl): read as rollout.name={name}")


def _tensor_parallel(value: Any, ctx: Context) -> int:
    if int(value) != 1:
        raise ConfigError(f"{ARA}.rollout.tensor_model_parallel_size={value}: the colocated engine holds the whole "
                          "model on each rank here (tensor parallel 1); set it to 1 and shard the actor with FSDP")
    return 1


def _vllm(key: str, default: Any) -> Alias:
    """A vLLM engine argument: our rollout.vllm.<key> (read with rollout.name=vllm)."""
    return Alias(f"{ARA}.rollout.{key}", default, target=f"rollout.vllm.{key}")


def _engine(key: str, default: Any) -> Refused:
    return Refused(f"{ARA}.rollout.{key}", default, reason=f"an inference-engine setting: {ENGINE}", when_written=True)


def _profiler(section: str) -> tuple[VerlKey, ...]:
    base = f"{ARA}.{section}.profiler"
    why = "used only with profiler.enable, which is not available here"
    return (
        Refused(f"{base}.enable", False, reason="verl's profiler integration is not available here (use torch.profiler around a run)"),
        Inert(f"{base}.all_ranks", False, reason=why),
        Inert(f"{base}.ranks", [], reason=why),
        Inert(f"{base}.tool_config.npu.analysis", True, reason=why),
        Inert(f"{base}.tool_config.npu.contents", [], reason=why),
        Inert(f"{base}.tool_config.npu.discrete", False, reason=why),
        Inert(f"{base}.tool_config.npu.level", "level0", reason=why),
    )


OFFLOAD = "FSDP2 offloads parameters, gradients and optimizer state together"
FSDP1 = "an FSDP1 setting; FSDP2 (fully_shard) here"
RM_ON_FSDP = "the reward model runs on the FSDP2 workers here (a sequence classifier), not on an inference engine"

PPO_KEYS: tuple[VerlKey, ...] = (
    # data
    Alias("data.train_batch_size", 1024, target="data.prompts_per_step", why="prompts per step, all ranks"),
    Alias("data.max_response_length", 512, target="rollout.max_new_tokens"),
    Alias("data.trust_remote_code", False, target="model.trust_remote_code"),
    Alias("data.val_max_samples", -1, target="data.max_val_prompts", convert=lambda v, ctx: None if int(v) < 0 else int(v)),
    Inert("data.return_raw_chat", True, reason="prompts are kept as chat messages and templated here"),
    Inert("data.image_key", "images", reason="prompts are text here; image columns are not read"),
    Inert("data.use_shm", False, reason="data are read in place here"),
    Refused("data.custom_cls.path", None, reason="custom dataset classes are verl's Dataset API; give parquet/JSONL prompts"),
    Refused("data.custom_cls.name", None, reason="custom dataset classes are verl's Dataset API"),
    # model
    Alias(f"{ARA}.model.path", "~/models/deepseek-llm-7b-chat", target="model.partial_pretrain"),
    Alias(f"{ARA}.model.enable_gradient_checkpointing", True, target="model.enable_gradient_checkpointing"),
    Alias(f"{ARA}.model.trust_remote_code", False, target="model.trust_remote_code"),
    Alias(f"{ARA}.model.external_lib", None, target="model.external_lib"),
    # In almost every verl GRPO script. Packing only saves compute: RL micro-batches here are padded and give
    # the same log-probs, so the key is accepted rather than making users edit every command line.
    Inert(f"{ARA}.model.use_remove_padding", False, reason="RL micro-batches are padded here, with the same results; "
          "padding-free packing is SFT's use_remove_padding"),
    Alias(f"{ARA}.model.lora_rank", 0, target="model.lora_rank", why="LoRA on the actor; the reference is its base"),
    Alias(f"{ARA}.model.lora_alpha", 16, target="model.lora_alpha"),
    Alias(f"{ARA}.model.target_modules", "all-linear", target="model.target_modules"),
    Alias(f"{ARA}.model.exclude_modules", None, target="model.exclude_modules"),
    Alias(f"{ARA}.model.lora_adapter_path", None, target="model.lora_adapter_path"),
    # In verl's GRPO scripts; what it saves is mostly done here already, so it is accepted, not refused.
    Inert(f"{ARA}.model.use_fused_kernels", False, reason="log-probs here run the LM head on the response positions "
          "only (no logits for prompts or padding); the vocabulary-wide logits of those positions are still "
          "materialised, which verl's fused kernels also avoid"),
    Inert(f"{ARA}.model.use_shm", False, reason="the model is loaded in place here"),
    Inert(f"{ARA}.hybrid_engine", True, reason="the actor's own weights always generate the rollouts here"),
    Alias(f"{ARA}.nccl_timeout", 600, target="trainer.collective_timeout_seconds"),
    # actor
    Alias(f"{ARA}.actor.optim.lr", 1e-6, target="optim.lr"),
    Alias(f"{ARA}.actor.optim.betas", [0.9, 0.999], target="optim.betas"),
    Alias(f"{ARA}.actor.optim.weight_decay", 0.01, target="optim.weight_decay"),
    Alias(f"{ARA}.actor.optim.lr_warmup_steps_ratio", 0.0, target="optim.lr_warmup_steps_ratio"),
    Alias(f"{ARA}.actor.optim.lr_warmup_steps", -1, target="optim.lr_warmup_steps"),
    Alias(f"{ARA}.actor.optim.lr_scheduler_type", "constant", target="optim.lr_scheduler"),
    Alias(f"{ARA}.actor.optim.warmup_style", None, target="optim.lr_scheduler", why="verl's deprecated name"),
    Alias(f"{ARA}.actor.optim.min_lr_ratio", 0.0, target="optim.min_lr_ratio"),
    Alias(f"{ARA}.actor.optim.num_cycles", 0.5, target="optim.num_cycles"),
    Alias(f"{ARA}.actor.optim.clip_grad", 1.0, target="optim.clip_grad"),
    Alias(f"{ARA}.actor.grad_clip", 1.0, target="optim.clip_grad"),
    Refused(f"{ARA}.actor.optim.optimizer", "AdamW", reason="the optimizer is torch.optim.AdamW here"),
    Alias(f"{ARA}.actor.ppo_mini_batch_size", 256, target="actor.mini_batches_per_step", convert=_mini_batches,
          why="the step's prompts cut into mini-batches of that many prompts"),
    Alias(f"{ARA}.actor.ppo_micro_batch_size_per_gpu", None, target="actor.micro_batch_size_per_gpu"),
    Alias(f"{ARA}.actor.ppo_epochs", 1, target="actor.ppo_epochs"),
    Rule(f"{ARA}.actor.use_kl_loss", False, fn=_kl_loss,
         doc="our `algorithm.kl_coef` (kl_loss_coef when true, 0 when false; a reference model only when > 0)"),
    Rule(f"{ARA}.actor.kl_loss_coef", 0.001,
         fn=lambda v, ctx: ctx.notes.append(f"{ARA}.actor.kl_loss_coef={v}: changes nothing without use_kl_loss=true"),
         doc="our `algorithm.kl_coef` with use_kl_loss=true; without it, nothing (as in verl)"),
    Alias(f"{ARA}.actor.kl_loss_type", "low_var_kl", target="algorithm.kl_estimator", convert=_kl_estimator),
    Rule(f"{ARA}.actor.clip_ratio", 0.2, fn=_clip_ratio,
         doc="our `algorithm.clip_ratio_low` and `clip_ratio_high` (where those are not given)"),
    Alias(f"{ARA}.actor.clip_ratio_low", None, target="algorithm.clip_ratio_low"),
    Alias(f"{ARA}.actor.clip_ratio_high", None, target="algorithm.clip_ratio_high"),
    Alias(f"{ARA}.actor.clip_ratio_c", 3.0, target="algorithm.clip_ratio_c"),
    Alias(f"{ARA}.actor.loss_agg_mode", "token-mean", target="algorithm.loss_agg_mode"),
    Alias(f"{ARA}.actor.policy_loss.loss_mode", "vanilla", target="algorithm.policy_loss"),
    Refused(f"{ARA}.actor.entropy_coeff", 0, allowed=(0.0,), reason="no entropy bonus here (it must be 0)"),
    Alias(f"{ARA}.actor.use_dynamic_bsz", False, target="actor.use_dynamic_bsz"),
    Alias(f"{ARA}.actor.ppo_max_token_len_per_gpu", 16384, target="actor.ppo_max_token_len_per_gpu"),
    Alias(f"{ARA}.actor.fsdp_config.param_offload", False, target="model.fsdp_config.cpu_offload", why=OFFLOAD),
    Alias(f"{ARA}.actor.fsdp_config.optimizer_offload", False, target="model.fsdp_config.cpu_offload", why=OFFLOAD),
    Alias(f"{ARA}.actor.fsdp_config.model_dtype", "fp32", target="model.fsdp_config.model_dtype",
          convert=_dtype(f"{ARA}.actor.fsdp_config.model_dtype")),
    Alias(f"{ARA}.actor.fsdp_config.mixed_precision.param_dtype", None, target="model.fsdp_config.param_dtype",
          convert=_dtype(f"{ARA}.actor.fsdp_config.mixed_precision.param_dtype")),
    Alias(f"{ARA}.actor.fsdp_config.mixed_precision.reduce_dtype", None, target="model.fsdp_config.reduce_dtype",
          convert=_dtype(f"{ARA}.actor.fsdp_config.mixed_precision.reduce_dtype")),
    Refused(f"{ARA}.actor.fsdp_config.mixed_precision.buffer_dtype", None, allowed=("fp32", "float32"),
            reason="buffers stay fp32 here"),
    Alias(f"{ARA}.actor.fsdp_config.fsdp_size", -1, target="model.fsdp_config.fsdp_size"),
    Inert(f"{ARA}.actor.fsdp_config.forward_prefetch", False, reason=FSDP1),
    Inert(f"{ARA}.actor.fsdp_config.use_orig_params", False, reason=FSDP1),
    Inert(f"{ARA}.actor.fsdp_config.wrap_policy.min_num_params", 0, reason="FSDP2 shards each decoder layer, then the root"),
    Inert(f"{ARA}.actor.strategy", "fsdp", reason="always FSDP2 (fully_shard) here"),
    Pending(f"{ARA}.actor.ulysses_sequence_parallel_size", 1,
            feature="Ulysses sequence parallelism in RL (SFT has it: ulysses_sequence_parallel_size)"),
    Inert(f"{ARA}.actor.use_torch_compile", True, reason="verl compiles its log-prob function; model.compile compiles "
          "the decoder layers here"),
    Refused(f"{ARA}.actor.freeze_vision_tower", False, reason="vision-language models are not supported here"),
    *_profiler("actor"),
    # reference policy
    Alias(f"{ARA}.ref.fsdp_config.param_offload", False, target="ref.cpu_offload"),
    Alias(f"{ARA}.ref.log_prob_micro_batch_size_per_gpu", None, target="ref.log_prob_micro_batch_size_per_gpu"),
    # verl's YAML defaults these to the actor's (${oc.select:...actor.use_dynamic_bsz}): here null means the same.
    Alias(f"{ARA}.ref.log_prob_use_dynamic_bsz", None, target="ref.log_prob_use_dynamic_bsz"),
    Alias(f"{ARA}.ref.log_prob_max_token_len_per_gpu", None, target="ref.log_prob_max_token_len_per_gpu"),
    Inert(f"{ARA}.ref.fsdp_config.forward_prefetch", False, reason=FSDP1),
    Inert(f"{ARA}.ref.strategy", "fsdp", reason="always FSDP2 (fully_shard) here"),
    Pending(f"{ARA}.ref.ulysses_sequence_parallel_size", 1,
            feature="Ulysses sequence parallelism in RL (SFT has it: ulysses_sequence_parallel_size)"),
    Inert(f"{ARA}.ref.use_torch_compile", True, reason="verl compiles its log-prob function; model.compile compiles "
          "the decoder layers here"),
    *_profiler("ref"),
    # rollout
    Alias(f"{ARA}.rollout.n", 1, target="rollout.responses_per_prompt"),
    Alias(f"{ARA}.rollout.temperature", 1.0, target="rollout.temperature"),
    Alias(f"{ARA}.rollout.top_k", -1, target="rollout.top_k", convert=_top_k, why="-1 is off, our 0"),
    Alias(f"{ARA}.rollout.top_p", 1.0, target="rollout.top_p"),
    Refused(f"{ARA}.rollout.do_sample", True, reason="rollouts always sample here (GRPO needs different responses)"),
    Alias(f"{ARA}.rollout.val_kwargs.do_sample", False, target="rollout.val_do_sample"),
    Alias(f"{ARA}.rollout.val_kwargs.temperature", 0, target="rollout.val_temperature"),
    Alias(f"{ARA}.rollout.val_kwargs.top_k", -1, target="rollout.val_top_k", convert=_top_k, why="-1 is off, our 0"),
    Alias(f"{ARA}.rollout.val_kwargs.top_p", 1.0, target="rollout.val_top_p"),
    Refused(f"{ARA}.rollout.val_kwargs.n", 1, reason="one validation response per prompt here"),
    Alias(f"{ARA}.rollout.log_prob_micro_batch_size_per_gpu", None, target="rollout.log_prob_micro_batch_size_per_gpu"),
    Alias(f"{ARA}.rollout.log_prob_use_dynamic_bsz", None, target="rollout.log_prob_use_dynamic_bsz"),
    Alias(f"{ARA}.rollout.log_prob_max_token_len_per_gpu", None, target="rollout.log_prob_max_token_len_per_gpu"),
    Rule(f"{ARA}.rollout.name", "vllm", fn=_rollout_name,
         doc="our `rollout.name` (hf or vllm; sglang and trtllm are refused in one line naming the alternative)"),
    Inert(f"{ARA}.rollout.mode", "async", reason="the colocated engine is called in-process, one batch per rank "
          "(verl's sync mode); the async server mode changes nothing here"),
    Alias(f"{ARA}.rollout.tensor_model_parallel_size", 2, target="rollout.vllm.tensor_model_parallel_size",
          convert=_tensor_parallel, why="one whole engine per rank here",
          doc="refused above 1 (one whole engine per rank here); 1 is our `rollout.vllm.tensor_model_parallel_size`"),
    _vllm("gpu_memory_utilization", 0.5),
    _vllm("enforce_eager", False),
    _vllm("free_cache_engine", True),
    _vllm("enable_chunked_prefill", True),
    _vllm("load_format", "dummy"),
    Inert(f"{ARA}.rollout.layered_summon", False, reason="the weights are pushed one parameter at a time already"),
    _vllm("max_num_batched_tokens", 8192),
    _vllm("max_num_seqs", 256),
    _vllm("seed", 0),
    _engine("multi_stage_wake_up", False),
    _engine("data_parallel_size", 1),
    _engine("expert_parallel_size", 1),
    _engine("calculate_log_probs", False),
    _engine("checkpoint_engine.update_weights_bucket_megabytes", 2048),
    _engine("engine_kwargs.vllm.disable_mm_preprocessor_cache", None),
    _engine("engine_kwargs.sglang.attention_backend", None),
    _engine("engine_kwargs.trtllm.batch_wait_timeout_iters", None),
    _engine("engine_kwargs.trtllm.batch_wait_max_tokens_ratio", None),
    Refused(f"{ARA}.rollout.multi_turn.format", "hermes", reason="multi-turn tool rollouts are not available here"),
    # algorithm
    Refused("algorithm.use_kl_in_reward", False, reason="no KL penalty in the reward here; use "
            f"{ARA}.actor.use_kl_loss (our algorithm.kl_coef)"),
    Inert("algorithm.kl_penalty", "kl", reason="used only with algorithm.use_kl_in_reward"),
    Inert("algorithm.kl_ctrl.type", "fixed", reason="used only with algorithm.use_kl_in_reward"),
    Inert("algorithm.kl_ctrl.kl_coef", 0.001, reason="used only with algorithm.use_kl_in_reward"),
    Refused("algorithm.rollout_correction.rollout_is", None, reason="rollouts and log-probs come from the same model "
            "here: there is no engine mismatch to correct"),
    Inert("algorithm.rollout_correction.rollout_is_threshold", 2.0, reason="used only with rollout_correction.rollout_is"),
    # rewards
    Alias("reward_model.enable", False, target="reward.model.enable"),
    Alias("reward_model.model.path", "~/models/FsfairX-LLaMA3-RM-v0.1", target="reward.model.path"),
    Alias("reward_model.micro_batch_size_per_gpu", None, target="reward.model.micro_batch_size_per_gpu"),
    Alias("reward_model.max_length", None, target="reward.model.max_length"),
    Alias("reward_model.model.trust_remote_code", False, target="reward.model.trust_remote_code"),
    Inert("reward_model.model.input_tokenizer", None, reason="responses are always decoded and re-tokenized with the "
          "reward model's own tokenizer and chat template here"),
    Inert("reward_model.num_workers", 1, reason="the reward model is sharded over the training ranks here"),
    Inert("reward_model.use_reward_loop", True, reason="the reward model scores on the training ranks here"),
    Inert("reward_model.rollout.name", None, reason=RM_ON_FSDP),
    Inert("reward_model.rollout.gpu_memory_utilization", 0.5, reason=RM_ON_FSDP),
    Inert("reward_model.rollout.tensor_model_parallel_size", 2, reason=RM_ON_FSDP),
    Inert("reward_model.rollout.prompt_length", 2048, reason=RM_ON_FSDP),
    Inert("reward_model.rollout.response_length", 2048, reason=RM_ON_FSDP),
    Refused("custom_reward_function.path", None, reason="give reward functions as reward.functions "
            "[{name, fn: module:function}]; the function takes (prompt, response, ground_truth)"),
    Inert("custom_reward_function.name", "compute_score", reason="used only with custom_reward_function.path"),
    # trainer
    Alias("trainer.critic_warmup", 0, target="critic.warmup_steps"),
    Alias("critic.optim.lr", 1e-5, target="critic.lr"),
    # the critic: the actor's backbone with a one-output value head, sharded like the actor
    Rule("critic.model.path", "~/models/deepseek-llm-7b-chat", fn=_critic_path,
         doc="checked: must be the actor's model (the critic starts from it, with a value head)"),
    Alias("critic.model.enable_gradient_checkpointing", True, target="critic.enable_gradient_checkpointing"),
    Inert("critic.model.use_remove_padding", False, reason="RL micro-batches are padded here, with the same values"),
    Inert("critic.ppo_micro_batch_size_per_gpu", None, reason="the critic's micro-batches are the actor's (actor.micro_batch_size_per_gpu)"),
    Inert("critic.model.fsdp_config.param_offload", False, reason=f"the critic is sharded like the actor (model.fsdp_config); {OFFLOAD}"),
    Inert("critic.model.fsdp_config.optimizer_offload", False, reason=f"the critic is sharded like the actor (model.fsdp_config); {OFFLOAD}"),
    Pending("critic.ulysses_sequence_parallel_size", 1,
            feature="Ulysses sequence parallelism in RL (SFT has it: ulysses_sequence_parallel_size)"),
    Refused("critic.optim.lr_warmup_steps_ratio", 0.0, allowed=(0,),
            reason="the critic's learning rate is constant here (critic.lr); it must be 0"),
    Rule("critic.ppo_mini_batch_size", 256, doc="checked: must ask for the actor's mini-batches (the critic shares them here)",
         fn=_critic_as_actor("critic.ppo_mini_batch_size", "actor.mini_batches_per_step",
                             lambda ctx: f"mini-batches of {int(ctx.get('data.prompts_per_step')) // max(1, int(ctx.get('actor.mini_batches_per_step')))} prompts",
                             _mini_batch_prompts)),
    Rule("critic.ppo_epochs", 1, doc="checked: must be the actor's (actor.ppo_epochs; the critic shares them here)",
         fn=_critic_as_actor("critic.ppo_epochs", "actor.ppo_epochs", lambda ctx: f"{ctx.get('actor.ppo_epochs')} epoch(s)",
                             lambda v, ctx: int(v))),
    Rule("critic.grad_clip", 1.0, doc="checked: must be the actor's (optim.clip_grad; the critic shares it here)",
         fn=_critic_as_actor("critic.grad_clip", "optim.clip_grad", lambda ctx: f"clipped at {ctx.get('optim.clip_grad')}",
                             lambda v, ctx: float(v))),
    Alias("trainer.max_actor_ckpt_to_keep", None, target="trainer.max_ckpt_to_keep"),
    Inert("trainer.max_critic_ckpt_to_keep", None, reason="the actor and the critic are saved together"),
    Inert("trainer.balance_batch", True, reason="each rank holds the same number of whole prompt groups"),
    Inert("trainer.use_legacy_worker_impl", "auto", reason="one worker implementation here"),
    Inert("trainer.default_hdfs_dir", None, reason="nothing is copied to HDFS; the run stays in trainer.default_local_dir"),
    Rule("trainer.n_gpus_per_node", 8, fn=_placement,
         doc="checked: nnodes × n_gpus_per_node must equal the processes torchrun started (torchrun decides the placement)"),
    Inert("trainer.nnodes", 1, reason="torchrun decides the placement: --nnodes"),
    Refused("global_profiler.tool", None, reason="verl's profiler integration is not available here"),
    Inert("global_profiler.steps", None, reason="used only with global_profiler.tool"),
    Inert("global_profiler.save_path", "outputs/profile", reason="used only with global_profiler.tool"),
    Inert("global_profiler.global_tool_config.torch_memory.stack_depth", 32, reason="used only with global_profiler.tool"),
    Inert("global_profiler.global_tool_config.torch_memory.trace_alloc_max_entries", 100000,
          reason="used only with global_profiler.tool"),
)


# verl keys that are ours under the same name and with the same meaning (in docs/reference/verl-keys.md).
PPO_SAME_NAME = (
    "algorithm.adv_estimator", "algorithm.gamma", "algorithm.lam", "algorithm.norm_adv_by_std_in_grpo",
    "data.train_files", "data.val_files", "data.prompt_key", "data.max_prompt_length", "data.truncation", "data.shuffle",
    "data.filter_overlong_prompts", "data.apply_chat_template_kwargs", "trainer.logger", "trainer.project_name",
    "trainer.experiment_name", "trainer.total_epochs", "trainer.total_training_steps", "trainer.save_freq",
    "trainer.test_freq", "trainer.default_local_dir", "trainer.resume_mode", "trainer.resume_from_path",
    "trainer.val_before_train", "critic.cliprange_value", "critic.use_dynamic_bsz", "critic.ppo_max_token_len_per_gpu",
    "critic.forward_max_token_len_per_gpu",
)


def verl_rl_name(key: str) -> Optional[str]:
    """verl's name of our RL key `key` (None: verl has none), for errors a verl user can act on."""
    if key in PPO_SAME_NAME:
        return key
    return next((e.key for e in PPO_KEYS if isinstance(e, Alias) and e.target == key), None)


def rl_key_table() -> str:
    """The table of verl's RL keys (docs/reference/verl-keys.md): ours, or why not (scripts/config_table.py verl)."""
    rows = [(key, "the same key here") for key in PPO_SAME_NAME] + [(e.key, e.describe()) for e in PPO_KEYS]
    lines = ["| verl key | here |", "|---|---|"]
    lines += [f"| `{key}` | {what.replace('|', '/')} |" for key, what in sorted(rows)]
    return "\n".join(lines)


def translate_rl(raw: dict, world_size: int, cli_keys: Iterable[str]) -> Context:
    trainer = raw.get("trainer")
    if isinstance(trainer, dict) and "logger" in trainer:
        trainer["logger"] = as_list(trainer["logger"])
    return translate(raw, PPO_KEYS, world_size, cli_keys)
