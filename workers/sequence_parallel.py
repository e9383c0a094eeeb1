"""Ulysses sequence parallelism: each sequence split over `N` ranks, attention over all of it.

As DeepSpeed-Ulysses and verl (verl/utils/ulysses.py, verl/models/transformers/monkey_patch.py):
the ranks of one sequence-parallel group hold the same micro-batch and each runs the model on
its `1/N` of every sequence. Around attention, one all-to-all turns "all heads, my part of the
sequence" into "my `1/N` of the heads, the whole sequence", attention runs as usual, and a
second all-to-all turns it back. Everything else (embeddings, MLPs, norms, the LM head and the
loss) is per token, so it runs on the local part unchanged.

The hook is transformers' attention-function registry (`AttentionInterface`): the model's
attention implementation is replaced by `ulysses_<inner>`, which wraps `<inner>` (sdpa, or
flash_attention_2 on CUDA) with the two all-to-alls. FSDP still shards over every rank; the
device mesh (dp = world/N, sp = N) only says which ranks share a micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from config.schema import ConfigError

# Attention implementations that can be wrapped: transformers' registered functions. `eager`
# lives in each model's own file, so there is nothing global to wrap.
WRAPPABLE = ("sdpa", "flash_attention_2", "flash_attention_3")
KEY = "model.ulysses_sequence_parallel_size"


class SequenceParallelError(ConfigError):
    """A sequence-parallel setting that cannot work; one line naming the key."""


def check_size(size: int, world_size: int) -> None:
    """Before anything is built: the size must split the ranks into whole groups."""
    if size < 1 or world_size % size:
        raise SequenceParallelError(
            f"{KEY}={size}: must divide the number of processes ({world_size}); data-parallel size is world / {KEY}"
        )


def check_model(size: int, model_config, attn_implementation: str) -> None:
    """Before the model is built: every rank needs whole attention heads, query and key/value."""
    if size == 1:
        return
    if attn_implementation not in WRAPPABLE:
        raise SequenceParallelError(
            f"{KEY}={size}: needs model.attn_implementation sdpa or flash_attention_2, got {attn_implementation}"
        )
    heads = getattr(model_config, "num_attention_heads", None)
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    if heads is None:
        raise SequenceParallelError(f"{KEY}={size}: the model config has no num_attention_heads")
    for name, count in (("attention heads", heads), ("key/value heads", kv_heads)):
        if count % size:
            raise SequenceParallelError(f"{KEY}={size}: must divide the model's {name} ({count})")


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place: which micro-batches it gets (dp) and which part of each sequence (sp)."""

    size: int
    rank: int  # within the sequence-parallel group
    dp_rank: int
    dp_size: int
    group: Optional[dist.ProcessGroup] = None  # None when size == 1

    @property
    def counts_tokens(self) -> bool:
        """One rank per group counts a micro-batch's tokens (all of them hold the same one)."""
        return self.rank == 0


def setup(size: int, device: torch.device) -> SequenceParallel:
    """Collective. The (dp, sp) device mesh: rank = dp_rank × size + sp_rank, so a group is
    consecutive ranks (one node's, where the all-to-all is fastest, when size <= GPUs per node)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    check_size(size, world)
    if size == 1:
        return SequenceParallel(1, 0, rank, world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // size, size), mesh_dim_names=("dp", "sp"))
    return SequenceParallel(size, mesh["sp"].get_local_rank(), mesh["dp"].get_local_rank(), world // size, mesh["sp"].get_group())


# ----------------------------------------------------------------------------- all-to-all
def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    n = dist.get_world_size(group)
    send = torch.stack(x.chunk(n, dim=scatter_dim))  # [n, ...]: part i goes to rank i of the group
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


class AllToAll(torch.autograd.Function):
    """Scatter `scatter_dim` over the group, gather `gather_dim`; the backward is the reverse."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def ulysses_attention(inner_name: str, group: dist.ProcessGroup) -> Callable:
    """transformers' attention function `inner_name` (q/k/v [B, heads, L/N, D] in, [B, L, heads, D]
    out) run on the whole sequence with 1/N of the heads."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    inner = ALL_ATTENTION_FUNCTIONS[inner_name]

    def attention(module, query, key, value, attention_mask, **kwargs):
        # [B, H, L/N, D] -> [B, H/N, L, D]
        query, key, value = (AllToAll.apply(t, group, 1, 2) for t in (query, key, value))
        # flash-attention's wrapper picks its kernel by the config's implementation name
        config = module.config
        ours, config._attn_implementation = config._attn_implementation, inner_name
        try:
            out, weights = inner(module, query, key, value, attention_mask, **kwargs)
        finally:
            config._attn_implementation = ours
        # [B, L, H/N, D] -> [B, L/N, H, D]
        return AllToAll.apply(out, group, 1, 2), weights

    return attention


def enable(model: torch.nn.Module, sp: SequenceParallel) -> None:
    """Route the model's attention through the all-to-alls (a no-op when size == 1)."""
    if sp.size == 1:
        return
    from transformers import AttentionInterface

    inner_name = model.config._attn_implementation
    name = f"ulysses_{inner_name}"
    AttentionInterface.register(name, ulysses_attention(inner_name, sp.group))
    # Set on every config the attention modules read (the root's, shared by its layers).
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) == inner_name:
            config._attn_implementation = name

