"""AdamW and the learning-rate schedules.

The schedules are torch `LambdaLR`s with the formulas of `transformers.optimization` (the ones
this project used to import; tests/unit/test_optim.py holds them equal step for step), written
here as verl's `utils/torch_functional.py` and torchtitan's `lr_scheduler.py` write theirs: that
module imports `transformers.trainer_utils`, which imports peft and the model code peft
registers, ~0.5 CPU-s of every rank's start for three one-line formulas.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

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


def _constant(step: int, *, warmup: int) -> float:
    return step / max(1, warmup) if step < warmup else 1.0


def _cosine(step: int, *, warmup: int, total: int, num_cycles: float, min_lr_ratio: float) -> float:
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
    return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)


def _wsd(step: int, *, warmup: int, stable: int, decay: int, min_lr_ratio: float) -> float:
    """Linear warmup from the floor, flat, then a cosine half-wave down to the floor (and the floor after)."""
    if step < warmup:
        return max(0.0, step / max(1, warmup) * (1.0 - min_lr_ratio) + min_lr_ratio)
    if step < warmup + stable:
        return 1.0
    if step < warmup + stable + decay:
        progress = (step - warmup - stable) / max(1, decay)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_lr_ratio) + min_lr_ratio)
    return min_lr_ratio


def _constant_schedule(cfg: OptimConfig, warmup: int, total_steps: int):
    return partial(_constant, warmup=warmup)


def _cosine_schedule(cfg: OptimConfig, warmup: int, total_steps: int):
    return partial(_cosine, warmup=warmup, total=total_steps, num_cycles=cfg.num_cycles, min_lr_ratio=cfg.min_lr_ratio)


def _wsd_schedule(cfg: OptimConfig, warmup: int, total_steps: int):
    decay = max(1, int(cfg.wsd_decay_ratio * total_steps))
    return partial(_wsd, warmup=warmup, stable=total_steps - warmup - decay, decay=decay, min_lr_ratio=cfg.min_lr_ratio)


# `optim.lr_scheduler` -> the step -> LR factor it makes; config.schema.LR_SCHEDULERS lists the same
# names for validation before anything is built (tests/unit/test_optim.py holds the two equal).
LR_SCHEDULES = {"constant": _constant_schedule, "cosine": _cosine_schedule, "wsd": _wsd_schedule}


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    """`total_steps` is the whole schedule: all epochs, even when `total_training_steps` stops
    the run earlier (verl's early exit leaves the schedule alone)."""
    factor = LR_SCHEDULES[cfg.lr_scheduler](cfg, cfg.warmup_steps(total_steps), total_steps)
    return LambdaLR(optimizer, factor)
