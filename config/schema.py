"""The typed schema of every configuration this project reads.
(Over 400 lines: one dataclass per config section, each key with its help text; splitting it
would scatter the one place a user reads every SFT key.)

Hydra composes YAML; `config.loading` merges the result onto these dataclasses, so an unknown
key or a value of the wrong type fails with the key's dotted name before anything heavy runs.
Each dataclass owns its section; `check()` methods hold the value rules that types cannot say.
Batch sizes say what they count: see `DataConfig`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


class ConfigError(ValueError):
    """A configuration value is wrong. The message is one line naming the key or variable."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: str, key: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, f"got {value!r}, expected one of {', '.join(choices)}")


def expand_paths(value: Any) -> Any:
    """`~` in a path or a list of paths means the home directory (verl's defaults use it)."""
    if isinstance(value, str):
        return os.path.expanduser(value)
    if isinstance(value, (list, tuple)):
        return [expand_paths(v) for v in value]
    return value


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def missing_inputs(model_path: str, data_files: Any, demo_command: str) -> None:
    """One line naming whatever of the model and the training data is not there, and how to run
    the offline demo instead: what a first run without arguments sees (verl's default paths)."""
    missing = []
    if model_path and not os.path.exists(model_path) and not _HUB_ID.match(model_path):
        missing.append(f"model.partial_pretrain={model_path}")
    files = [data_files] if isinstance(data_files, str) else list(data_files or [])
    absent = [f for f in files if not os.path.exists(f)]
    if absent:
        missing.append(f"data.train_files={absent[0]}")
    if missing:
        raise ConfigError(
            f"{' and '.join(missing)}: not found; point them at your model (a local directory or a hub id) and "
            f"parquet/JSONL files, or run the bundled offline demo: {demo_command}"
        )


def doc(text: str, default: Any = None, factory: Any = None) -> Any:
    """A dataclass field with its help text (rendered into docs/reference/ by scripts/config_table.py)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


# ----------------------------------------------------------------------------- SFT data
@dataclass
class MultiturnConfig:
    enable: bool = doc("Train on a column of chat messages; loss on assistant turns only.", False)
    messages_key: str = doc("Column holding the list of {role, content} messages.", "messages")
    tools_key: str = doc("Column with each conversation's tool list, passed to the chat template (used when the column exists).", "tools")
    enable_thinking_key: str = doc(
        "Column with each conversation's `enable_thinking` flag for the chat template (used when the column exists).",
        "enable_thinking",
    )
    completion_key: Optional[str] = doc(
        "Column of messages that complete `messages_key`'s (TRL's conversational prompt-completion: "
        "`messages_key=prompt`, `completion_key=completion`): loss on the completion's assistant turns "
        "only. null: one column holds the whole conversation.",
        None,
    )


@dataclass
class DataConfig:
    train_files: Any = doc("Parquet or JSONL file, or a list of them.", None)
    val_files: Any = doc("Parquet or JSONL file(s) for validation loss and samples.", None)
    prompt_key: str = doc("Column holding the prompt.", "prompt")
    response_key: str = doc("Column holding the response.", "response")
    prompt_dict_keys: Optional[List[str]] = doc("Keys to reach into a dict prompt column, in order.", None)
    response_dict_keys: Optional[List[str]] = doc("Keys to reach into a dict response column, in order.", None)
    multiturn: MultiturnConfig = doc("Multi-turn chat data.", factory=MultiturnConfig)
    max_length: int = doc("Most tokens in one example (prompt + response).", 1024)
    truncation: str = doc("Over-long example: `error` (names file and row), `left` or `right`.", "error")
    train_batch_size: int = doc(
        "Sequences per optimizer step, summed over all ranks (the global batch).", 256
    )
    micro_batch_size_per_gpu: int = doc(
        "Sequences per forward/backward on one rank; gradient accumulation makes up the rest.", 4
    )
    use_dynamic_bsz: bool = doc(
        "Cut each rank's share of a step into micro-batches by tokens (as many length-sorted "
        "sequences as fit `max_token_len_per_gpu`) instead of `micro_batch_size_per_gpu` "
        "sequences: short examples share a forward, so fewer, fuller forwards (as verl).",
        True,
    )
    max_token_len_per_gpu: Optional[int] = doc(
        "Token budget of one forward on one rank with `use_dynamic_bsz`. null: "
        "`micro_batch_size_per_gpu × max_length`, the memory bound of a fixed micro-batch.",
        None,
    )
    group_by_length: bool = doc(
        "Fill each global batch with examples of similar length (shuffled mega-batches, as HF "
        "Trainer's group_by_length): almost no padding. Batches stay random across the epoch.",
        True,
    )
    shuffle: bool = doc("Shuffle training examples each epoch (seeded, resumable).", True)
    train_max_samples: int = doc("Use only the first N training rows, over the files in order (-1: all).", -1)
    val_max_samples: int = doc("Use only the first N validation rows (-1: all).", -1)
    chat_template: Optional[str] = doc("A Jinja chat template replacing the tokenizer's (null: the tokenizer's own).", None)
    apply_chat_template_kwargs: dict = doc(
        "Extra keyword arguments for the chat template (e.g. {enable_thinking: false}).", factory=dict
    )
    cache_dir: Optional[str] = doc(
        "Folder of the token cache: each data set is tokenized once (per file content, tokenizer and the "
        "settings that change tokens) into memory-mapped arrays that every rank of a node shares. null: "
        "`$XDG_CACHE_HOME/sample-aware-trainer/tokens` (`~/.cache/...`).",
        None,
    )

    def token_budget(self) -> Optional[int]:
        """Tokens per forward on one rank, or None for fixed `micro_batch_size_per_gpu` micro-batches."""
        if not self.use_dynamic_bsz:
            return None
        return self.max_token_len_per_gpu or self.micro_batch_size_per_gpu * self.max_length

    def check(self) -> None:
        _require(self.train_files not in (None, "", []), "data.train_files", "is required")
        _require(self.max_length > 1, "data.max_length", f"must be > 1, got {self.max_length}")
        _one_of(self.truncation, "data.truncation", ("error", "left", "right"))
        _require(self.train_batch_size > 0, "data.train_batch_size", "must be > 0")
        _require(self.micro_batch_size_per_gpu > 0, "data.micro_batch_size_per_gpu", "must be > 0")
        for key in ("train_max_samples", "val_max_samples"):
            value = getattr(self, key)
            _require(value == -1 or value > 0, f"data.{key}", f"must be > 0 or -1 (all), got {value}")
        if self.max_token_len_per_gpu is not None:
            _require(
                self.use_dynamic_bsz,
                "data.max_token_len_per_gpu",
                "is only used with data.use_dynamic_bsz=true (set it, or drop the budget)",
            )
            _require(
                self.max_token_len_per_gpu >= self.max_length,
                "data.max_token_len_per_gpu",
                f"must be >= data.max_length ({self.max_length}) so every example fits",
            )


# ----------------------------------------------------------------------------- model
@dataclass
class FSDPConfig:
    model_dtype: str = doc(
        "Dtype of the sharded master weights, their gradients and the optimizer state (verl's key): fp32, or bf16 "
        "(also `bfloat16`) to halve their memory, as verl's `model_dtype=bf16` (pure bf16 training: updates smaller "
        "than a bf16 step of the weight are lost). With LoRA the adapters stay fp32 whatever this says.", "fp32")
    param_dtype: str = doc("Compute dtype of parameters: `auto` (bf16 on CUDA, fp32 on CPU), fp32, bf16 (fp16 is refused: it needs loss scaling).", "auto")
    reduce_dtype: str = doc("Gradient reduction dtype: `auto` (fp32), fp32, bf16.", "auto")
    cpu_offload: bool = doc("Keep sharded parameters and optimizer state on CPU (FSDP2 CPUOffloadPolicy).", False)
    reshard_after_forward: bool = doc("Free gathered parameters after forward (saves memory, costs an all-gather in backward).", True)
    fsdp_size: int = doc(
        "Ranks one model is sharded over (verl's key): -1 all ranks (FSDP); k: HSDP, sharded within groups of k consecutive "
        "ranks and replicated across them (multi-node: the GPUs per node). Must divide the number of processes.", -1)

    def check(self) -> None:
        # fp16 gradients underflow without a (sharded) grad scaler, which this trainer does not
        # run; verl's FSDP workers train in bf16 too. Refused rather than silently lossy.
        _require(self.param_dtype != "fp16", "model.fsdp_config.param_dtype",
                 "fp16 needs loss scaling, which this trainer does not do; use bf16 (same memory) or fp32")
        _one_of(self.param_dtype, "model.fsdp_config.param_dtype", ("auto", "fp32", "bf16"))
        self.model_dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(self.model_dtype, self.model_dtype)
        _require(self.model_dtype != "fp16", "model.fsdp_config.model_dtype",
                 "fp16 weights need loss scaling, which this trainer does not do; use bf16 (same memory) or fp32")
        _one_of(self.model_dtype, "model.fsdp_config.model_dtype", ("fp32", "bf16"))
        _one_of(self.reduce_dtype, "model.fsdp_config.reduce_dtype", ("auto", "fp32", "bf16"))

    def check_world(self, world_size: int) -> None:
        _require(self.fsdp_size == -1 or (self.fsdp_size > 0 and world_size % self.fsdp_size == 0),
                 "model.fsdp_config.fsdp_size", f"got {self.fsdp_size}: must be -1 (all ranks) or divide the {world_size} processes")


@dataclass
class ModelConfig:
    partial_pretrain: str = doc("Local directory or hub id of a Hugging Face causal LM.", "")
    trust_remote_code: bool = doc("Allow custom model code from the model directory.", False)
    enable_gradient_checkpointing: bool = doc("Recompute activations in backward to save memory.", False)
    attn_implementation: str = doc("`sdpa`, `eager` or `flash_attention_2`.", "sdpa")
    compile: bool = doc("Wrap each decoder layer in torch.compile.", False)
    external_lib: Optional[str] = doc(
        "A Python module imported before the model is loaded (one that registers a custom architecture).", None
    )
    fsdp_config: FSDPConfig = doc("FSDP2 sharding.", factory=FSDPConfig)
    ulysses_sequence_parallel_size: int = doc(
        "Ulysses sequence parallelism: split each sequence over this many ranks (all-to-all of attention "
        "heads around attention; verl's `ulysses_sequence_parallel_size`). Data-parallel size is world / N; "
        "N must divide the world size and the model's (key/value) heads.",
        1,
    )
    use_remove_padding: bool = doc(
        "Padding-free micro-batches (verl's `use_remove_padding`): each micro-batch's sequences packed in one "
        "row with flash-attention's varlen kernel (attn_implementation=flash_attention_2, CUDA). Without that "
        "kernel the run keeps length-grouped token-budget batches (one log line says so).",
        False,
    )
    use_liger: bool = doc(
        "Apply liger-kernel's fused kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy); needs the "
        "`liger-kernel` package and a CUDA GPU.",
        False,
    )
    lora_rank: int = doc(
        "LoRA rank (peft); > 0 trains low-rank adapters only: the base weights are frozen (kept in the compute "
        "dtype), gradients and AdamW state exist for the adapters alone. 0: full fine-tuning.",
        0,
    )
    lora_alpha: float = doc("LoRA scaling numerator: the adapter's update is scaled by lora_alpha / lora_rank.", 16)
    target_modules: Any = doc(
        "Modules that get adapters: `all-linear` (every linear layer but the LM head), or a list of module names "
        "(e.g. [q_proj, v_proj]).",
        "all-linear",
    )
    exclude_modules: Any = doc("Module names (a list, or a regex) left without adapters even when targeted.", None)
    lora_adapter_path: Optional[str] = doc(
        "A peft adapter directory (adapter_config.json, adapter_model.safetensors) to start from; its own "
        "rank, alpha and target modules are used.",
        None,
    )
    lora_export_merged: bool = doc(
        "With LoRA, also write the base with the adapters merged in, as a plain model, to <run>/hf_model_merged "
        "(<run>/hf_model holds the adapter).",
        False,
    )

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0 or bool(self.lora_adapter_path)

    def check(self) -> None:
        _require(bool(self.partial_pretrain), "model.partial_pretrain", "is required")
        _one_of(self.attn_implementation, "model.attn_implementation", ("sdpa", "eager", "flash_attention_2"))
        _require(self.ulysses_sequence_parallel_size >= 1, "model.ulysses_sequence_parallel_size", "must be >= 1")
        self.fsdp_config.check()
        _require(self.lora_rank >= 0, "model.lora_rank", f"must be >= 0 (0: no LoRA), got {self.lora_rank}")
        if not self.lora:
            return
        _require(self.lora_alpha > 0, "model.lora_alpha", f"must be > 0, got {self.lora_alpha}")
        names = [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules or [])
        _require(bool(names) and all(isinstance(n, str) and n for n in names), "model.target_modules",
                 f"must be all-linear or a list of module names, got {self.target_modules!r}")
        if self.lora_adapter_path:
            self.lora_adapter_path = expand_paths(self.lora_adapter_path)
            _require(os.path.isfile(os.path.join(self.lora_adapter_path, "adapter_config.json")), "model.lora_adapter_path",
                     f"{self.lora_adapter_path!r} is not a peft adapter directory (no adapter_config.json)")


# ----------------------------------------------------------------------------- optimizer
LR_SCHEDULERS = ("cosine", "constant", "wsd")  # trainer.optim.LR_SCHEDULES builds each


@dataclass
class OptimConfig:
    lr: float = doc("Peak learning rate.", 1e-5)
    betas: List[float] = doc("AdamW betas.", factory=lambda: [0.9, 0.95])
    weight_decay: float = doc("AdamW weight decay.", 0.01)
    lr_warmup_steps_ratio: float = doc("Share of total steps spent warming up linearly from 0.", 0.0)
    lr_warmup_steps: int = doc("Warmup steps; when > 0 it wins over `lr_warmup_steps_ratio` (-1: use the ratio).", -1)
    clip_grad: float = doc("Clip the global gradient norm to this value.", 1.0)
    lr_scheduler: str = doc("After warmup: `cosine`, `constant` or `wsd` (warmup-stable-decay).", "cosine")
    min_lr_ratio: float = doc("Floor of the cosine/wsd decay as a share of `lr`.", 0.0)
    num_cycles: float = doc("Cosine waves over the schedule (0.5: one half-wave from `lr` down to the floor).", 0.5)
    wsd_decay_ratio: float = doc("Share of total steps the wsd schedule spends decaying at the end.", 0.1)
    override_optimizer_config: Optional[dict] = doc("Extra keyword arguments for AdamW (e.g. {eps: 1.0e-6}).", None)

    def check(self) -> None:
        _require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", "must be two numbers in [0, 1)")
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _require(0 <= self.lr_warmup_steps_ratio < 1, "optim.lr_warmup_steps_ratio", "must be in [0, 1)")
        _require(self.clip_grad > 0, "optim.clip_grad", "must be > 0")
        _one_of(self.lr_scheduler, "optim.lr_scheduler", LR_SCHEDULERS)
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
        _require(0 < self.wsd_decay_ratio <= 1, "optim.wsd_decay_ratio", "must be in (0, 1]")
        _require(self.num_cycles > 0, "optim.num_cycles", "must be > 0")
        _require(self.lr_warmup_steps == -1 or self.lr_warmup_steps >= 0, "optim.lr_warmup_steps", "must be >= 0 or -1")
        for name in (self.override_optimizer_config or {}):
            _require(name not in ("lr", "betas", "weight_decay", "params"), f"optim.override_optimizer_config.{name}",
                     f"set optim.{name} instead")

    def warmup_steps(self, total_steps: int) -> int:
        return self.lr_warmup_steps if self.lr_warmup_steps > 0 else int(self.lr_warmup_steps_ratio * total_steps)


# ----------------------------------------------------------------------------- generation
@dataclass
class GenerationConfig:
    temperature: float = doc("Sampling temperature (> 0).", 1.0)
    top_k: int = doc("Keep the k most likely tokens (0 turns it off).", 50)
    top_p: float = doc("Nucleus sampling threshold in (0, 1].", 0.7)
    do_sample: bool = doc("Sample; `false` means greedy decoding.", True)
    max_new_tokens: int = doc("Most tokens generated per sample.", 100)
    gather_device: str = doc(
        "Where rank 0 keeps its full copy of the model for samples: `auto` (the training GPU "
        "when it has room, else CPU), `cpu`, `cuda`.",
        "auto",
    )
    gather_dtype: str = doc("dtype of that copy: `auto` (training dtype), fp32, bf16, fp16.", "auto")
    max_print_chars: int = doc("Console cut-off per prompt/generation; trackers get the full text.", 400)
    num_samples_per_prompt: int = doc(
        "Samples generated per prompt at each sample event (k); with k > 1 every metric is also logged as "
        "mean@k and, for right/wrong metrics, pass@k. Sample 1 keeps the prompt's seed, sample j its own seed "
        "derived from it, so runs and resumes repeat.",
        1,
    )
    also_greedy: bool = doc("Also generate one greedy answer per prompt beside the sampled ones, scored apart (`.../greedy`).", False)

    def check(self, prefix: str = "generation") -> None:
        _require(self.temperature > 0, f"{prefix}.temperature", f"must be > 0, got {self.temperature}")
        _require(self.top_k >= 0, f"{prefix}.top_k", f"must be >= 0, got {self.top_k}")
        _require(0 < self.top_p <= 1, f"{prefix}.top_p", f"must be in (0, 1], got {self.top_p}")
        _require(self.max_new_tokens > 0, f"{prefix}.max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        _one_of(self.gather_device, f"{prefix}.gather_device", ("auto", "cpu", "cuda"))
        _one_of(self.gather_dtype, f"{prefix}.gather_dtype", ("auto", "fp32", "bf16", "fp16"))
        _require(self.max_print_chars > 0, f"{prefix}.max_print_chars", "must be > 0")
        _require(self.num_samples_per_prompt >= 1, f"{prefix}.num_samples_per_prompt",
                 f"must be >= 1, got {self.num_samples_per_prompt}")


# ----------------------------------------------------------------------------- sample history
# The alert rules of trainer/history.py (named here so `samples.alerts.actions.<rule>` is checked
# before training) and what an alert of each may do (trainer/actions.py).
ALERT_RULES = ("degeneration", "collapse", "drift", "forgetting", "exact_match_drop", "reward_drop", "length_change")
ALERT_ACTIONS = ("warn", "stop", "rollback")


@dataclass
class RollbackConfig:
    lr_factor: float = doc("Learning rate multiplier from a rollback on (compounds over rollbacks; in (0, 1]).", 0.5)
    skip_data: bool = doc(
        "Skip the data window between the restored checkpoint and the alert (false: the same steps again "
        "with the data reshuffled).",
        True,
    )
    max_rollbacks: int = doc("Rollbacks allowed in a run; an alert after that stops the run instead.", 2)

    def check(self) -> None:
        _require(0 < self.lr_factor <= 1, "samples.alerts.rollback.lr_factor", f"must be in (0, 1], got {self.lr_factor}")
        _require(self.max_rollbacks >= 0, "samples.alerts.rollback.max_rollbacks", "must be >= 0")


@dataclass
class AlertConfig:
    repetition_threshold: float = doc("Degeneration: share of repeated 3-grams in a generation above this.", 0.5)
    limit_hit_share: float = doc("Degeneration: share of samples hitting max_new_tokens above this.", 0.5)
    collapse_similarity: float = doc("Collapse: mean similarity between different prompts' generations above this.", 0.9)
    collapse_share: float = doc(
        "Collapse also when at least this share of the prompts (3 or more) get generations near-identical to one "
        "another (similarity above collapse_similarity): most answers turned into one, the rest not yet; 1 turns "
        "this off.", 0.5)
    metric_drop: float = doc("Exact match or reward falling this far (absolute) below the run's best.", 0.2)
    noise_z: float = doc(
        "A drop must also exceed this many standard errors of the difference between the event's mean and "
        "the best event's mean (from the spread of their samples), and forgetting this many standard "
        "deviations of chance flips, so the noise of a few sampled answers does not alert; 0 turns this off.",
        2.0,
    )
    length_change_ratio: float = doc(
        "Mean generated length changing by this factor against the event before the change began.", 2.0)
    persist_events: int = doc(
        "Degeneration, length change and forgetting alert only when the change lasts this many events in a row "
        "(1: at the first event). While a model learns a new format one answer loops once, one event's answers "
        "run long, or a whole event dips and recovers: measured on the regression demo (docs/alerts-actions.md).",
        2,
    )
    drift_share: float = doc(
        "Drift: share of prompts whose generation changed since the previous event, right after "
        "`stable_events` events where at most `stable_share` changed (each prompt keeps its own "
        "seed, so only the model can change an answer).",
        0.4,
    )
    stable_share: float = doc("Drift: an event counts as stable when at most this share of answers changed.", 0.2)
    stable_events: int = doc(
        "Drift: stable events in a row before a sudden change counts (fewer: false alarms while learning).", 2
    )
    forgotten_share: float = doc(
        "Forgetting: share of the prompts once answered right (exact match) `stable_events` times in a row "
        "that are now answered wrong (at least two, and `noise_z` standard deviations above the run's own "
        "rate of such flips).",
        0.4,
    )
    forgotten_chance: float = doc(
        "Forgetting also fires for a single settled prompt whose streak of wrong answers is this unlikely "
        "by chance (its own rate of wrong answers since it settled, to the power of the streak).",
        1e-4,
    )
    min_history: int = doc("Events seen before drop/length rules may fire.", 1)
    metric: Optional[str] = doc(
        "The task metric (a `samples.metrics` name) the drop and forgetting rules watch; the drop rule is "
        "called `<metric>_drop`. null: the first of `samples.metrics` (exact_match by default).",
        None,
    )
    action: str = doc(
        "What an alert does, for every rule not in `actions`: `warn` (a warning and a record), `stop` (checkpoint, "
        "reason in run_state.json, exit code 3), `rollback` (back to the last checkpoint before the alerts, lower LR).",
        "warn",
    )
    actions: Dict[str, Optional[str]] = doc(
        "Per rule (degeneration, collapse, drift, forgetting, exact_match_drop, reward_drop, length_change): its "
        "action, winning over `action` (null: `action`).",
        factory=dict,
    )
    rollback: RollbackConfig = doc("How a rollback restarts.", factory=RollbackConfig)

    def action_for(self, rule: str) -> str:
        return self.actions.get(rule) or self.action

    def uses(self, action: str) -> Optional[str]:
        """The key that asks for `action` (None: no rule does)."""
        for rule in ALERT_RULES:
            if self.action_for(rule) == action:
                return f"samples.alerts.actions.{rule}" if self.actions.get(rule) else "samples.alerts.action"
        return None

    def check(self) -> None:
        _one_of(self.action, "samples.alerts.action", ALERT_ACTIONS)
        for rule, action in self.actions.items():
            if not rule.endswith("_drop"):  # <metric>_drop: the drop rule of the watched metric (`metric`)
                _one_of(rule, "samples.alerts.actions", ALERT_RULES)
            if action is not None:
                _one_of(action, f"samples.alerts.actions.{rule}", ALERT_ACTIONS)
        self.rollback.check()
        for name in ("repetition_threshold", "limit_hit_share", "collapse_similarity", "collapse_share", "drift_share",
                     "stable_share", "forgotten_share"):
            value = getattr(self, name)
            _require(0 < value <= 1, f"samples.alerts.{name}", f"must be in (0, 1], got {value}")
        _require(self.metric_drop > 0, "samples.alerts.metric_drop", "must be > 0")
        _require(self.noise_z >= 0, "samples.alerts.noise_z", "must be >= 0")
        _require(self.length_change_ratio > 1, "samples.alerts.length_change_ratio", "must be > 1")
        _require(self.persist_events >= 1, "samples.alerts.persist_events", "must be >= 1")
        _require(0 <= self.forgotten_chance < 1, "samples.alerts.forgotten_chance", f"must be in [0, 1), got {self.forgotten_chance}")
        _require(self.min_history >= 1, "samples.alerts.min_history", "must be >= 1")
        _require(self.stable_events >= 1, "samples.alerts.stable_events", "must be >= 1")


@dataclass
class MetricConfig:
    name: str = doc("Name in logs and trackers (`val/metric/<name>`); default: `fn` (for `module:function`, the function's name).", "")
    fn: str = doc("A registered function (exact_match, last_number_match, contains, rouge_l, length_chars, any "
                  "reward) or `module:function` with the reward signature.", "")
    kwargs: dict = doc("Extra keyword arguments for the function.", factory=dict)

    @property
    def display_name(self) -> str:
        return self.name or self.fn.rpartition(":")[2]


@dataclass
class SamplesConfig:
    history: bool = doc("Append every sample to samples.jsonl in the run directory.", True)
    report: bool = doc("Keep report.html in the run directory: rewritten at each sample event and at the end.", True)
    alerts: AlertConfig = doc("Thresholds of the sample alert rules.", factory=AlertConfig)
    metrics: List[MetricConfig] = doc(
        "Task metrics scored on every sample (SFT `val/metric/<name>`, RL `samples/metric/<name>`), with the "
        "reward functions' signature; a metric returning null (e.g. no reference) is left out.",
        factory=lambda: [MetricConfig("exact_match", "exact_match"), MetricConfig("last_number_match", "last_number_match")],
    )
    prompts_file: Optional[str] = doc(
        "A JSONL file of sample prompts replacing the default ones (SFT: the first validation rows; RL: "
        "logging.sample_logging.prompts). Each line: `prompt` (text) or `messages` (chat), and optionally "
        "`reference`, `id`, `tags`, `max_new_tokens`, `temperature`, `top_p`, `top_k`, `do_sample`.",
        None,
    )

    def check(self) -> None:
        self.alerts.check()
        for i, m in enumerate(self.metrics):
            _require(bool(m.fn or m.name), f"samples.metrics[{i}].fn", "is required (a registered name or module:function)")
        names = [m.display_name for m in self.metrics]
        if self.alerts.metric is not None:
            _require(self.alerts.metric in names, "samples.alerts.metric",
                     f"{self.alerts.metric!r} is not one of samples.metrics ({', '.join(names) or 'none'})")
        elif names:
            self.alerts.metric = names[0]
        if self.prompts_file:
            self.prompts_file = expand_paths(self.prompts_file)
            _require(os.path.isfile(self.prompts_file), "samples.prompts_file", f"{self.prompts_file}: no such file")


# ----------------------------------------------------------------------------- evaluation
@dataclass
class LmEvalConfig:
    """EleutherAI's lm-evaluation-harness on rank 0's gathered copy (the `[eval]` extra)."""

    tasks: List[str] = doc("Task (or group) names to run; empty: no lm-eval.", factory=list)
    include_path: Any = doc(
        "A folder (or a list) of your own task YAML files, e.g. with `dataset_path: json` and local "
        "`dataset_kwargs.data_files`: nothing is downloaded.",
        None,
    )
    include_defaults: bool = doc(
        "Also index the harness's built-in tasks (their data is downloaded; indexing them takes about a minute).", False
    )
    limit: Optional[float] = doc("Documents per task: a count (>= 1) or a share of the task (< 1); null: all.", None)
    num_fewshot: Optional[int] = doc("Few-shot examples per prompt (null: each task's own default).", None)
    batch_size: int = doc("Requests per forward in the harness.", 8)

    def check(self) -> None:
        for i, t in enumerate(self.tasks):
            _require(isinstance(t, str) and bool(t.strip()), f"eval.lm_eval.tasks[{i}]", "must be a task name")
        paths = [self.include_path] if isinstance(self.include_path, str) else list(self.include_path or [])
        self.include_path = expand_paths(self.include_path)
        for path in expand_paths(paths):
            _require(os.path.exists(path), "eval.lm_eval.include_path", f"{path}: no such file or folder")
        if self.limit is not None:
            _require(self.limit > 0, "eval.lm_eval.limit", f"must be > 0 (a count, or a share below 1), got {self.limit}")
        if self.num_fewshot is not None:
            _require(self.num_fewshot >= 0, "eval.lm_eval.num_fewshot", f"must be >= 0, got {self.num_fewshot}")
        _require(self.batch_size > 0, "eval.lm_eval.batch_size", "must be > 0")


@dataclass
class EvalConfig:
    lm_eval: LmEvalConfig = doc("lm-evaluation-harness tasks run at sample events.", factory=LmEvalConfig)
    every_n_validations: int = doc(
        "Run the benchmarks at every N-th sample event of this process (SFT: validations with samples; RL: "
        "sample logging): the N-th, 2N-th, ...", 1,
    )

    def check(self) -> None:
        self.lm_eval.check()
        _require(self.every_n_validations >= 1, "eval.every_n_validations", f"must be >= 1, got {self.every_n_validations}")


# ----------------------------------------------------------------------------- trainer
CHECKPOINT_CONTENTS = ("model", "optimizer", "extra", "hf_model")


@dataclass
class CheckpointConfig:
    """What each `global_step_N/` holds and what a resume restores (verl's `trainer.checkpoint`)."""

    save_contents: List[str] = doc(
        "Parts written to each checkpoint: `model` (sharded weights, required), `optimizer` (its "
        "state), `extra` (LR scheduler and RNG states), `hf_model` (also the full model as "
        "safetensors under huggingface/; a gather on every rank).",
        factory=lambda: ["model", "optimizer", "extra"],
    )
    load_contents: Optional[List[str]] = doc(
        "Parts a resume restores, where the checkpoint has them (null: the same as save_contents); "
        "a part left out starts fresh.",
        None,
    )

    def effective_load_contents(self) -> List[str]:
        return list(self.save_contents if self.load_contents is None else self.load_contents)

    def check(self) -> None:
        for key, items in (("trainer.checkpoint.save_contents", self.save_contents),
                           ("trainer.checkpoint.load_contents", self.effective_load_contents())):
            for item in items:
                _one_of(item, key, CHECKPOINT_CONTENTS)
            _require(len(set(items)) == len(items), key, f"lists a part twice: {items}")
            # Without the weights a checkpoint cannot resume anything (verl asserts the same).
            _require("model" in items, key, f"must include model, got {items}")


METRIC_MODES = ("max", "min")


@dataclass
class KeepBestConfig:
    metric: Optional[str] = doc("Logged key that ranks checkpoints (e.g. val/loss, val/exact_match); null: off.", None)
    mode: str = doc("`max` or `min`: which way is better.", "max")

    def check(self, key: str = "trainer.keep_best") -> None:
        _one_of(self.mode, f"{key}.mode", METRIC_MODES)


@dataclass
class EarlyStoppingConfig:
    metric: Optional[str] = doc("Logged key watched at each validation; null: off.", None)
    mode: str = doc("`max` or `min`: which way is better.", "min")
    patience: int = doc("Validations in a row without an improvement of more than `min_delta` before the run stops.", 3)
    min_delta: float = doc("Smallest change that counts as an improvement (>= 0).", 0.0)

    def check(self) -> None:
        _one_of(self.mode, "trainer.early_stopping.mode", METRIC_MODES)
        _require(self.patience >= 1, "trainer.early_stopping.patience", "must be >= 1")
        _require(self.min_delta >= 0, "trainer.early_stopping.min_delta", "must be >= 0")


@dataclass
class StopAtConfig:
    metric: Optional[str] = doc("Logged key; the run ends cleanly once it reaches `value`; null: off.", None)
    value: float = doc("The target.", 0.0)
    mode: str = doc("`max`: reached at >= value; `min`: at <= value.", "max")

    def check(self) -> None:
        _one_of(self.mode, "trainer.stop_at.mode", METRIC_MODES)


@dataclass
class TrainerConfig:
    default_local_dir: str = doc("Run directory: checkpoints, metrics, samples, report, exported model.", "checkpoints/run")
    project_name: str = doc("Project name for the trackers.", "sft")
    experiment_name: str = doc("Run name for the trackers.", "run")
    total_epochs: int = doc("Epochs over the training files.", 1)
    total_training_steps: Optional[int] = doc(
        "Stop early (validate, save) after this many optimizer steps. SFT: the LR schedule still spans "
        "`total_epochs` (verl's early exit); RL: the schedule spans these steps (as verl's PPO trainer).",
        None,
    )
    logger: List[str] = doc("Trackers: any of console, file, mlflow, swanlab, wandb, tensorboard.", factory=lambda: ["console", "file"])
    seed: int = doc("Seed for init, shuffling and sampling.", 1)
    save_freq: int = doc("Save a checkpoint every N steps (-1: only at the end).", -1)
    test_freq: int = doc("Validate every N steps (-1: each epoch end and at the end only).", -1)
    max_ckpt_to_keep: Optional[int] = doc("Keep only the newest N checkpoints (null: all).", None)
    resume_mode: str = doc(
        "`auto` (resume_from_path when set, else the latest checkpoint in the run directory), `disable`, or "
        "`resume_path` (resume_from_path, required).",
        "auto",
    )
    resume_from_path: Optional[str] = doc("A checkpoint directory (global_step_N) to resume from (modes auto and resume_path).", None)
    resume_force: bool = doc(
        "Resume even when the checkpoint was written by a run with another model, data, LoRA rank or algorithm "
        "(without it such a resume stops in one line naming the changed key).",
        False,
    )
    device: str = doc("`auto` (cuda if available), `cuda` or `cpu`; picks nccl or gloo.", "auto")
    max_val_samples: int = doc("Validation samples generated per validation (0 turns generation off).", 5)
    log_freq: int = doc("Send train metrics to the trackers every N steps.", 1)
    collective_timeout_seconds: int = doc("How long a collective may wait for the other ranks before the run fails.", 1800)
    export_hf_model: bool = doc("Save the final model in Hugging Face format under <run>/hf_model.", True)
    checkpoint: CheckpointConfig = doc("Checkpoint contents (verl's names).", factory=CheckpointConfig)
    keep_best: KeepBestConfig = doc(
        "Keep the best checkpoint by a logged metric beside the newest `max_ckpt_to_keep` (never pruned; "
        "exported as best_hf_model/ when export_hf_model).",
        factory=KeepBestConfig,
    )
    early_stopping: EarlyStoppingConfig = doc("End the run cleanly when a metric stops improving.", factory=EarlyStoppingConfig)
    stop_at: StopAtConfig = doc("End the run cleanly when a metric reaches a target.", factory=StopAtConfig)

    def check(self) -> None:
        self.keep_best.check()
        self.early_stopping.check()
        self.stop_at.check()
        _require(self.total_epochs > 0, "trainer.total_epochs", "must be > 0")
        if self.total_training_steps is not None:
            _require(self.total_training_steps > 0, "trainer.total_training_steps", "must be > 0 or null")
        _require(self.save_freq == -1 or self.save_freq > 0, "trainer.save_freq", "must be > 0 or -1")
        _require(self.test_freq == -1 or self.test_freq > 0, "trainer.test_freq", "must be > 0 or -1")
        if self.max_ckpt_to_keep is not None:
            _require(self.max_ckpt_to_keep > 0, "trainer.max_ckpt_to_keep", "must be > 0 or null")
        _one_of(self.resume_mode, "trainer.resume_mode", ("auto", "disable", "resume_path"))
        if self.resume_mode == "resume_path":
            _require(bool(self.resume_from_path), "trainer.resume_from_path", "is required when resume_mode=resume_path")
        _one_of(self.device, "trainer.device", ("auto", "cuda", "cpu"))
        _require(self.max_val_samples >= 0, "trainer.max_val_samples", f"must be >= 0, got {self.max_val_samples}")
        _require(self.log_freq > 0, "trainer.log_freq", "must be > 0")
        _require(self.collective_timeout_seconds > 0, "trainer.collective_timeout_seconds", "must be > 0")
        known = ("console", "file", "mlflow", "swanlab", "wandb", "tensorboard")
        for name in self.logger:
            _one_of(name, "trainer.logger", known)
        self.checkpoint.check()


@dataclass
class SFTConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self, world_size: int) -> None:
        self.model.partial_pretrain = expand_paths(self.model.partial_pretrain)
        self.data.train_files, self.data.val_files = expand_paths(self.data.train_files), expand_paths(self.data.val_files)
        self.eval.check()
        self.data.check()
        self.model.check()
        self.model.fsdp_config.check_world(world_size)
        self.optim.check()
        self.generation.check()
        self.trainer.check()
        self.samples.check()
        sp = self.model.ulysses_sequence_parallel_size
        _require(world_size % sp == 0, "model.ulysses_sequence_parallel_size",
                 f"{sp} must divide the number of processes ({world_size}); the data-parallel size is world / it")
        # The ranks of one sequence-parallel group share their micro-batches: batches count data-parallel ranks.
        dp = world_size // sp
        dp_name = "world_size" if sp == 1 else "data-parallel size (world / sequence-parallel size)"
        ranks = f"world size {world_size}" if sp == 1 else f"data-parallel size {dp} (world {world_size} / sequence-parallel {sp})"
        if self.data.max_token_len_per_gpu is None:
            # Also with use_dynamic_bsz: its default budget is defined by micro_batch_size_per_gpu.
            per_step = self.data.micro_batch_size_per_gpu * dp
            _require(
                self.data.train_batch_size % per_step == 0,
                "data.train_batch_size",
                f"{self.data.train_batch_size} is not divisible by micro_batch_size_per_gpu × {dp_name} "
                f"= {self.data.micro_batch_size_per_gpu} × {dp}",
            )
        else:  # micro-batches are cut by tokens; ranks still get equal numbers of sequences
            _require(
                self.data.train_batch_size % dp == 0,
                "data.train_batch_size",
                f"{self.data.train_batch_size} is not divisible by the {ranks}",
            )
        # Last: a wrong value is worth saying even when the paths are still verl's placeholders.
        missing_inputs(self.model.partial_pretrain, self.data.train_files, "python -m trainer.fsdp_sft_trainer --config-name demo")
