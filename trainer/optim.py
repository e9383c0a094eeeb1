"""AdamW and the learning-rate schedules (transformers' implementations)."""

from __future__ import annotations

import torch
from transformers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_wsd_schedule,
)

from config.schema import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    # No decay on norms and biases (1-D parameters), as is usual for transformers.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    kwargs.update(cfg.override_optimizer_config or {})  # verl's key: e.g. eps
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """`total_steps` is the whole schedule: all epochs, even when `total_training_steps` stops
    the run earlier (verl's early exit leaves the schedule alone)."""
    warmup = cfg.warmup_steps(total_steps)
    if cfg.lr_scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    if cfg.lr_scheduler == "wsd":
        decay = max(1, int(cfg.wsd_decay_ratio * total_steps))
        return get_wsd_schedule(optimizer, warmup, decay, num_training_steps=total_steps, min_lr_ratio=cfg.min_lr_ratio)
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, warmup, total_steps, num_cycles=cfg.num_cycles, min_lr_rate=cfg.min_lr_ratio
    )
