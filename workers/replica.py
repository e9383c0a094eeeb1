"""Rank 0's unsharded copy of a sharded model, for generation and export.

`refresh` is a collective: every rank takes part in the full-state-dict gather (one tensor at a
time, cast to the copy's dtype), rank 0 loads the tensors into its copy, the others get nothing
and keep no copy. It is `gather` (the collective: outside any `try`) then `load` (rank 0 alone:
may fail and only warn). Where the copy lives (GPU or host) is decided again at each refresh. No
sharded module is used by rank 0 alone.

Memory: a copy on the GPU is counted against what the training step leaves cached (its
activations), which is only right while training is paused: the caller `release()`s the copy
after each sample event, so the next step gets that memory back. A host copy is kept between
events (later refreshes pay only the gather).
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch
import torch.distributed as dist
from transformers import PretrainedConfig

from workers.fsdp import gather_full_state_dict_as
from workers.lora import LoraSpec, add_adapters
from workers.model import DTYPES, build_from_config

log = logging.getLogger(__name__)


def fits_on_device(param_bytes: int, free_bytes: int, reusable_bytes: int, own_bytes: int = 0) -> bool:
    """Room for the copy plus its KV cache and activations (twice its weights)? `free_bytes` is
    what the driver reports (`mem_get_info`), which counts memory our caching allocator holds
    but does not use as taken: `reusable_bytes` (reserved - allocated) is free to us too, and
    so is the copy's own memory (`own_bytes`) when it is already on the device. The cached
    memory is mostly the last training step's activations: the copy may use it only because it
    is released (`ModelReplica.release`) before training resumes."""
    return free_bytes + reusable_bytes + own_bytes > 2 * param_bytes


def pick_replica_device(setting: str, train_device: torch.device, param_bytes: int, own_bytes: int = 0) -> torch.device:
    if setting == "cpu" or train_device.type != "cuda":
        return torch.device("cpu")
    if setting == "cuda":
        return train_device
    free, _ = torch.cuda.mem_get_info(train_device)
    reusable = torch.cuda.memory_reserved(train_device) - torch.cuda.memory_allocated(train_device)
    return train_device if fits_on_device(param_bytes, free, reusable, own_bytes) else torch.device("cpu")


class ModelReplica:
    def __init__(
        self,
        model_config: PretrainedConfig,
        dtype_setting: str,
        device_setting: str,
        train_device: torch.device,
        train_dtype: torch.dtype,
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
        lora: Optional[LoraSpec] = None,
    ):
        self.model_config = model_config
        self.dtype = DTYPES.get(dtype_setting) or train_dtype
        self.device_setting = device_setting
        self.train_device = train_device
        self.attn_implementation = attn_implementation
        self.trust_remote_code = trust_remote_code
        self.lora = lora  # the copy carries the same adapters, so samples come from the adapted model
        self.model: Optional[torch.nn.Module] = None
        self.last_gather_s = 0.0
        self._start = 0.0

    def refresh(self, sharded_model: torch.nn.Module) -> Optional[torch.nn.Module]:
        """Collective. Returns the up-to-date full model on rank 0, None elsewhere."""
        state = self.gather(sharded_model)
        return None if state is None else self.load(state)

    def gather(self, sharded_model: torch.nn.Module) -> Optional[dict[str, torch.Tensor]]:
        """Collective (every rank, outside any `try`). The full tensors on rank 0, None elsewhere."""
        self._start = time.perf_counter()
        state = gather_full_state_dict_as(sharded_model, self.dtype)
        is_primary = not dist.is_initialized() or dist.get_rank() == 0
        return state if is_primary else None

    def load(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        """Rank 0 alone: build the copy if there is none, place it, load `state` into it."""
        start = self._start
        # Where the copy lives is decided again at every refresh: the memory training leaves free
        # changes (the caching allocator grows, other jobs come and go).
        param_bytes = sum(t.numel() * t.element_size() for t in state.values())
        current = next(self.model.parameters()).device if self.model is not None else None
        device = pick_replica_device(self.device_setting, self.train_device, param_bytes,
                                     own_bytes=param_bytes if current is not None and current.type == "cuda" else 0)
        if self.model is None:
            self.model = build_from_config(
                self.model_config,
                dtype=self.dtype,
                device=device,
                trust_remote_code=self.trust_remote_code,
                attn_implementation=self.attn_implementation,
            )
            if self.lora is not None:
                add_adapters(self.model, self.lora, load_weights=False)
            self.model.eval()
            log.debug("built the generation copy on %s in %s", device, self.dtype)
        elif current != device:
            self.model.to(device)
            log.info("generation copy moved from %s to %s (memory on %s changed)", current, device, self.train_device)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        # Tied weights appear under one name only; anything else missing is a real mismatch.
        tied = set(getattr(self.model, "_tied_weights_keys", None) or [])
        real_missing = [k for k in missing if k not in tied and not _is_tied(self.model, k)]
        if real_missing or unexpected:
            raise RuntimeError(f"gathered state does not fit the model: missing {real_missing[:3]}, unexpected {unexpected[:3]}")
        self.last_gather_s = time.perf_counter() - start
        return self.model

    def release(self) -> bool:
        """Rank 0, after each sample event (also after one that failed): a copy on an accelerator
        is dropped and the allocator's cache emptied, so the next training step (and an RL
        rollout's `unsharded` parameters) find the memory the copy used; the next refresh builds
        it again (seconds for a 7B model, next to a gather of the same size). A host copy is
        kept. Returns whether a copy was dropped."""
        if self.model is None:
            return False
        device = next(self.model.parameters()).device
        if device.type == "cpu":
            return False
        self.model = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log.debug("generation copy on %s released", device)
        return True


def _is_tied(model: torch.nn.Module, key: str) -> bool:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return output is not None and key.startswith("lm_head") and getattr(model.config, "tie_word_embeddings", False)
