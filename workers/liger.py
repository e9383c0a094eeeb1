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

import importlib.metadata
import importlib.util

import torch

from config.schema import ConfigError

KEY = "model.use_liger"


# The versions whose API this module uses (checked by reading 0.5.10, 0.6.0 and 0.8.5): the
# `skip_logits` argument of the patched forward (0.6.0 on), which runs the fused loss from
# `shift_labels` in train and eval mode alike. Keep in step with pyproject.toml's `liger` extra.
SUPPORTED = ((0, 6, 0), (0, 9, 0))  # [min, max)


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


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
    check_version(importlib.metadata.version("liger-kernel"))


def check_version(installed: str) -> None:
    low, high = SUPPORTED
    if not low <= _version_tuple(installed) < high:
        raise LigerUnavailable(f"{KEY}=true: liger-kernel {installed} is installed; this trainer uses the API of "
                               f"{'.'.join(map(str, low))} up to (not including) {'.'.join(map(str, high))} "
                               "(pip install -e '.[liger]')")


def apply(model: torch.nn.Module) -> None:  # pragma: no cover - CUDA and liger-kernel only
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    # The model's forward then computes the loss with the fused linear cross-entropy when given
    # labels, and returns no logits for it (skip_logits in training).
    _apply_liger_kernel_to_instance(model=model)


def liger_token_loss_sum(model: torch.nn.Module, inputs: dict, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over `targets` (already shifted: `shift_labels`) from the model's fused
    loss. liger divides a summed loss by `num_items_in_batch`; 1 keeps the sum, which the trainer
    divides by the global token count like every other loss here.

    `skip_logits=True` in train and eval alike: left to liger, eval mode (validation) takes its
    materialise-the-logits branch, which in 0.6.x computes a loss only from `labels`, so the
    validation loss came back None; the fused branch computes it from `shift_labels` and never
    builds the [tokens, vocab] logits."""
    out = model(**inputs, shift_labels=targets, num_items_in_batch=1, use_cache=False, skip_logits=True)
    if out.loss is None:
        raise RuntimeError(f"liger-kernel's forward returned no loss ({'train' if model.training else 'eval'} mode; "
                           f"supported liger-kernel: >={'.'.join(map(str, SUPPORTED[0]))},<{'.'.join(map(str, SUPPORTED[1]))})")
    return out.loss
