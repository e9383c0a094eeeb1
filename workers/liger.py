"""liger-kernel's fused Triton kernels (`model.use_liger`): RMSNorm, SwiGLU, RoPE and the fused
linear cross-entropy, which computes the loss from the final hidden states without ever
materialising the [tokens, vocab] logits.

CUDA only (Triton). Checked before the model is built; applied as verl does
(verl/workers/fsdp_workers.py and verl/trainer/fsdp_sft_trainer.py:
`liger_kernel.transformers.monkey_patch._apply_liger_kernel_to_instance(model=...)`) on the
loaded model, before sharding. With it, the loss comes from the model's own fused loss
(`liger_token_loss_sum`), and the LM-head-on-targets hook (`workers.model.lm_head_rows`) is not
used: the fused kernel already runs the LM head only where it needs to, block by block.
"""

from __future__ import annotations

import importlib.util

import torch

from config.schema import ConfigError

KEY = "model.use_liger"


class LigerUnavailable(ConfigError):
    """`model.use_liger=true` where liger-kernel cannot run; one line naming the key."""


def check(enabled: bool, device: torch.device) -> None:
    """Before the model is built."""
    if not enabled:
        return
    if device.type != "cuda":
        raise LigerUnavailable(f"{KEY}=true: liger-kernel's Triton kernels need a CUDA GPU; this run is on "
                               f"{device.type} (drop {KEY}, or run on a GPU)")
    if importlib.util.find_spec("liger_kernel") is None:
        raise LigerUnavailable(f"{KEY}=true: the liger-kernel package is not installed (pip install -e '.[liger]' on a CUDA machine)")


def apply(model: torch.nn.Module) -> None:  # pragma: no cover - CUDA and liger-kernel only
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    # The model's forward then computes the loss with the fused linear cross-entropy when given
    # labels, and returns no logits for it (skip_logits in training).
    _apply_liger_kernel_to_instance(model=model)


def liger_token_loss_sum(model: torch.nn.Module, inputs: dict, targets: torch.Tensor) -> torch.Tensor:  # pragma: no cover
    """Summed cross-entropy over `targets` (already shifted: `shift_labels`) from the model's fused
    loss. liger divides a summed loss by `num_items_in_batch`; 1 keeps the sum, which the trainer
    divides by the global token count like every other loss here."""
    out = model(**inputs, shift_labels=targets, num_items_in_batch=1, use_cache=False)
    return out.loss
