"""The one place a model becomes FSDP2, and the full-model gather used by generation and export.

`shard_model` shards every decoder layer, then the root (torchtitan's pattern). `gather_full_state_dict`
is a collective: every rank must call it; rank 0 receives the full tensors on CPU, others `{}`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from config.schema import FSDPConfig
from workers.lora import LoraSpec, add_adapters
from workers.model import DTYPES, build_from_config, decoder_layers, load_pretrained

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardingSpec:
    param_dtype: torch.dtype = torch.float32
    reduce_dtype: torch.dtype = torch.float32
    cpu_offload: bool = False
    reshard_after_forward: bool = True
    fsdp_size: int = -1  # ranks one model is sharded over; -1: all (see device_mesh)
    master_dtype: torch.dtype = torch.float32  # the sharded weights the optimizer steps (model.fsdp_config.model_dtype)


def sharding_spec(cfg: FSDPConfig, device: torch.device) -> ShardingSpec:
    """`model.fsdp_config` as FSDP2 takes it (the actor's and the SFT model's). `auto` compute is
    bf16 on CUDA and fp32 on CPU (CPU bf16 matmuls are slow and lossy); `auto` reduction is fp32."""
    param = DTYPES.get(cfg.param_dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    reduce = DTYPES.get(cfg.reduce_dtype) or torch.float32
    return ShardingSpec(param, reduce, cfg.cpu_offload, cfg.reshard_after_forward, cfg.fsdp_size, DTYPES[cfg.model_dtype])


def shard_model(model: torch.nn.Module, mesh: DeviceMesh, spec: ShardingSpec) -> torch.nn.Module:
    mp = MixedPrecisionPolicy(param_dtype=spec.param_dtype, reduce_dtype=spec.reduce_dtype)
    # Pinned host memory speeds copies to a GPU and needs one: without, pinning raises.
    offload = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if spec.cpu_offload else OffloadPolicy()
    layers = decoder_layers(model)
    if not layers:
        log.warning("no decoder layers found on %s: sharding the whole model as one unit", type(model).__name__)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=spec.reshard_after_forward)
    # The root (embeddings, final norm, LM head) is used right after the last layer: keep it gathered.
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=False)
    return model


def build_sharded_model(
    path: str,
    model_config,
    spec: ShardingSpec,
    device: torch.device,
    world_size: int,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
    auto_class=None,
    lora: Optional[LoraSpec] = None,
    before_sharding: Optional[Callable[[torch.nn.Module], None]] = None,
    **model_kwargs,
) -> torch.nn.Module:
    """Collective. Load a pretrained model on rank 0 only, shard it over all ranks, fill every
    shard from rank 0. Master weights are `spec.master_dtype` (fp32 unless model_dtype=bf16, as
    verl's FSDP workers load the model in `fsdp_config.model_dtype`); `spec` sets the compute
    dtype. With `lora`, every rank injects the same adapters before sharding; the frozen base is
    stored in the compute dtype, the adapters (the only trainable weights) in fp32, whatever the
    master dtype. `before_sharding` patches the model (real on rank 0, meta elsewhere) first
    (liger-kernel)."""
    rank0 = dist.get_rank() == 0
    dtype = torch.float32 if lora is not None else spec.master_dtype
    if rank0:
        model = load_pretrained(path, dtype, trust_remote_code, attn_implementation, auto_class, **model_kwargs)
    else:
        model = build_from_config(model_config, dtype, "meta", trust_remote_code, attn_implementation, auto_class, **model_kwargs)
    # from_pretrained keeps a model's `_keep_in_fp32_modules_strict` (MoE routers of DeepSeek-V3.2,
    # AFMoE, ...) in fp32 under bf16 on rank 0; the meta build elsewhere does not. The ranks'
    # parameters must agree before sharding (or the gathers mismatch): all in the master dtype.
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    if lora is not None:
        add_adapters(model, lora, frozen_dtype=spec.param_dtype, load_weights=rank0)
    full_state = model.state_dict() if rank0 else {}
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    if before_sharding is not None:
        before_sharding(model)
    shard_model(model, device_mesh(device, world_size, spec.fsdp_size), spec)
    load_full_state_dict(model, full_state, device, spec.cpu_offload)
    return model


class unsharded:
    """Context: every rank holds the full parameters, and forwards issue no collectives.

    Rollouts use it so that each rank generates for its own prompts at its own pace (lengths
    may differ, no `synced_gpus` needed) without one all-gather per token. Memory: one full
    copy of the parameters (compute dtype) per rank for the duration; freed on exit.
    """

    def __init__(self, model: torch.nn.Module, spec: ShardingSpec):
        self.modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        self.root = model
        self.spec = spec

    def __enter__(self):
        for m in self.modules:
            m.set_reshard_after_forward(False)
        for m in self.modules:
            m.unshard()
        return self.root

    def __exit__(self, *exc):
        for m in self.modules:
            m.reshard()
            m.set_reshard_after_forward(False if m is self.root else self.spec.reshard_after_forward)
        return False


def gather_full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective. Full (unsharded) tensors on CPU on rank 0; `{}` elsewhere."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def iter_full_tensors(model: torch.nn.Module, dtype: Optional[torch.dtype],
                      names: Optional[list[str]] = None) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    """Collective (every rank iterates to the end). Yields each tensor of the model's state dict
    (or of `names`, in that order) whole on rank 0, on CPU, None elsewhere; one at a time.

    Each rank casts its local shard to `dtype` (floating point only; None: keep) before the
    all-gather, so the gather moves and materialises the compute dtype, not the fp32 masters: half
    the traffic and half the full tensor on every GPU for bf16. torchtitan casts before it
    gathers too (torchtitan/components/checkpoint.py, `_export_weights` with `export_dtype`); verl
    syncs rollout weights per parameter with `full_tensor()` (verl/workers/sharding_manager/fsdp_vllm.py)."""
    is_primary = dist.get_rank() == 0
    local = get_model_state_dict(model)  # the local shards: nothing gathered yet
    for name in names if names is not None else list(local):
        tensor = local[name]
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)  # on a DTensor: a local cast, the sharding is kept
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        yield name, (full.to("cpu") if is_primary else None)
        del full, tensor


def gather_full_state_dict_as(model: torch.nn.Module, dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """Collective. Like `gather_full_state_dict`, but one tensor at a time, each cast to `dtype`
    (None: its own) before it is gathered (`iter_full_tensors`). Rank 0's host then never holds
    the fp32 master weights in full when the copy is bf16 (for a 7B model 15 GB instead of 30 GB
    per validation)."""
    return {name: full for name, full in iter_full_tensors(model, dtype) if full is not None}


def saved_tensor_names(model: torch.nn.Module) -> list[str]:
    """The state dict names `save_pretrained` writes: a tied weight (an LM head sharing the
    embedding) once, under its first name; buffers only if persistent."""
    local = get_model_state_dict(model)
    params = [name for name, _ in model.named_parameters()]  # deduplicated: tied parameters once
    buffers = [name for name, _ in model.named_buffers()]
    return [name for name in local if name in params or name in buffers]


def placement(device: torch.device, cpu_offload: bool) -> tuple[torch.device, torch.device]:
    """(parameters, buffers): where a sharded model's tensors live once loaded.

    With FSDP2's `CPUOffloadPolicy` the sharded parameters (and so the optimizer state) must be
    on CPU ("FSDP parameters should be materialized on CPU when enabling CPU offloading"): FSDP
    copies each layer's shard to the GPU for its forward and backward. Buffers (rotary tables)
    are not managed by FSDP and are used by the GPU compute: they go to the device. torchtitan
    does the same (torchtitan/train.py: `init_device = "cpu"`, `buffer_device = device_type`
    when `training.enable_cpu_offload`)."""
    return (torch.device("cpu") if cpu_offload else device), device


def _place(model: torch.nn.Module, param_device: torch.device, buffer_device: torch.device, empty: bool) -> None:
    """Move (or, `empty`, materialise uninitialised: meta tensors) parameters and buffers apart."""
    if empty:
        model.to_empty(device=param_device)
    else:
        model.to(param_device)
    if buffer_device == param_device:
        return
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None:
                module._buffers[name] = buffer.to(buffer_device)  # rank 0's values; broadcast to the others below


def load_full_state_dict(model: torch.nn.Module, full_state: dict[str, torch.Tensor], device: torch.device,
                         cpu_offload: bool = False) -> None:
    """Collective. Fill a sharded model (real on rank 0, meta elsewhere) from rank 0's full state.

    Only rank 0 reads the checkpoint from disk, so host memory stays at one full copy per node
    instead of one per rank. Buffers that are not in the state dict (rotary tables) are broadcast.
    With `cpu_offload` the parameters stay on CPU and only the buffers go to `device` (`placement`).
    """
    rank = dist.get_rank()
    param_device, buffer_device = placement(device, cpu_offload)
    _place(model, param_device, buffer_device, empty=rank != 0)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_state, options=options)
    for buffer in model.buffers():
        dist.broadcast(buffer.data if not hasattr(buffer, "full_tensor") else buffer, src=0)


def compile_layers(model: torch.nn.Module) -> None:
    for layer in decoder_layers(model):
        layer.compile()


def full_grad_norm(total_norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_ returns a DTensor for sharded parameters: the same global value on every rank."""
    return total_norm.full_tensor() if hasattr(total_norm, "full_tensor") else total_norm


def param_count(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() if not hasattr(p, "full_tensor") else p.shape.numel()
    return total


_MESHES: dict[tuple[str, int, int], tuple[object, DeviceMesh]] = {}


def device_mesh(device: torch.device, world_size: int, fsdp_size: int = -1) -> DeviceMesh:
    """1-D (all ranks shard the model: FSDP), or 2-D for HSDP when `fsdp_size` (verl's key) is
    smaller than the world: shard within groups of `fsdp_size` consecutive ranks (one node's
    GPUs), replicate across groups, so the per-layer all-gathers stay inside a node and only the
    gradient all-reduce crosses nodes. `fully_shard` on a 2-D mesh is HSDP (torchtitan's
    `dp_replicate` × `dp_shard`).

    Built once per process group and shape, and shared by every model of the run (actor,
    reference, critic): each `init_device_mesh` of a 2-D mesh creates new process groups (new
    nccl communicators, their memory and set-up time). torchtitan builds its mesh once too
    (`ParallelDims.build_mesh`) and hands it to every model part."""
    from torch.distributed.device_mesh import init_device_mesh

    key = (device.type, world_size, fsdp_size if fsdp_size not in (-1, world_size) else -1)
    group = dist.distributed_c10d._get_default_group()
    cached = _MESHES.get(key)
    if cached is not None and cached[0] is group:  # the same process group (tests make new ones)
        return cached[1]
    if key[2] == -1:
        mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))
    else:
        if dist.get_rank() == 0:
            log.info("HSDP: %d replica groups × %d shards (model.fsdp_config.fsdp_size=%d)", world_size // fsdp_size, fsdp_size, fsdp_size)
        mesh = init_device_mesh(device.type, (world_size // fsdp_size, fsdp_size), mesh_dim_names=("replicate", "shard"))
    _MESHES[key] = (group, mesh)
    return mesh


def optional_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    return DTYPES.get(name) if name else None
