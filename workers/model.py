"""Loading Hugging Face causal LMs and tokenizers (local directory or hub id)."""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import logging
import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.utils import GENERATION_CONFIG_NAME, cached_file

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model or tokenizer could not be loaded; the message names the path."""


def import_external_lib(module: Optional[str]) -> None:
    """verl's `model.external_lib`: a module that registers a custom architecture with the Auto
    classes when imported."""
    if not module:
        return
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - re-raised with the key named
        raise ModelLoadError(f"model.external_lib={module!r}: cannot import it ({type(err).__name__}: {err})") from err


def load_tokenizer(
    path: str, trust_remote_code: bool = False, chat_template: Optional[str] = None, key: str = "model.partial_pretrain"
) -> PreTrainedTokenizerBase:
    """`chat_template` (a Jinja string) replaces the tokenizer's own; `key` is what the error message
    names: the setting (or argument) the path came from."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - re-raised with the path named
        raise ModelLoadError(f"{key}={path!r}: cannot load a tokenizer ({type(err).__name__}: {err})") from err
    ensure_pad_token(tokenizer)
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token without changing what EOS is.

    Reusing EOS as pad is the usual fix, and it is safe here because padding is always masked
    out of the loss and attention by `attention_mask`, never by token id.
    """
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token_id is None:
        raise ModelLoadError("tokenizer has neither a pad token nor an EOS token; add one to the tokenizer")
    tokenizer.pad_token = tokenizer.eos_token
    log.info("tokenizer has no pad token: padding with EOS (%r); EOS itself is unchanged", tokenizer.eos_token)


def load_stop_ids(path: str, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """Every token that ends a generation: the tokenizer's EOS and each `eos_token_id` of the
    model's generation_config.json (an int or a list), in that order, without repeats.

    Chat models end a turn with a token of their own (`<|im_end|>`) and list it there beside the
    end of text. Every rank reads the file from the path, so all ranks stop alike, whichever of
    them loaded the weights with `from_pretrained`.
    """
    ids = tuple(dict.fromkeys(int(i) for i in (tokenizer.eos_token_id, *_generation_config_eos_ids(path)) if i is not None))
    if len(ids) > 1:
        log.info("generations stop at any of %s (%s and the tokenizer's EOS)", list(ids), GENERATION_CONFIG_NAME)
    return ids


def _generation_config_eos_ids(path: str) -> list[int]:
    local = Path(path).is_dir()
    if local and not (Path(path) / GENERATION_CONFIG_NAME).is_file():
        return []
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError as err:
        if not local:
            return []  # a hub model without the file
        raise ModelLoadError(f"model.partial_pretrain={path!r}: cannot read {GENERATION_CONFIG_NAME} ({err})") from err
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def load_config(path: str, trust_remote_code: bool = False, key: str = "model.partial_pretrain") -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{key}={path!r}: cannot load a model config ({type(err).__name__}: {err})") from err


def generation_config_file(path: str) -> Optional[Path]:
    """The model's own generation_config.json (in its directory or the hub cache), or None when it
    has none: then none is written beside it either, so transformers derives it from config.json
    exactly as it would for the original model."""
    try:
        found = cached_file(path, GENERATION_CONFIG_NAME, _raise_exceptions_for_missing_entries=False)
    except Exception:  # noqa: BLE001 - an unreadable source has no generation config to copy
        return None
    return Path(found) if found else None


def load_pretrained(
    path: str, dtype: torch.dtype, trust_remote_code: bool = False, attn_implementation: str = "sdpa", auto_class=None,
    **model_kwargs,
) -> torch.nn.Module:
    auto_class = auto_class or AutoModelForCausalLM
    try:
        if model_kwargs:  # config attributes (num_labels, classifier_dropout): set on the config, as
            # build_from_config does; from_pretrained passes attributes its config lacks to __init__.
            config = load_config(path, trust_remote_code)
            for key, value in model_kwargs.items():
                setattr(config, key, value)
            model_kwargs = {"config": config}
        model = auto_class.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation, **model_kwargs
        )
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"model.partial_pretrain={path!r}: cannot load the model ({type(err).__name__}: {err})") from err
    return model


def build_from_config(
    config: PretrainedConfig,
    dtype: torch.dtype,
    device: Optional[torch.device | str] = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    auto_class=None,
    **model_kwargs,
) -> torch.nn.Module:
    """An uninitialised model of the same architecture (on `meta` when device is "meta").
    `config` is left as it was: transformers' `from_config` sets `config.dtype` to `dtype` in
    place, and a config shared with the caller then declares another dtype on the ranks that
    built on meta than on rank 0 (which loads its own config): the final export, cast to the
    declared dtype, gathered different sizes on different ranks."""
    auto_class = auto_class or AutoModelForCausalLM
    config = copy.deepcopy(config)
    for key, value in model_kwargs.items():  # e.g. num_labels=1 for a value head
        setattr(config, key, value)
    with torch.device(device or "cpu"):
        return auto_class.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation
        )


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks, found the way HF marks them (`_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        # Fall back to the common `model.layers` ModuleList.
        inner = getattr(model, "model", None)
        layers = list(getattr(inner, "layers", []) or [])
    return layers


def save_hf(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: Path, generation_config: Optional[Path] = None
) -> None:
    """Weights (safetensors), config, tokenizer and the original generation config."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    # save_pretrained writes a generation config derived from config.json; the original's may
    # differ (sampling defaults, several EOS ids), so it replaces the derived one.
    _place_generation_config(out_dir, generation_config)


def save_hf_files(
    model_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, out_dir: Path, generation_config: Optional[Path] = None
) -> None:
    """Everything of a Hugging Face model directory but the weights."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _place_generation_config(out_dir, generation_config)


def _place_generation_config(out_dir: Path, generation_config: Optional[Path]) -> None:
    target = out_dir / GENERATION_CONFIG_NAME
    if generation_config is not None:
        shutil.copyfile(generation_config, target)
    else:
        target.unlink(missing_ok=True)


@contextlib.contextmanager
def lm_head_rows(model: torch.nn.Module, keep: torch.Tensor) -> Iterator[bool]:
    """Within the block, the model's LM head runs only on the hidden states where `keep` ([B, L]
    bool) is True, so `.logits` comes out as [keep.sum(), vocab] in row-major order.

    In SFT only the response positions have a target: skipping the prompt and padding in the LM
    head and the softmax over the vocabulary saves work that grows with the vocabulary (3% of a
    step on the benchmark's 4,000-token vocabulary, more on real ones of 32k-150k) without
    changing the loss or a gradient. It hooks the module the model
    returns from `get_output_embeddings()`, so it works for any causal LM that calls its head
    once on the final hidden states; yields False (and changes nothing) when there is none.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield False
        return
    handle = head.register_forward_pre_hook(lambda module, args: (args[0][keep], *args[1:]))
    try:
        yield True
    finally:
        handle.remove()


def cache_keyword(model: torch.nn.Module) -> Optional[str]:
    """The forward keyword that passes a KV cache in: `cache` since transformers 5.x renamed it,
    `past_key_values` before (the range in pyproject admits both); None when the forward takes
    neither (remote code, state-space models), and callers then run without a cache."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps with **kwargs
    parameters = inspect.signature(base.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def cache_arguments(model: torch.nn.Module, cache=None) -> dict:
    """Forward keywords that pass `cache` in (None: start one) and ask for it back."""
    return {cache_keyword(model): cache, "use_cache": True}


def output_cache(out):
    """The KV cache a forward with `use_cache` returned, under either name (`cache_arguments`)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def activation_checkpointing(model: torch.nn.Module) -> bool:
    """Whether HF gradient checkpointing is on (`is_activation_checkpointing` since 5.x)."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)
