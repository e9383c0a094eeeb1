"""The learning-rate schedules: transformers' formulas, step for step, without importing peft."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_wsd_schedule,
)

from config.schema import LR_SCHEDULERS, OptimConfig
from helpers import ROOT, child_env
from trainer.optim import LR_SCHEDULES, build_scheduler


def transformers_schedule(optimizer, cfg: OptimConfig, total: int):
    """What trainer/optim.py built before it wrote the formulas itself."""
    warmup = cfg.warmup_steps(total)
    if cfg.lr_scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    if cfg.lr_scheduler == "wsd":
        decay = max(1, int(cfg.wsd_decay_ratio * total))
        return get_wsd_schedule(optimizer, warmup, decay, num_training_steps=total, min_lr_ratio=cfg.min_lr_ratio)
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, num_cycles=cfg.num_cycles,
                                                       min_lr_rate=cfg.min_lr_ratio)


def lrs(make, cfg: OptimConfig, total: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = make(optimizer, cfg, total)
    out = []
    for _ in range(total + 3):  # and past the end, where a resumed run with more epochs lands
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("scheduler", ["cosine", "constant", "wsd"])
@pytest.mark.parametrize("warmup,min_lr_ratio,num_cycles,total", [
    (0.0, 0.0, 0.5, 40), (0.1, 0.1, 0.5, 40), (0.25, 0.0, 1.5, 37), (0.0, 0.3, 0.5, 7), (0.5, 1.0, 0.5, 3),
])
def test_schedules_equal_transformers_step_for_step(scheduler, warmup, min_lr_ratio, num_cycles, total):
    cfg = OptimConfig(lr=1e-3, lr_scheduler=scheduler, lr_warmup_steps_ratio=warmup, min_lr_ratio=min_lr_ratio,
                      num_cycles=num_cycles, wsd_decay_ratio=0.2)
    ours, theirs = lrs(build_scheduler, cfg, total), lrs(transformers_schedule, cfg, total)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-18)
    flat = (scheduler == "constant" and warmup == 0) or min_lr_ratio == 1.0
    assert len(set(ours)) > 1 or flat  # each case moves the rate: the equality above compares something


def test_a_state_saved_by_the_transformers_schedule_resumes_on_ours():
    cfg = OptimConfig(lr=1e-3, lr_scheduler="cosine", lr_warmup_steps_ratio=0.1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    old = transformers_schedule(optimizer, cfg, 50)
    for _ in range(17):
        optimizer.step()
        old.step()
    state, lr_at_17 = old.state_dict(), optimizer.param_groups[0]["lr"]
    fresh = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    new = build_scheduler(fresh, cfg, 50)
    new.load_state_dict(state)
    fresh.step()
    new.step()
    old.step()
    assert new.last_epoch == 18 and new.get_last_lr() == pytest.approx(old.get_last_lr()) != [lr_at_17]


def test_the_trainers_import_neither_peft_nor_transformers_optimization():
    # a LoRA run imports peft when it wraps the model; every other run should not pay for it
    code = ("import sys, trainer.fsdp_sft_trainer, trainer.rl_trainer; "
            "print(sorted(m for m in ('peft', 'transformers.optimization', 'transformers.trainer_utils') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_scheduler_the_config_accepts_has_a_builder():
    # config validates the name before any model is built; it cannot import trainer (imports run
    # config -> workers -> trainer), so the two lists are held equal here.
    assert sorted(LR_SCHEDULES) == sorted(LR_SCHEDULERS)
