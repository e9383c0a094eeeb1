"""KV caches for computing a group's shared prompt once in a training forward.

`workers.actor` runs the distinct prompts of a micro-batch once (forward 1), then every response
against its prompt's keys and values (forward 2), with gradients. A plain `DynamicCache` breaks
under activation checkpointing: the backward runs each checkpointed layer again to recompute
what it dropped, and that replay would append the keys and values a second time (HF's layers
therefore drop the cache when checkpointing with gradients on). These two caches give a replayed
layer exactly what the first run got, so the layers may keep them (`caches_through_checkpoints`).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator, Optional

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

try:  # transformers 5.x: layers that only read the cache may keep it under checkpointing
    from transformers.modeling_layers import GradientCheckpointingLayer
    CHECKPOINTED_LAYERS_TAKE_A_CACHE = hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")
except ImportError:  # pragma: no cover - older transformers
    GradientCheckpointingLayer, CHECKPOINTED_LAYERS_TAKE_A_CACHE = None, False


def prompt_groups(group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the first row of each distinct prompt, each row's prompt among them)."""
    groups, inverse = torch.unique(group_index, return_inverse=True)
    rows = torch.arange(len(group_index), device=group_index.device)
    first = torch.full((len(groups),), len(group_index), dtype=torch.long, device=group_index.device)
    return first.scatter_reduce(0, inverse, rows, reduce="amin"), inverse


class PromptCache(DynamicCache):
    """Forward 1's cache: each layer's first write is kept; a replayed layer's write (the same
    states, recomputed in the backward) stores nothing and gets back what it passed in."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx < len(self.layers) and self.layers[layer_idx].is_initialized:
            return key_states, value_states
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


class PrefixCache(DynamicCache):
    """Forward 2's cache: each row's prompt keys and values, read only. An update returns them
    with the new states appended (what `DynamicLayer.update` returns) and stores nothing, so a
    replayed layer computes what it computed the first time."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)

    @classmethod
    def rows_of(cls, prompts: PromptCache, config, rows: torch.Tensor) -> "PrefixCache":
        """Row i holds the prompt `rows[i]` of `prompts` (`index_select`: the gradients of every
        row reading a prompt add up in that prompt's keys and values)."""
        prefix = cls(config=config)
        for source, layer in zip(prompts.layers, prefix.layers):
            keys, values = source.keys.index_select(0, rows), source.values.index_select(0, rows)
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        return prefix


def new_prompt_cache(model: torch.nn.Module) -> Optional[PromptCache]:
    """A PromptCache with the model's layers, or None where these caches do not fit: sliding-window
    or other special layers (what a layer keeps is not simply every state), a transformers whose
    DynamicCache takes no config."""
    if "config" not in inspect.signature(DynamicCache.__init__).parameters:
        return None
    cache = PromptCache(config=model.config)
    return cache if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers) else None


def usable_with(model: torch.nn.Module, checkpointing_with_grad: bool) -> bool:
    """Under activation checkpointing with gradients the layers must be allowed to keep the cache
    (transformers 5.x); everywhere else the caches work as they are."""
    return CHECKPOINTED_LAYERS_TAKE_A_CACHE or not checkpointing_with_grad


@contextlib.contextmanager
def caches_through_checkpoints(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, checkpointed layers keep the cache they are given (it must be one of the
    two above: transformers' own would be written twice)."""
    layers = [m for m in model.modules() if GradientCheckpointingLayer is not None and isinstance(m, GradientCheckpointingLayer)]
    if CHECKPOINTED_LAYERS_TAKE_A_CACHE:
        for layer in layers:
            layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        if CHECKPOINTED_LAYERS_TAKE_A_CACHE:
            for layer in layers:
                del layer._can_checkpoint_with_cache  # back to the class's False
