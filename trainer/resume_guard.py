"""A guard against silently resuming a different run.

Resume is automatic (`trainer.resume_mode=auto`): a run whose `trainer.default_local_dir` already
holds a checkpoint continues it. When that checkpoint came from another run (another model, other
data, another LoRA rank or algorithm), continuing it would train the wrong thing without a word.
A checkpoint named in `trainer.resume_from_path` is a choice, not a surprise, and is not guarded.
Each checkpoint's `trainer_state.json` carries the run's essential keys (`ESSENTIAL_KEY`, written
by `Run.save`); before anything is loaded, rank 0 compares them with this run's and every rank
stops with one line naming the first key that changed, and how to start fresh or force the resume.
Checkpoints written before the keys were saved are compared with the run directory's config.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from config.schema import ConfigError
from trainer.checkpoint import STATE_FILE, is_checkpoint, latest_checkpoint
from trainer.faults import decided_by_primary

log = logging.getLogger(__name__)

ESSENTIAL_KEY = "essential_config"  # where trainer_state.json holds them
# What makes a run a different run. Keys a trainer does not have are left out (None).
ESSENTIAL = (
    "model.partial_pretrain",
    "model.lora_rank",
    "model.lora_adapter_path",
    "data.train_files",
    "data.multiturn.enable",
    "algorithm.adv_estimator",
    "algorithm.policy_loss",
)
FRESH = "start fresh with trainer.resume_mode=disable or a new trainer.default_local_dir"
FORCE = "or resume it anyway with trainer.resume_force=true"


def _select(cfg: Any, dotted: str) -> Any:
    value = cfg
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
        if value is None:
            return None
    return value


def _normal(value: Any) -> Any:
    """Paths as absolute paths (a relative path from another working directory is the same file),
    a single file as a one-element list; other values as they are."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, str) and value and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def essential_config(cfg: Any) -> dict[str, Any]:
    """The run's essential keys (a config dataclass or its dict), normalised for comparison."""
    found = {key: _select(cfg, key) for key in ESSENTIAL}
    values = {key: _normal(v) for key, v in found.items() if v is not None}
    if isinstance(values.get("data.train_files"), str):
        values["data.train_files"] = [values["data.train_files"]]
    return values


def saved_essential_config(checkpoint: Path, run_dir: Path) -> Optional[dict[str, Any]]:
    """The keys saved with `checkpoint`; for older checkpoints, those of the run directory's
    config.json (the config of the run that last used the directory); None when neither says."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        state = {}
    if ESSENTIAL_KEY in state:
        return state[ESSENTIAL_KEY]
    try:
        return essential_config(json.loads((run_dir / "config.json").read_text()))
    except (OSError, json.JSONDecodeError):
        return None


def changed_key(saved: dict[str, Any], current: dict[str, Any]) -> Optional[tuple[str, Any, Any]]:
    """The first essential key whose value differs (a key only one side has is not compared:
    an SFT checkpoint has no `algorithm.*`, an older one may lack a key)."""
    for key in ESSENTIAL:
        if key in saved and key in current and _normal(saved[key]) != current[key]:
            return key, saved[key], current[key]
    return None


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def mismatch(resume_mode: str, resume_from_path: Optional[str], run_dir: Path, current: dict[str, Any]) -> Optional[str]:
    """The one-line reason not to resume, or None. Only the automatic resume is guarded (`auto`
    without `resume_from_path`: the run directory's latest checkpoint); a checkpoint named in
    `resume_from_path` is the user's choice, e.g. to continue an SFT run on other data."""
    if resume_mode != "auto" or resume_from_path:
        return None
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None or not is_checkpoint(checkpoint):
        return None  # nothing to resume, or a bad resume_from_path: the resume itself says so
    saved = saved_essential_config(checkpoint, run_dir)
    change = changed_key(saved or {}, current)
    if change is None:
        return None
    key, before, now = change
    return (f"{key} changed since the checkpoint {checkpoint} ({_short(before)} -> {_short(now)}): resuming would "
            f"continue a different run; {FRESH}, {FORCE}")


def check(resume_mode: str, resume_from_path: Optional[str], resume_force: bool, run_dir: Path, current: dict[str, Any]) -> None:
    """Collective. Raises the same one-line ConfigError on every rank when the checkpoint to
    resume belongs to a different run; with `resume_force`, rank 0 warns instead."""
    reason = decided_by_primary(lambda: mismatch(resume_mode, resume_from_path, run_dir, current))
    if reason is None:
        return
    if not resume_force:
        raise ConfigError(reason)
    log.warning("trainer.resume_force=true: resuming although %s", reason.split(": resuming would")[0])
