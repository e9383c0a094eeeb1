"""What a run does about what it sees: the action of a sample alert (`warn`, `stop`, `rollback`)
and the watches on logged metrics (`trainer.keep_best`, `trainer.early_stopping`, `trainer.stop_at`).

Decisions are pure functions of rank 0's view (its alerts, its metrics, the run directory) made
here; `trainer.run.Run` broadcasts them so every rank acts at the same step, and carries them out
(checkpoint, restore, exit). What must survive a relaunch lives in `Control`, which every
checkpoint's trainer state holds under "control": a resumed run keeps its rollback count, its
lowered learning rate, its data offset and its best checkpoint.

Exit codes: a run stopped by an alert ends every rank's process with `ALERT_STOP_EXIT_CODE` (3),
apart from 0 (finished, also after early stopping or `stop_at`), 1 (a crash), 2 (bad input) and
143 (SIGTERM, checkpoint written).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from config.schema import AlertConfig, ConfigError, TrainerConfig

ALERT_STOP_EXIT_CODE = 3  # "stopped by a sample alert": not a finish (0), a crash (1), bad input (2), SIGTERM (143)
# The severest action of an event's alerts wins.
SEVERITY = {"warn": 0, "stop": 1, "rollback": 2}


class AlertStopped(Exception):
    """The run stopped on a sample alert after writing a checkpoint."""

    def __init__(self, reason: str, checkpoint: Optional[Path]):
        super().__init__(f"{reason}; checkpoint {checkpoint}; exit code {ALERT_STOP_EXIT_CODE}")
        self.reason, self.checkpoint = reason, checkpoint


@dataclass
class Control:
    """The run's own decisions so far, saved in every checkpoint (trainer state "control")."""

    rollbacks: int = 0
    lr_scale: float = 1.0  # product of the rollbacks' lr_factor
    data_seed_offset: int = 0  # added to the data seed: a rollback without skip_data reshuffles
    skipped_windows: list = field(default_factory=list)  # [first, last] training steps whose data was skipped
    streak_start: dict = field(default_factory=dict)  # per event prefix: step of the first alert in a row
    best_step: Optional[int] = None  # keep_best
    best_value: Optional[float] = None
    watch_best: Optional[float] = None  # early_stopping
    watch_stale: int = 0  # validations in a row without an improvement

    @classmethod
    def from_state(cls, state: Optional[dict]) -> "Control":
        known = set(asdict(cls()))
        return cls(**{k: v for k, v in (state or {}).items() if k in known})


@dataclass
class Decision:
    """What every rank does after a sample event (broadcast from rank 0)."""

    action: str = "warn"
    rule: str = ""
    prompt: Optional[str] = None
    message: str = ""
    step: int = 0
    first_alert_step: int = 0
    target: Optional[str] = None  # rollback: the checkpoint to restore
    prefix: str = ""  # the event's key prefix (val, samples)
    control: Optional[dict] = None  # rank 0's Control after the event (streaks), for every rank

    def reason(self) -> str:
        where = f"prompt {self.prompt!r}" if self.prompt else "all prompts"
        return f"sample alert [{self.rule}] at step {self.step} ({where}): {self.message}"


def decide(alerts: Sequence[tuple[str, Optional[str], str]], prefix: str, step: int, cfg: AlertConfig, control: Control,
           checkpoints: Sequence[tuple[int, Path]]) -> Decision:
    """Rank 0: the action for one event's alerts, each (rule, prompt, message). `checkpoints`:
    (step, path) of the complete checkpoints. Updates `control.streak_start`."""
    if not alerts:
        control.streak_start.pop(prefix, None)
        return Decision(step=step, prefix=prefix, control=asdict(control))
    first = control.streak_start.setdefault(prefix, step)
    rule, prompt, message = max(alerts, key=lambda a: SEVERITY[cfg.action_for(a[0])])
    decision = Decision(cfg.action_for(rule), rule, prompt, message, step, first, prefix=prefix)
    if decision.action == "rollback":
        before = [path for s, path in checkpoints if s < first]
        if control.rollbacks >= cfg.rollback.max_rollbacks:
            decision.action = "stop"
            decision.message += f" (samples.alerts.rollback.max_rollbacks={cfg.rollback.max_rollbacks} reached)"
        elif not before:
            decision.action = "stop"
            decision.message += f" (no checkpoint before step {first} to roll back to)"
        else:
            decision.target = str(before[-1])
    decision.control = asdict(control)
    return decision


def rollback_warning(alerts: AlertConfig, trainer: TrainerConfig) -> Optional[str]:
    """One line for start-up when a rollback could never find a checkpoint."""
    key = alerts.uses("rollback")
    if key is None or trainer.save_freq > 0:
        return None
    return (f"{key}=rollback with trainer.save_freq={trainer.save_freq}: no checkpoint is written before an alert, "
            f"so such an alert stops the run instead; set trainer.save_freq > 0 to roll back")


# ---------------------------------------------------------------------- metric watches
@dataclass
class Outcome:
    """What the watches decided at one validation (broadcast from rank 0)."""

    new_best: bool = False
    stop: Optional[str] = None  # the one line saying why the run ends here
    stop_by: Optional[str] = None  # which watch ended it: "early_stopping" or "stop_at"
    error: Optional[str] = None  # an unknown metric: ConfigError on every rank
    control: Optional[dict] = None


def _better(value: float, than: Optional[float], mode: str, delta: float = 0.0) -> bool:
    return than is None or (value > than + delta if mode == "max" else value < than - delta)


class Watches:
    """keep_best, early_stopping and stop_at over the metrics of each validation (rank 0)."""

    def __init__(self, cfg: TrainerConfig):
        self.cfg = cfg
        self.keys = {name: w.metric for name, w in (("keep_best", cfg.keep_best), ("early_stopping", cfg.early_stopping),
                                                    ("stop_at", cfg.stop_at)) if w.metric}
        self.seen: set[str] = set()

    @property
    def active(self) -> bool:
        return bool(self.keys)

    def observe(self, step: int, metrics: dict[str, float], control: Control) -> Outcome:
        """Updates `control`. A watched key never logged yet, missing from a validation that
        logged other keys of its kind (`val/...`), is a configuration error."""
        out = Outcome()
        for name, key in self.keys.items():
            kind = key.split("/")[0] + "/"
            if key not in metrics:
                if key not in self.seen and any(k.startswith(kind) for k in metrics):
                    out.error = (f"trainer.{name}.metric={key!r} is not logged at validation (step {step}); logged keys: "
                                 f"{', '.join(sorted(k for k in metrics if not k.startswith('timing/')))}")
                    return out
                continue
            self.seen.add(key)
        values = {name: float(metrics[key]) for name, key in self.keys.items() if key in metrics}
        values = {name: v for name, v in values.items() if math.isfinite(v)}
        c = self.cfg
        if "keep_best" in values and _better(values["keep_best"], control.best_value, c.keep_best.mode):
            control.best_step, control.best_value, out.new_best = step, values["keep_best"], True
        if "early_stopping" in values:
            e = c.early_stopping
            if _better(values["early_stopping"], control.watch_best, e.mode, e.min_delta):
                control.watch_best, control.watch_stale = values["early_stopping"], 0
            else:
                control.watch_stale += 1
                if control.watch_stale >= e.patience:
                    out.stop_by = "early_stopping"
                    out.stop = (f"early stopping at step {step}: {e.metric} has not improved by more than {e.min_delta} "
                                f"for {e.patience} validation(s) (best {control.watch_best:.6g}, now {values['early_stopping']:.6g})")
        if "stop_at" in values and out.stop is None:
            s = c.stop_at
            v = values["stop_at"]
            if (v >= s.value) if s.mode == "max" else (v <= s.value):
                out.stop_by = "stop_at"
                out.stop = f"stop_at reached at step {step}: {s.metric}={v:.6g} ({'>=' if s.mode == 'max' else '<='} {s.value:g})"
        out.control = asdict(control)
        return out


def raise_unknown_metric(outcome: Outcome) -> None:
    if outcome.error:
        raise ConfigError(outcome.error)


def carried_over(current: Control, restored: dict[str, Any]) -> Control:
    """The Control after a rollback: the rolled-back-to checkpoint's view of the metrics (best,
    early stopping), the run's own history of rollbacks."""
    back = Control.from_state(restored)
    back.rollbacks, back.lr_scale = current.rollbacks, current.lr_scale
    back.data_seed_offset, back.skipped_windows = current.data_seed_offset, list(current.skipped_windows)
    back.streak_start = {}
    return back
