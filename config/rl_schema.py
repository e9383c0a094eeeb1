"""The typed schema of the RL trainers (PPO, GRPO, GSPO).
(Over 400 lines: one dataclass per RL config section, each key with its help text.)

Shares the model, optimizer, generation-free trainer and sample-history sections with SFT.
Batch sizes say what they count: `data.prompts_per_step` prompts per optimizer step over all
ranks, `rollout.responses_per_prompt` responses per prompt, `actor.micro_batch_size_per_gpu`
sequences (prompt + one response) per forward on one rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, List, Optional

from config.schema import (
    ConfigError,
    _HUB_ID,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    SamplesConfig,
    TrainerConfig,
    _one_of,
    _require,
    doc,
    expand_paths,
    missing_inputs,
)

DEFAULT_SAMPLE_PROMPTS = (
    "Summarize the core idea of reinforcement learning in two sentences.",
    "Explain the difference between supervised fine-tuning and RLHF.",
    "Write a short checklist for debugging an unstable training run.",
)


@dataclass
class SampleLoggingConfig:
    """Qualitative samples during RL training (the `logging.sample_logging` section)."""

    enabled: bool = doc("Master switch for qualitative samples.", False)
    prompts: List[str] = doc("Prompts to generate from; empty means the built-in trio.", factory=list)
    interval_steps: Optional[int] = doc("Log every N optimizer steps.", None)
    percent_of_max_steps: Optional[float] = doc("Log at each multiple of this share of the total steps (e.g. 0.25).", None)
    num_samples: int = doc("How many prompts to use (capped at the number of prompts).", 3)
    max_new_tokens: int = doc("Most tokens per response.", 80)
    temperature: float = doc("Sampling temperature.", 0.7)
    top_p: float = doc("Nucleus sampling threshold in (0, 1].", 0.9)
    do_sample: bool = doc("Sample (true) or decode greedily (false).", True)
    num_samples_per_prompt: int = doc(
        "Answers per prompt (k); with k > 1 every metric is also logged as mean@k and, for right/wrong "
        "metrics, pass@k. The first keeps the prompt's seed, the others get seeds derived from it.",
        1,
    )
    also_greedy: bool = doc("Also one greedy answer per prompt, scored apart (`samples/metric/<name>/greedy`).", False)

    def __post_init__(self) -> None:
        self.check()

    def check(self, prefix: str = "logging.sample_logging") -> None:
        if self.interval_steps is not None:
            _require(self.interval_steps > 0, f"{prefix}.interval_steps", f"must be > 0, got {self.interval_steps}")
        if self.percent_of_max_steps is not None:
            _require(0 < self.percent_of_max_steps <= 1, f"{prefix}.percent_of_max_steps",
                     f"must be in (0, 1], got {self.percent_of_max_steps}")
        _require(self.num_samples > 0, f"{prefix}.num_samples", f"must be > 0, got {self.num_samples}")
        _require(self.max_new_tokens > 0, f"{prefix}.max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        _require(self.temperature > 0, f"{prefix}.temperature", f"must be > 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, f"{prefix}.top_p", f"must be in (0, 1], got {self.top_p}")
        _require(self.num_samples_per_prompt >= 1, f"{prefix}.num_samples_per_prompt",
                 f"must be >= 1, got {self.num_samples_per_prompt}")
        first_at: dict[str, int] = {}
        for i, p in enumerate(self.prompts):
            _require(isinstance(p, str) and bool(p.strip()), f"{prefix}.prompts[{i}]", "must be non-empty text")
            # A prompt's sampling seed comes from its text, so a repeat would only repeat a sample.
            _require(p not in first_at, f"{prefix}.prompts[{i}]", f"repeats prompts[{first_at.get(p)}]")
            first_at[p] = i

    @property
    def effective_prompts(self) -> list[str]:
        return list(self.prompts) if self.prompts else list(DEFAULT_SAMPLE_PROMPTS)

    @property
    def effective_num_samples(self) -> int:
        return min(self.num_samples, len(self.effective_prompts))

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


@dataclass
class LoggingConfig:
    output_dir: Optional[str] = doc("Run directory; overrides trainer.default_local_dir when set.", None)
    loggers: Optional[List[str]] = doc("Trackers; overrides trainer.logger when set.", None)
    sample_logging: SampleLoggingConfig = doc("Qualitative samples during training.", factory=SampleLoggingConfig)


@dataclass
class RLDataConfig:
    train_files: Any = doc("Parquet or JSONL prompts (verl's RL layout by default).", None)
    val_files: Any = doc("Held-out prompts for the validation reward.", None)
    prompt_key: str = doc("Column with the prompt: a list of chat messages (verl) or text.", "prompt")
    answer_key: str = doc("Column (dotted for dict columns) with the answer the rewards check.", "reward_model.ground_truth")
    max_prompt_length: int = doc("Most prompt tokens; longer prompts follow `truncation`.", 512)
    truncation: str = doc("Over-long prompt: `error`, `left` or `right`.", "error")
    prompts_per_step: int = doc("Prompts per optimizer step, summed over all ranks.", 16)
    max_val_prompts: Optional[int] = doc("Use at most this many validation prompts (null: all).", None)
    shuffle: bool = doc("Shuffle prompts each epoch (seeded, resumable).", True)
    filter_overlong_prompts: bool = doc(
        "Leave out prompts longer than `max_prompt_length` (logged with their count) instead of applying `truncation`.",
        False,
    )
    apply_chat_template_kwargs: dict = doc("Extra keyword arguments for the chat template (e.g. {enable_thinking: false}).",
                                           factory=dict)
    cache_dir: Optional[str] = doc(
        "Folder of the token cache: the prompts are tokenized once (per file content, tokenizer and the settings "
        "that change tokens) into memory-mapped arrays that every rank of a node shares. null: "
        "`$XDG_CACHE_HOME/sample-aware-trainer/tokens` (`~/.cache/...`).",
        None,
    )

    def check(self, world_size: int) -> None:
        _require(self.train_files not in (None, "", []), "data.train_files", "is required")
        _require(self.max_prompt_length > 0, "data.max_prompt_length", "must be > 0")
        _one_of(self.truncation, "data.truncation", ("error", "left", "right"))
        _require(self.prompts_per_step > 0, "data.prompts_per_step", "must be > 0")
        _require(self.prompts_per_step % world_size == 0, "data.prompts_per_step",
                 f"{self.prompts_per_step} is not divisible by the world size {world_size} (each rank holds whole prompt groups)")


ROLLOUT_ENGINES = ("hf", "vllm")  # workers.rollout_engine.ENGINES; the trainer checks against the registry
# verl's other engines: what to use instead, in one line.
OTHER_ENGINES = {
    "sglang": "SGLang is not available here",
    "trtllm": "TensorRT-LLM is not available here",
}


@dataclass
class VllmConfig:
    """The vLLM engine's settings (`rollout.name=vllm`; verl's `actor_rollout_ref.rollout.*` engine keys)."""

    gpu_memory_utilization: float = doc("Share of GPU memory the engine may take while awake (CUDA).", 0.5)
    enforce_eager: Optional[bool] = doc(
        "No CUDA graphs / compilation (null: true on CPU, where compiling takes minutes; false on CUDA).", None)
    free_cache_engine: bool = doc("On CUDA, put the engine to sleep between rollouts (KV cache freed, weights "
                                  "offloaded), so the update has the memory it has without the engine.", True)
    max_num_batched_tokens: Optional[int] = doc("Most tokens the engine runs in one forward (null: vLLM's default).", 8192)
    max_num_seqs: int = doc("Most sequences the engine runs at once.", 256)
    enable_chunked_prefill: bool = doc("Split long prefills into chunks of max_num_batched_tokens.", True)
    load_format: str = doc("How the engine loads the model before the first weight push: `dummy` (random weights: "
                           "the actor's are pushed before the first rollout anyway), `auto`, `safetensors`.", "dummy")
    tensor_model_parallel_size: int = doc("Ranks per engine; 1 here: one whole engine per rank.", 1)
    seed: Optional[int] = doc("The engine's own seed (null: trainer.seed). Every request carries its own seed, so "
                              "this matters only to vLLM internals.", None)
    cpu_kvcache_space_gib: float = doc("KV cache per rank on CPU, GiB (vLLM's VLLM_CPU_KVCACHE_SPACE).", 1.0)

    def check(self) -> None:
        p = "rollout.vllm"
        _require(0 < self.gpu_memory_utilization <= 1, f"{p}.gpu_memory_utilization", "must be in (0, 1]")
        _require(self.max_num_batched_tokens is None or self.max_num_batched_tokens > 0, f"{p}.max_num_batched_tokens",
                 "must be > 0")
        _require(self.max_num_seqs > 0, f"{p}.max_num_seqs", "must be > 0")
        _require(self.tensor_model_parallel_size == 1, f"{p}.tensor_model_parallel_size",
                 f"{self.tensor_model_parallel_size}: the colocated engine holds the whole model on each rank here "
                 "(tensor parallel 1); shard the actor with FSDP instead")
        _one_of(self.load_format, f"{p}.load_format", ("dummy", "auto", "safetensors", "pt"))
        _require(self.cpu_kvcache_space_gib > 0, f"{p}.cpu_kvcache_space_gib", "must be > 0")


@dataclass
class RolloutConfig:
    name: str = doc("Rollout engine: `hf` (transformers generate on the actor) or `vllm` (a colocated vLLM engine "
                    "per rank; extra `[vllm]` on CUDA, `[vllm-cpu]` on CPU). See docs/rollout-engines.md.", "hf")
    vllm: VllmConfig = doc("The vLLM engine's settings (rollout.name=vllm).", factory=VllmConfig)
    responses_per_prompt: int = doc("Responses sampled per prompt (GRPO's group size; PPO usually 1).", 8)
    max_new_tokens: int = doc("Most tokens per response.", 16)
    temperature: float = doc("Sampling temperature of rollouts.", 1.0)
    top_k: int = doc("Top-k of rollouts (0: off).", 0)
    top_p: float = doc("Top-p of rollouts.", 1.0)
    val_do_sample: bool = doc("Sample validation responses, one fixed seed per prompt (false: greedy).", False)
    val_temperature: Optional[float] = doc("Temperature of sampled validation responses (null: `temperature`).", None)
    val_top_k: Optional[int] = doc("Top-k of sampled validation responses (null: `top_k`).", None)
    val_top_p: Optional[float] = doc("Top-p of sampled validation responses (null: `top_p`).", None)
    log_prob_micro_batch_size_per_gpu: Optional[int] = doc(
        "Sequences per no-grad forward for the rollout's log-probs on one rank (null: actor.micro_batch_size_per_gpu); "
        "not run when the update is on-policy (one mini-batch, one epoch).", None
    )
    log_prob_use_dynamic_bsz: Optional[bool] = doc(
        "Cut the rollout's log-prob forwards by tokens (`log_prob_max_token_len_per_gpu`) instead of sequences "
        "(null: actor.use_dynamic_bsz).", None)
    log_prob_max_token_len_per_gpu: Optional[int] = doc(
        "Token budget (prompt + response, padding included) of one rollout log-prob forward on one rank "
        "(null: actor.ppo_max_token_len_per_gpu).", None)
    micro_batch_size_per_gpu: Optional[int] = doc(
        "Sequences per `generate` call on one rank, rollouts and validation (null: all of the rank's in one call). "
        "Bounds the KV cache; the samples do not depend on it (one seed per sequence).", None
    )

    def check(self) -> None:
        if self.name in OTHER_ENGINES:
            raise ConfigError(f"rollout.name={self.name}: {OTHER_ENGINES[self.name]}; use rollout.name=vllm "
                              "(the same kind of engine, colocated) or hf")
        _one_of(self.name, "rollout.name", ROLLOUT_ENGINES)
        self.vllm.check()
        _require(self.micro_batch_size_per_gpu is None or self.micro_batch_size_per_gpu > 0,
                 "rollout.micro_batch_size_per_gpu", "must be > 0")
        _require(self.responses_per_prompt > 0, "rollout.responses_per_prompt", "must be > 0")
        _require(self.max_new_tokens > 0, "rollout.max_new_tokens", "must be > 0")
        _require(self.temperature > 0, "rollout.temperature", "must be > 0")
        _require(self.top_k >= 0, "rollout.top_k", "must be >= 0")
        _require(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        if self.val_do_sample:
            _require(self.val_temperature is None or self.val_temperature > 0, "rollout.val_temperature",
                     "must be > 0 when rollout.val_do_sample=true")
        _require(self.val_top_k is None or self.val_top_k >= 0, "rollout.val_top_k", "must be >= 0")
        _require(self.val_top_p is None or 0 < self.val_top_p <= 1, "rollout.val_top_p", "must be in (0, 1]")
        _require(self.log_prob_micro_batch_size_per_gpu is None or self.log_prob_micro_batch_size_per_gpu > 0,
                 "rollout.log_prob_micro_batch_size_per_gpu", "must be > 0")
        _require(self.log_prob_max_token_len_per_gpu is None or self.log_prob_max_token_len_per_gpu > 0,
                 "rollout.log_prob_max_token_len_per_gpu", "must be > 0")


@dataclass
class AlgorithmConfig:
    name: str = doc("ppo, grpo or gspo (sets the defaults of the next keys in its YAML).", "grpo")
    adv_estimator: str = doc("Advantage estimator from the registry: grpo, gae, reinforce_plus_plus.", "grpo")
    policy_loss: str = doc("Policy loss from the registry: vanilla (PPO/GRPO clip) or gspo.", "vanilla")
    clip_ratio_low: float = doc("Lower clip range of the importance ratio (1 - low).", 0.2)
    clip_ratio_high: float = doc("Upper clip range of the importance ratio (1 + high).", 0.28)
    clip_ratio_c: float = doc("Dual-clip bound for negative advantages.", 3.0)
    loss_agg_mode: str = doc("token-mean, seq-mean-token-sum, seq-mean-token-mean or seq-mean-token-sum-norm.", "token-mean")
    kl_coef: float = doc("Weight of the KL loss to a frozen reference (0: no reference model).", 0.0)
    kl_estimator: str = doc("KL estimator: k1, k2, k3 (low_var_kl).", "k3")
    gamma: float = doc("Discount (GAE).", 1.0)
    lam: float = doc("GAE lambda.", 0.95)
    norm_adv_by_std_in_grpo: bool = doc("Divide GRPO advantages by the group std (false: Dr. GRPO).", True)

    def check(self) -> None:
        # Registry names (adv_estimator, policy_loss, loss_agg_mode, kl_estimator) are checked by
        # the RL trainer against the registries in workers.core_algos, before any model loads.
        _one_of(self.name, "algorithm.name", ("ppo", "grpo", "gspo"))
        _require(self.clip_ratio_low > 0 and self.clip_ratio_high > 0, "algorithm.clip_ratio_low", "clip ranges must be > 0")
        _require(self.clip_ratio_c > 1, "algorithm.clip_ratio_c", "must be > 1")
        _require(self.kl_coef >= 0, "algorithm.kl_coef", "must be >= 0")
        _require(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "algorithm.gamma", "gamma and lam must be in [0, 1]")


@dataclass
class ActorConfig:
    micro_batch_size_per_gpu: int = doc("Sequences (prompt + one response) per forward/backward on one rank.", 32)
    ppo_epochs: int = doc("Passes over each rollout batch.", 1)
    mini_batches_per_step: int = doc("Optimizer steps per pass (1: one update per rollout, fully on-policy).", 1)
    use_dynamic_bsz: bool = doc(
        "Cut each mini-batch into micro-batches by tokens (`ppo_max_token_len_per_gpu`) instead of "
        "`micro_batch_size_per_gpu` sequences: short responses share a forward (as verl). The loss is normalised "
        "over the whole mini-batch, so the update is the same; every rank runs as many micro-batches.", False)
    ppo_max_token_len_per_gpu: int = doc(
        "Token budget of one actor forward/backward on one rank with `use_dynamic_bsz`: rows × (longest prompt + "
        "longest response) of the micro-batch. Must hold data.max_prompt_length + rollout.max_new_tokens.", 16384)

    def check(self) -> None:
        _require(self.micro_batch_size_per_gpu > 0, "actor.micro_batch_size_per_gpu", "must be > 0")
        _require(self.ppo_max_token_len_per_gpu > 0, "actor.ppo_max_token_len_per_gpu", "must be > 0")
        _require(self.ppo_epochs > 0, "actor.ppo_epochs", "must be > 0")
        _require(self.mini_batches_per_step > 0, "actor.mini_batches_per_step", "must be > 0")


@dataclass
class RefConfig:
    """The frozen reference policy (built only when algorithm.kl_coef > 0)."""

    cpu_offload: bool = doc("Keep the reference's shards on CPU between forwards (it has no gradients).", False)
    log_prob_micro_batch_size_per_gpu: Optional[int] = doc(
        "Sequences per forward for reference log-probs on one rank (null: actor.micro_batch_size_per_gpu).", None
    )
    log_prob_use_dynamic_bsz: Optional[bool] = doc(
        "Cut the reference's forwards by tokens (`log_prob_max_token_len_per_gpu`) instead of sequences "
        "(null: actor.use_dynamic_bsz).", None)
    log_prob_max_token_len_per_gpu: Optional[int] = doc(
        "Token budget of one reference forward on one rank (null: actor.ppo_max_token_len_per_gpu).", None)

    def check(self) -> None:
        _require(self.log_prob_micro_batch_size_per_gpu is None or self.log_prob_micro_batch_size_per_gpu > 0,
                 "ref.log_prob_micro_batch_size_per_gpu", "must be > 0")
        _require(self.log_prob_max_token_len_per_gpu is None or self.log_prob_max_token_len_per_gpu > 0,
                 "ref.log_prob_max_token_len_per_gpu", "must be > 0")


@dataclass
class RLTrainerConfig(TrainerConfig):
    val_before_train: bool = doc("Validate on the held-out prompts before the first step (the starting point).", True)


@dataclass
class CriticConfig:
    lr: float = doc("Critic learning rate (PPO with gae).", 1e-4)
    cliprange_value: float = doc("PPO value clipping range.", 0.5)
    warmup_steps: int = doc("Steps that train only the critic before the actor starts.", 0)
    enable_gradient_checkpointing: Optional[bool] = doc(
        "Recompute the critic's activations in backward; null: as the actor (model.enable_gradient_checkpointing).", None)
    use_dynamic_bsz: Optional[bool] = doc(
        "Cut the critic's forwards by tokens instead of actor.micro_batch_size_per_gpu sequences "
        "(null: actor.use_dynamic_bsz).", None)
    ppo_max_token_len_per_gpu: int = doc("Token budget of one critic forward/backward on one rank (verl's default: "
                                         "twice the actor's, as a value head has no vocabulary-wide logits).", 32768)
    forward_max_token_len_per_gpu: Optional[int] = doc(
        "Token budget of one no-grad value forward on one rank (null: critic.ppo_max_token_len_per_gpu).", None)

    def check(self) -> None:
        _require(self.lr > 0, "critic.lr", "must be > 0")
        _require(self.ppo_max_token_len_per_gpu > 0, "critic.ppo_max_token_len_per_gpu", "must be > 0")
        _require(self.forward_max_token_len_per_gpu is None or self.forward_max_token_len_per_gpu > 0,
                 "critic.forward_max_token_len_per_gpu", "must be > 0")
        _require(self.cliprange_value > 0, "critic.cliprange_value", "must be > 0")
        _require(self.warmup_steps >= 0, "critic.warmup_steps", "must be >= 0")


@dataclass
class RewardFunctionConfig:
    name: str = doc("Name shown in logs and trackers.", "")
    fn: str = doc("A registered reward name, or `module:function`.", "")
    weight: float = doc("Weight in the training reward (0: logged, not trained on).", 1.0)
    kwargs: dict = doc("Extra keyword arguments for the function.", factory=dict)


@dataclass
class RewardModelConfig:
    """A sequence-classification reward model (verl's `reward_model` section), sharded over the
    ranks like the reference policy and frozen; its score joins the reward functions by weight."""

    enable: bool = doc("Score every response with the reward model at `path` (verl: reward_model.enable).", False)
    path: Optional[str] = doc(
        "Local directory or hub id of an AutoModelForSequenceClassification with one output (num_labels=1) "
        "(verl: reward_model.model.path).", None)
    name: str = doc("Its name among the rewards: samples, metrics (`train/reward/<name>`) and trackers.", "reward_model")
    weight: float = doc("Weight of its score in the training reward, beside reward.functions' weights.", 1.0)
    micro_batch_size_per_gpu: Optional[int] = doc(
        "Sequences per reward-model forward on one rank (null: actor.micro_batch_size_per_gpu).", None)
    max_length: Optional[int] = doc(
        "Most tokens of a scored sequence (the reward model's tokens); a longer one keeps its end, where the score is "
        "read (null: no limit).", None)
    trust_remote_code: bool = doc("Allow the reward model's own modelling code from its repository.", False)

    def check(self) -> None:
        if not self.enable:
            return
        _require(bool(self.path), "reward.model.path", "is required when reward.model.enable=true")
        self.path = expand_paths(self.path)
        _require(os.path.exists(self.path) or bool(_HUB_ID.match(self.path)), "reward.model.path",
                 f"{self.path}: not found (a local directory or a hub id)")
        _require(bool(self.name), "reward.model.name", "must be non-empty")
        _require(self.micro_batch_size_per_gpu is None or self.micro_batch_size_per_gpu > 0,
                 "reward.model.micro_batch_size_per_gpu", "must be > 0")
        _require(self.max_length is None or self.max_length > 0, "reward.model.max_length", "must be > 0")


@dataclass
class RewardConfig:
    functions: List[RewardFunctionConfig] = doc(
        "Reward functions; the training reward is their weighted sum (plus the reward model's, when enabled).",
        factory=lambda: [RewardFunctionConfig(name="arithmetic_exact_match", fn="arithmetic_exact_match")],
    )
    model: RewardModelConfig = doc("A reward model scoring every response (verl's reward_model).", factory=RewardModelConfig)

    def check(self) -> None:
        self.model.check()
        _require(bool(self.functions) or self.model.enable, "reward.functions",
                 "needs at least one reward function (or a reward model: reward.model.enable=true)")
        names = [f.name or f.fn for f in self.functions] + ([self.model.name] if self.model.enable else [])
        _require(len(set(names)) == len(names), "reward.functions", f"names must be unique (reward.model.name too), got {names}")
        for i, f in enumerate(self.functions):
            _require(bool(f.fn), f"reward.functions[{i}].fn", "is required")


@dataclass
class RLConfig:
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: RLDataConfig = field(default_factory=RLDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: RLTrainerConfig = field(default_factory=RLTrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # SFT's sample settings, which RL does not read: set for an RL run (command line, YAML, Python
    # API or their VERL_* variables), each stops it in one line naming what to use (config.loading).
    NOT_READ: ClassVar[dict[str, str]] = {
        "trainer.max_val_samples": "held-out validation prompts: data.max_val_prompts; samples: logging.sample_logging.num_samples",
        "generation.temperature": "rollout.temperature, rollout.val_temperature (validation) or logging.sample_logging.temperature (samples)",
        "generation.top_k": "rollout.top_k or rollout.val_top_k (validation)",
        "generation.top_p": "rollout.top_p, rollout.val_top_p (validation) or logging.sample_logging.top_p (samples)",
        "generation.do_sample": "rollout.val_do_sample (validation) or logging.sample_logging.do_sample (samples)",
        "generation.max_new_tokens": "rollout.max_new_tokens or logging.sample_logging.max_new_tokens (samples)",
        "generation": "RL has no generation section: rollouts are rollout.*, samples logging.sample_logging.*",
    }

    def check(self, world_size: int) -> None:
        self.model.partial_pretrain = expand_paths(self.model.partial_pretrain)
        self.data.train_files, self.data.val_files = expand_paths(self.data.train_files), expand_paths(self.data.val_files)
        for section in (self.algorithm, self.rollout, self.actor, self.critic, self.ref, self.reward, self.model, self.optim,
                        self.trainer, self.samples, self.eval):
            section.check()
        self.data.check(world_size)
        self.model.fsdp_config.check_world(world_size)
        self.logging.sample_logging.check()
        # The model section is SFT's; these of its keys are SFT-only so far (never silently ignored).
        for key, asks_nothing in (("ulysses_sequence_parallel_size", 1), ("use_remove_padding", False), ("use_liger", False)):
            value = getattr(self.model, key)
            _require(value == asks_nothing, f"model.{key}", f"{value}: not available in RL yet (SFT only); leave it at {asks_nothing}")
        if self.algorithm.adv_estimator == "gae" and self.algorithm.name != "ppo":
            raise ConfigError("algorithm.adv_estimator: gae needs a critic, which only algorithm.name=ppo trains")
        if self.algorithm.adv_estimator == "grpo":
            _require(self.rollout.responses_per_prompt > 1, "rollout.responses_per_prompt",
                     "GRPO normalises within a group: needs at least 2 responses per prompt")
        self._check_token_budgets()
        # The documented `logging` section wins over the trainer keys it duplicates.
        if self.logging.output_dir:
            self.trainer.default_local_dir = self.logging.output_dir
        if self.logging.loggers is not None:
            self.trainer.logger = list(self.logging.loggers)
            self.trainer.check()
        missing_inputs(self.model.partial_pretrain, self.data.train_files,
                       "python -m trainer.fsdp_sft_trainer --config-name demo, then python -m trainer.rl_trainer --config-name grpo_demo")


    # The forwards of an RL step, each with its own micro-batches (verl's keys: actor, rollout log-prob, ref, critic).
    FORWARDS: ClassVar[tuple[str, ...]] = ("actor", "old_log_prob", "ref_log_prob", "critic", "values")

    def token_budget(self, forward: str) -> Optional[tuple[int, str]]:
        """(tokens, the key they come from) of one `forward` of FORWARDS with token-budget
        micro-batches, None where its micro-batches count sequences. The log-prob and critic
        settings default to the actor's, as verl's YAML interpolates them."""
        a, c = self.actor, self.critic
        actor = (a.ppo_max_token_len_per_gpu, "actor.ppo_max_token_len_per_gpu")
        critic = (c.ppo_max_token_len_per_gpu, "critic.ppo_max_token_len_per_gpu")
        settings = {  # forward: (its use_dynamic_bsz, its budget candidates, first set wins)
            "actor": (a.use_dynamic_bsz, [actor]),
            "old_log_prob": (self.rollout.log_prob_use_dynamic_bsz,
                             [(self.rollout.log_prob_max_token_len_per_gpu, "rollout.log_prob_max_token_len_per_gpu"), actor]),
            "ref_log_prob": (self.ref.log_prob_use_dynamic_bsz,
                             [(self.ref.log_prob_max_token_len_per_gpu, "ref.log_prob_max_token_len_per_gpu"), actor]),
            "critic": (c.use_dynamic_bsz, [critic]),
            "values": (c.use_dynamic_bsz, [(c.forward_max_token_len_per_gpu, "critic.forward_max_token_len_per_gpu"), critic]),
        }
        use, candidates = settings[forward]
        if not (a.use_dynamic_bsz if use is None else use):
            return None
        return next((int(v), key) for v, key in candidates if v is not None)

    def forwards_run(self) -> list[str]:
        """The FORWARDS a step of this config runs: the rollout's log-probs only off-policy (more
        than one mini-batch or epoch), the reference's only with a KL loss, the critic's with gae."""
        runs = {"old_log_prob": self.actor.ppo_epochs > 1 or self.actor.mini_batches_per_step > 1,
                "ref_log_prob": self.algorithm.kl_coef > 0,
                "critic": self.algorithm.adv_estimator == "gae", "values": self.algorithm.adv_estimator == "gae"}
        return [f for f in self.FORWARDS if runs.get(f, True)]

    def _check_token_budgets(self) -> None:
        """A budget must hold the longest sequence the rollouts can make (verl asserts it per batch)."""
        from config.verl import verl_rl_name

        longest = self.data.max_prompt_length + self.rollout.max_new_tokens
        for forward in self.forwards_run():
            budget = self.token_budget(forward)
            if budget is not None:
                verl = verl_rl_name(budget[1])
                _require(budget[0] >= longest, budget[1] + (f" (verl: {verl})" if verl and verl != budget[1] else ""),
                         f"{budget[0]} tokens is less than the longest sequence, data.max_prompt_length + "
                         f"rollout.max_new_tokens = {self.data.max_prompt_length} + {self.rollout.max_new_tokens} = {longest}")


def lift_flat_sample_logging(raw: dict) -> dict:
    """Accept `logging:` with the sample-logging fields directly under it.

    The sample-logging document prints its YAML example with that nesting lost (the fields
    sit beside `sample_logging:`); read that way it means the same thing, so it is moved
    under `sample_logging` instead of failing as unknown keys.
    """
    logging_section = raw.get("logging")
    if not isinstance(logging_section, dict):
        return raw
    flat = {k: logging_section.pop(k) for k in list(logging_section) if k in SampleLoggingConfig.field_names()}
    if flat:
        nested = logging_section.get("sample_logging") or {}
        logging_section["sample_logging"] = {**flat, **nested}
    return raw
