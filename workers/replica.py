"""Rank 0's unsharded copy of a sharded model, for generation and export.

`refresh` is a collective: every rank takes part in the full-state-dict gather, rank 0 loads the
tensors into its copy, the others get nothing and keep no copy. The copy is built once and kept,
so later validations pay only the gather. No sharded module is used by rank 0 alone.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch
import torch.distributed as dist
from transformers import PretrainedConfig

from workers.fsdp import gather_full_state_dict
from workers.lora import LoraSpec, add_adapters
from workers.model import DTYPES, build_from_config

log = logging.getLogger(__name__)


def pick_replica_device(setting: str, train_device: torch.device, param_bytes: int) -> torch.device:
    if setting == "cpu" or train_device.type != "cuda":
        return torch.device("cpu")
    if setting == "cuda":
        return train_device
    free, _ = torch.cuda.mem_get_info(train_device)
    # Room for the copy plus its KV cache and activations; otherwise keep it on the host.
    return train_device if free > 2 * param_bytes else torch.device("cpu")


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

    def refresh(self, sharded_model: torch.nn.Module) -> Optional[torch.nn.Module]:
        """Collective. Returns the up-to-date full model on rank 0, None elsewhere."""
        start = time.perf_counter()
        state = gather_full_state_dict(sharded_model)
        is_primary = not dist.is_initialized() or dist.get_rank() == 0
        if not is_primary:
            return None
        if self.model is None:
            param_bytes = sum(t.numel() for t in state.values()) * torch.tensor([], dtype=self.dtype).element_size()
            device = pick_replica_device(self.device_setting, self.train_device, param_bytes)
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
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        # Tied weights appear under one name only; anything else missing is a real mismatch.
        tied = set(getattr(self.model, "_tied_weights_keys", None) or [])
        real_missing = [k for k in missing if k not in tied and not _is_tied(self.model, k)]
        if real_missing or unexpected:
            raise RuntimeError(f"gathered state does not fit the model: missing {real_missing[:3]}, unexpected {unexpected[:3]}")
        self.last_gather_s = time.perf_counter() - start
        return self.model


def _is_tied(model: torch.nn.Module, key: str) -> bool:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return output is not None and key.startswith("lm_head") and getattr(model.config, "tie_word_embeddings", False)
