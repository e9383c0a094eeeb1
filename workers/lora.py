"""LoRA adapters (peft) on a model that FSDP2 then shards: wrapping before sharding, the
reference policy as the base with the adapters off, and the adapter's save, load and merge.

The adapters are injected into the Hugging Face model itself (`peft.inject_adapter_in_model`),
not wrapped in a `PeftModel`: the sharded module stays the causal LM the rest of the code knows
(decoder layers, `get_output_embeddings`, `generate`), and its state dict, DCP checkpoints and
optimizer carry the adapter weights under their peft names (`...q_proj.lora_A.default.weight`,
the frozen base under `...q_proj.base_layer.weight`). Every rank injects the same adapters (rank
0 into the loaded model, the others into the meta one) before `fully_shard`, so the shards and
rank 0's full state agree. A `PeftModel` is built only on one process, around an unsharded copy
(`peft_model_on_meta`), to write the adapter or merge it with peft's own code.

FSDP2 with frozen and trainable parameters in one decoder-layer unit is fine as long as the
trainable ones share one dtype (torch checks only those); the frozen base may then be stored in
the compute dtype (bf16) while the adapters stay fp32: what verl PR #4275 works around for its
bf16-loaded bases by sharding LoRA modules separately, not needed here because the adapters
are created in fp32 and only the frozen weights are cast.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from workers.model import ModelLoadError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"  # peft's name of the one adapter


@dataclass(frozen=True)
class LoraSpec:
    """What `model.lora_*` asks for. With `adapter_path` the adapter's own config wins."""

    rank: int
    alpha: float
    target_modules: Any = "all-linear"
    exclude_modules: Any = None
    adapter_path: Optional[str] = None

    @classmethod
    def from_model_config(cls, cfg) -> Optional["LoraSpec"]:
        """None when the run fine-tunes the whole model (`model.lora_rank=0`, no adapter path)."""
        if not cfg.lora:
            return None
        targets = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
        exclude = cfg.exclude_modules if isinstance(cfg.exclude_modules, (str, type(None))) else list(cfg.exclude_modules)
        return cls(cfg.lora_rank, cfg.lora_alpha, targets, exclude, cfg.lora_adapter_path)

    def peft_config(self):
        from peft import LoraConfig

        if self.adapter_path:
            config = LoraConfig.from_pretrained(self.adapter_path)
            config.inference_mode = False  # trained further
            return config
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=self.target_modules,
                          exclude_modules=self.exclude_modules, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")

    def describe(self) -> str:
        c = self.peft_config()
        targets = c.target_modules if isinstance(c.target_modules, str) else sorted(c.target_modules)
        source = f", from {self.adapter_path}" if self.adapter_path else ""
        return f"rank {c.r}, alpha {c.lora_alpha:g}, targets {targets}{source}"


def add_adapters(model: torch.nn.Module, spec: LoraSpec, frozen_dtype: Optional[torch.dtype] = None,
                 load_weights: bool = True) -> torch.nn.Module:
    """Inject the adapters into `model` (in place; returned): everything else frozen, the
    adapters fp32 and trainable. `frozen_dtype` stores the frozen base in that dtype (the
    compute dtype: FSDP would cast it to that for every forward anyway). `load_weights`: fill
    the adapters from `spec.adapter_path` (on the process that holds real weights)."""
    from peft import inject_adapter_in_model

    config = spec.peft_config()
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    except ValueError as err:  # e.g. target modules that match nothing in this model
        key = "model.lora_adapter_path" if spec.adapter_path else "model.target_modules"
        value = spec.adapter_path or config.target_modules
        raise ModelLoadError(f"{key}={value}: {str(err).splitlines()[0]}") from None
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_param(name))
        if frozen_dtype is not None and not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(frozen_dtype)
    if spec.adapter_path and load_weights:
        _load_adapter_weights(model, spec.adapter_path)
    return model


def check_fits(spec: LoraSpec, model_config, trust_remote_code: bool = False) -> None:
    """Raise the one-line error `add_adapters` would, on a model built on the meta device (no
    memory, no weights read): a wrong `model.target_modules` is named before any model loads.
    Every rank calls it, so an adapter that does not fit stops them all alike, not rank 0 alone
    (which loads the adapter's weights) while the others wait in the first collective."""
    from workers.model import build_from_config

    model = add_adapters(build_from_config(model_config, torch.float32, "meta", trust_remote_code), spec, load_weights=False)
    if spec.adapter_path:
        _check_adapter_shapes(model, spec.adapter_path)


def _check_adapter_shapes(model: torch.nn.Module, adapter_path: str) -> None:
    """The adapter file's tensors (names and shapes, read from its header) against the model's."""
    from safetensors import safe_open

    weights = Path(adapter_path) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ModelLoadError(f"model.lora_adapter_path={adapter_path}: no {ADAPTER_WEIGHTS} in it")
    ours = {n: tuple(p.shape) for n, p in model.named_parameters() if is_adapter_param(n)}
    with safe_open(str(weights), framework="pt") as f:
        saved = {_our_name(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for name in sorted(set(ours) | set(saved)):
        if ours.get(name) != saved.get(name):
            raise ModelLoadError(f"model.lora_adapter_path={adapter_path}: the adapter does not fit this model "
                                 f"({name}: {saved.get(name, 'absent')} in the adapter, {ours.get(name, 'absent')} here)")


def _our_name(saved: str) -> str:
    """peft's file name of an adapter tensor (`base_model.model.<module>.lora_A.weight`) as the
    injected model names it (`<module>.lora_A.default.weight`)."""
    head, _, leaf = saved.removeprefix("base_model.model.").rpartition(".")
    return f"{head}.{ADAPTER_NAME}.{leaf}"


def is_adapter_param(name: str) -> bool:
    return ".lora_" in name


def _load_adapter_weights(model: torch.nn.Module, adapter_path: str) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = Path(adapter_path) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ModelLoadError(f"model.lora_adapter_path={adapter_path}: no {ADAPTER_WEIGHTS} in it")
    result = set_peft_model_state_dict(model, load_file(str(weights)), adapter_name=ADAPTER_NAME)
    missing = [k for k in result.missing_keys if is_adapter_param(k)]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[0]
        raise ModelLoadError(f"model.lora_adapter_path={adapter_path}: the adapter does not fit this model ({bad!r})")


def trainable_summary_line(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """Trainable against all parameters, and what the optimizer holds (full sizes: a DTensor's
    shape is the unsharded one): one log line that shows the base is frozen."""
    total = sum(p.shape.numel() for p in model.parameters())
    trainable = sum(p.shape.numel() for p in model.parameters() if p.requires_grad)
    in_optimizer = sum(p.shape.numel() for g in optimizer.param_groups for p in g["params"])
    return (f"{trainable / 1e6:.3f}M trainable parameters of {total / 1e6:.2f}M ({100 * trainable / max(total, 1):.2f}%); "
            f"AdamW state for {in_optimizer / 1e6:.3f}M")


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block the model computes as its frozen base: the RL reference policy, with
    no second copy of the weights. Sets peft's per-layer flag directly: peft's own
    `enable_adapters(False)` also turns `requires_grad` off for the adapters, which would
    change what the optimizer and FSDP see between here and the next update."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield model
    finally:
        for m, flag in zip(layers, before):
            m._disable_adapters = flag


# ---------------------------------------------------------------------- adapter files (one process)
def adapter_spec_of(directory: Path) -> Optional[LoraSpec]:
    """The LoRA spec a directory's adapter_config.json describes (None: no adapter there)."""
    if not (directory / ADAPTER_CONFIG).is_file():
        return None
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    return LoraSpec(int(config.get("r", 8)), float(config.get("lora_alpha", 8)), config.get("target_modules"),
                    config.get("exclude_modules"), adapter_path=str(directory))


def write_adapter_config(spec: LoraSpec, base_model: str, out_dir: Path) -> None:
    """adapter_config.json alone: what a checkpoint's `huggingface/` needs to say it is LoRA."""
    config = spec.peft_config()
    config.base_model_name_or_path = base_model
    config.inference_mode = True
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))


def peft_model_on_meta(base: torch.nn.Module, spec: LoraSpec, base_model: str):
    """A `PeftModel` around `base` (built on the meta device), with adapters shaped as in
    training: fill `.base_model.model` with a trained full state (`load_state_dict(..., assign=True)`),
    then peft's own `save_pretrained` writes the adapter and `merge_and_unload` the merged model."""
    from peft import get_peft_model

    config = spec.peft_config()
    config.base_model_name_or_path = base_model
    config.inference_mode = True
    base.name_or_path = base_model  # what get_peft_model writes into adapter_config.json
    return get_peft_model(base, config, adapter_name=ADAPTER_NAME)
