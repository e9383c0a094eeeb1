"""Run's half that acts on what the run sees: the action of a sample alert (stop, rollback) and
the metric watches (keep_best, early_stopping, stop_at), carried out in lockstep. The decisions
themselves are trainer/actions.py's; `trainer.run.Run` owns the services these methods use
(checkpointer, trackers, history, position, progress bar) and calls them from its sample event,
its validation logging and the end of each step.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

from trainer.actions import (
    ALERT_STOP_EXIT_CODE, AlertStopped, Control, Decision, Outcome, carried_over, decide, raise_unknown_metric,
)
from trainer.checkpoint import is_checkpoint, load_model_state, write_hf_model
from trainer.distributed import broadcast_object
from trainer.progress import progress
from trainer.report import write_run_state

log = logging.getLogger("trainer.run")

BEST_FILE = "best_checkpoint.json"  # in the run directory: the best checkpoint's step, metric and value


class RunActions:
    # ------------------------------------------------------------------ acting on what the run sees
    # Alert actions and metric watches (trainer/actions.py): rank 0 decides, every rank gets the
    # decision by broadcast and acts at the same step.
    def log_validation(self, metrics: dict[str, float]) -> None:
        """Collective in effect (every rank calls it at a validation): the trackers get the
        metrics, the watches see them at the step's end."""
        self.tracking.log_metrics(metrics, self.step)
        self._observe(metrics)

    def _observe(self, metrics: dict[str, float]) -> None:
        if self._observed_step != self.step:
            self._observed, self._observed_step = {}, self.step
        self._observed.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})

    def data_seed(self, seed: int) -> int:
        """The data order's seed: a rollback without skip_data reshuffles by moving it."""
        return seed + 1_000_003 * self.control.data_seed_offset

    def _agree_on_alerts(self, prefix: str, metrics: Optional[dict[str, float]]) -> None:
        """Collective, once per sample event (even when rank 0's part failed): the action of the
        event's alerts, decided on rank 0 and broadcast."""
        decision = Decision(step=self.step)
        if self.dist.is_primary:
            history = self.sample_logger.history
            try:
                alerts = history.last_alerts if (history is not None and metrics is not None) else []
                checkpoints = [(int(p.name.rsplit("_", 1)[1]), p) for p in self.checkpointer.complete_checkpoints() if is_checkpoint(p)]
                decision = decide(alerts, prefix, self.step, self.samples_cfg.alerts, self.control, checkpoints)
            except Exception as err:  # noqa: BLE001 - deciding must not end the run: the alert stays a warning
                log.warning("alert action not decided at step %d: %s: %s", self.step, type(err).__name__, err)
        if self.dist.world_size > 1:
            decision = broadcast_object(decision)
        if decision.control is not None:
            self.control = Control.from_state(decision.control)
        if decision.action != "warn" and (self._decision is None or decision.action == "rollback"):
            self._decision = decision

    def _agree_on_watches(self) -> Outcome:
        """Collective when this step had a validation or sample event and a watch is set."""
        if not self.watches.active or self._observed_step != self.step:
            return Outcome()
        self._observed_step = -1
        outcome = Outcome()
        if self.dist.is_primary:
            try:
                outcome = self.watches.observe(self.step, self._observed, self.control)
            except Exception as err:  # noqa: BLE001 - the other ranks wait for the broadcast: never leave them
                log.warning("metric watches failed at step %d: %s: %s", self.step, type(err).__name__, err)
                outcome = Outcome(control=asdict(self.control))
        if self.dist.world_size > 1:
            outcome = broadcast_object(outcome)
        raise_unknown_metric(outcome)
        self.control = Control.from_state(outcome.control)
        return outcome

    def _apply_control(self) -> None:
        """The learning rate scaled by the rollbacks so far (from the schedule's base rates) and
        the best checkpoint kept from pruning."""
        model, optimizer, scheduler, _ = self._parts
        if self._base_lrs:
            scheduler.base_lrs = [lr * self.control.lr_scale for lr in self._base_lrs]
            lambdas = getattr(scheduler, "lr_lambdas", None)
            for i, group in enumerate(optimizer.param_groups):
                factor = lambdas[i](scheduler.last_epoch) if lambdas else 1.0
                group["lr"] = scheduler.base_lrs[i] * factor
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() reports
        self.checkpointer.keep = {self.control.best_step} if self.control.best_step is not None else set()

    def _roll_back(self, decision: Decision, save_checkpoint: Callable[[], Path]) -> None:
        """Collective. Restore the checkpoint before the alerts (weights, optimizer, scheduler,
        RNG, position), lower the LR, skip or reshuffle the data since, mark the discarded steps,
        and save the restored point again with the new control: a relaunch resumes from here."""
        r = self.samples_cfg.alerts.rollback
        target, alert = Path(decision.target), replace(self.position)
        state = self.checkpointer.load(target, *self._parts)
        restored = type(self.position)(**{k: state.get(k, 0) for k in asdict(self.position)})
        c = self.control
        c.rollbacks, c.lr_scale = c.rollbacks + 1, c.lr_scale * r.lr_factor
        if r.skip_data:  # the data goes on where the alert was: the window that led there is not seen again
            restored.epoch, restored.batch_in_epoch = alert.epoch, alert.batch_in_epoch
            c.skipped_windows.append([restored.global_step + 1, alert.global_step])
        else:
            c.data_seed_offset += 1
        self.control = carried_over(c, state.get("control"))
        self.position = restored
        self._apply_control()
        back = restored.global_step
        if self.dist.is_primary:
            log.warning("%s: rolled back to %s (rollback %d of %d), learning rate x%g from here, %s", decision.reason(), target,
                        self.control.rollbacks, r.max_rollbacks, self.control.lr_scale,
                        f"data of steps {back + 1}-{alert.global_step} skipped" if r.skip_data else "data reshuffled")
            for old in self.checkpointer.complete_checkpoints():
                if int(old.name.rsplit("_", 1)[1]) > back:
                    log.info("removing checkpoint %s of the discarded steps", old)
                    shutil.rmtree(old, ignore_errors=True)
            self._write_best_file()
            record = {"kind": "rollback", "step": alert.global_step, "prefix": decision.prefix, "to_step": back,
                      "rule": decision.rule, "prompt": decision.prompt, "message": decision.message,
                      "rollbacks": self.control.rollbacks, "lr_scale": self.control.lr_scale,
                      "skipped": [back + 1, alert.global_step] if r.skip_data else None, "time": time.time()}
            if self.sample_logger.history is not None:
                self.sample_logger.history.discard_after(back, record)
            self.tracking.log_metrics({f"{decision.prefix}/rollback": float(self.control.rollbacks),
                                       f"{decision.prefix}/rollback_to_step": float(back),
                                       "train/lr_scale": self.control.lr_scale}, alert.global_step)
            if self.sample_logger.report is not None:  # the live page shows the rollback now, not at the next event
                self.sample_logger.report.update()
        dist.barrier()
        save_checkpoint()
        self._bar.close()  # counts again from the restored step
        self._bar = progress(self.total_steps, self.step, self._bar_name, enabled=self.dist.is_primary)

    def _stop_on_alert(self, decision: Decision) -> None:
        """After this step's checkpoint: the reason to run_state.json (and the report), then
        `AlertStopped` on every rank."""
        checkpoint = self.checkpointer.step_dir(self.step)
        if self.dist.is_primary:
            try:
                write_run_state(self.run_dir, {
                    "status": "stopped", "total_steps": self.total_steps, "exit_code": ALERT_STOP_EXIT_CODE,
                    "updated": time.time(), "reason": decision.reason(),
                    "stop": {"rule": decision.rule, "prompt": decision.prompt, "step": decision.step,
                             "message": decision.message, "checkpoint": str(checkpoint)},
                })
                if self.sample_logger.report is not None:
                    self.sample_logger.report.update()
            except OSError as err:
                log.warning("run_state.json not written: %s", err)
        self._bar.close()
        self.tracking.close()
        self.preemption.restore()
        raise AlertStopped(decision.reason(), checkpoint)

    def _keep_best(self) -> None:
        self.checkpointer.keep = {self.control.best_step}
        if self.dist.is_primary:
            self._write_best_file()

    def _write_best_file(self) -> None:
        """`best_checkpoint.json`: which checkpoint is best, by which metric (rank 0)."""
        path = self.run_dir / BEST_FILE
        c, kb = self.control, self.cfg.keep_best
        if c.best_step is None:
            path.unlink(missing_ok=True)
            return
        path.write_text(json.dumps({"step": c.best_step, "metric": kb.metric, "mode": kb.mode, "value": c.best_value,
                                    "checkpoint": str(self.checkpointer.step_dir(c.best_step))}, indent=2))

    def _export_best(self) -> None:
        """Collective: `best_hf_model/` from the best checkpoint, read by rank 0 alone."""
        step = self.control.best_step
        if not self.cfg.keep_best.metric or step is None:
            return
        if self.dist.is_primary:
            write_hf_model(load_model_state(self.checkpointer.step_dir(step)), self.checkpointer.hf, self.run_dir / "best_hf_model")
            log.info("exported the best checkpoint (step %d, %s=%.6g) to %s", step, self.cfg.keep_best.metric,
                     self.control.best_value, self.run_dir / "best_hf_model")
        dist.barrier()
