"""Process group set-up for one process or torchrun: nccl on CUDA, gloo on CPU."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import MutableMapping

import torch
import torch.distributed as dist

from config.env import DistEnv


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def pick_device(setting: str, local_rank: int) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but CUDA is not available (use trainer.device=cpu or auto)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# nccl's watchdog thread: a collective stuck past the process group's timeout (a peer dead or
# hung) aborts the communicator and ends this rank instead of blocking forever, and the flight
# recorder dumps the last collectives of every rank to see which one did not arrive. The values
# torchtitan sets (torchtitan/distributed/utils.py, init_distributed); a user's own wins.
NCCL_WATCHDOG_ENV = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",  # abort the communicator, skip its clean-up, raise
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "20000",  # flight recorder: the last 20,000 collectives
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",  # ... written out when the watchdog fires
}


def set_nccl_watchdog_env(environ: MutableMapping[str, str]) -> dict[str, str]:
    """Set the watchdog's variables the user has not set; returns what was set."""
    added = {k: v for k, v in NCCL_WATCHDOG_ENV.items() if k not in environ}
    environ.update(added)
    return added


def init_distributed(env: DistEnv, device_setting: str, timeout_seconds: int = 1800) -> DistContext:
    """Always runs a process group (world size 1 without torchrun), so one code path serves all.

    Without torchrun a single-process group is made on a free local port.
    """
    device = pick_device(device_setting, env.local_rank)
    if not dist.is_initialized():
        # On GPUs, CPU tensors get gloo: offloaded gradients (clip_grad_norm_, the full-model
        # gather with cpu_offload; pytorch#148532) and the per-step SIGTERM flag. torchtitan's
        # `cpu:gloo,cuda:nccl` (torchtitan/distributed/utils.py, init_distributed).
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            set_nccl_watchdog_env(os.environ)  # read by nccl's process group when it is created
        timeout = datetime.timedelta(seconds=timeout_seconds)
        if env.launched:
            dist.init_process_group(backend=backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
        else:
            store = dist.HashStore()
            dist.init_process_group(backend=backend, store=store, rank=0, world_size=1, timeout=timeout)
    return DistContext(dist.get_rank(), dist.get_world_size(), env.local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        # Without a barrier first, gloo runs often abort at exit while a peer is still sending.
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src: int = 0):
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
