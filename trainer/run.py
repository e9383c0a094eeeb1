"""The skeleton every training run shares, SFT or RL: its services, its position, its sample
event and its end. A trainer keeps only what is its own (SFT: loss and batches; RL: rollout,
rewards, advantages, update) and drives a `Run`:

    run = Run(cfg.trainer, cfg.samples, cfg.model, dist_ctx)    # cheap checks, before any load
    ... tokenizer, data, model, optimizer ...
    run.attach(model_config, tokenizer, lora, total_steps, ...)  # checkpoints, resume, trackers
    while not run.done:
        metrics = trainer.train_step()
        epoch_end = run.advance(steps_per_epoch)
        run.log_step(metrics)
        if ...: run.log_validation(val_metrics)                  # trackers; the metric watches see them
        if ...: run.sample_event(model, produce, ...)            # gather, rank-0 samples, log, alert action agreed
        run.end_step(save_checkpoint)                            # checkpoint, alert action, watches, preemption
    run.finish(model)

An alert's action (warn, stop, rollback) and the metric watches (keep_best, early_stopping,
stop_at) are decided on rank 0 by trainer/actions.py and broadcast, so every rank acts at the
same step.

`launch` and `cli_main` are the entry points' shared tail (`python -m trainer.<trainer>`).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from config import env as env_config
from config.loading import Resolved, redact, to_dict
from config.schema import ModelConfig, SamplesConfig, TrainerConfig
from trainer.actions import (
    ALERT_STOP_EXIT_CODE, AlertStopped, Control, Decision, Outcome, Watches, carried_over, decide, raise_unknown_metric,
    rollback_warning,
)
from trainer.checkpoint import Checkpointer, HFAssets, is_checkpoint, load_model_state, write_hf_model
from trainer.cli import (
    alert_stopped_exit, announce_config, exit_now, finish_run, normalize_config_path, preempted_exit, setup_logging,
    user_errors_exit,
)
from trainer.distributed import DistContext, broadcast_object, init_distributed, teardown
from trainer.faults import PreemptionWatch, check_shared_run_dir
from trainer.history import SampleHistory
from trainer.report import LiveReport, write_run_state
from trainer.progress import progress
from trainer.samples import SampleLogger
from trainer.token_cache import Ranks
from trainer.tracking import TrackerContext, Tracking, check_available
from workers.generation import Generated, GenerationSettings
from workers.lora import LoraSpec
from workers.replica import ModelReplica

log = logging.getLogger("trainer.run")


@dataclass
class Position:
    """Where a run is: what a checkpoint's trainer state holds and a resume restores."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient norm

    def advance(self, steps_per_epoch: int) -> bool:
        """One optimizer step done; True when it ended an epoch."""
        self.global_step += 1
        epoch_end = self.batch_in_epoch + 1 == steps_per_epoch
        self.epoch, self.batch_in_epoch = (self.epoch + 1, 0) if epoch_end else (self.epoch, self.batch_in_epoch + 1)
        return epoch_end


@dataclass
class Samples:
    """What rank 0 generated at one sample event, ready to log."""

    prompts: list[str]
    generated: list[Generated]
    references: list[Optional[str]]
    settings: GenerationSettings
    seeds: list[int]
    rewards: Optional[list[dict[str, float]]] = None


@dataclass
class SampleEventSpec:
    """How an event is labelled: its stage (`validation`, `25%`, `post-train`), the trackers'
    key prefix (`val`, `samples`) and the console style."""

    stage: str
    prefix: str
    style: str
    what: str = field(default="samples")  # named in the warning when rank 0's part fails


class Run:
    """A run's services: run directory, preemption watch, checkpoints and resume, trackers,
    sample history, live report, the rank-0 generation copy; its position; its sample event."""

    def __init__(self, trainer_cfg: TrainerConfig, samples_cfg: SamplesConfig, model_cfg: ModelConfig, dist_ctx: DistContext):
        self.cfg, self.samples_cfg, self.model_cfg = trainer_cfg, samples_cfg, model_cfg
        self.dist = dist_ctx
        self.run_dir = Path(trainer_cfg.default_local_dir)
        check_shared_run_dir(self.run_dir)  # before anything is loaded: every rank, within seconds
        self.preemption = PreemptionWatch()
        check_available(trainer_cfg.logger)  # a missing tracker package fails before any model
        self.position = Position()
        self.total_steps = 0
        self.samples_s = 0.0  # time in sample events since `take_samples_time` was last called
        self._bar = None
        # What the run decides for itself (trainer/actions.py): alert actions and metric watches.
        self.control = Control()
        self.watches = Watches(trainer_cfg)
        self.stop_reason: Optional[str] = None  # early stopping / stop_at: the run ends cleanly after this step
        self._decision: Optional[Decision] = None  # this step's alert action, agreed by every rank
        self._observed: dict[str, float] = {}  # rank 0: metrics of this step's validation and sample events
        self._observed_step = -1
        if dist_ctx.is_primary and (line := rollback_warning(samples_cfg.alerts, trainer_cfg)):
            log.warning("%s", line)

    @property
    def step(self) -> int:
        return self.position.global_step

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps or self.stop_reason is not None

    @property
    def last_step(self) -> bool:
        return self.step == self.total_steps

    def token_cache(self, configured_dir: Optional[str]) -> tuple[str, Ranks]:
        """Where the token cache lives and who writes it (local rank 0 of each node)."""
        d = self.dist
        return configured_dir or env_config.token_cache_dir(env_config.environ()), Ranks(d.rank, d.local_rank, d.world_size)

    # ------------------------------------------------------------------ after the model is built
    def attach(
        self,
        model_config: PretrainedConfig,
        tokenizer: PreTrainedTokenizerBase,
        lora: Optional[LoraSpec],
        total_steps: int,
        models: Callable[[], tuple[torch.nn.Module, torch.optim.Optimizer, Any, dict]],
        replica_dtype: str,
        replica_device: str,
        train_dtype: torch.dtype,
        max_print_chars: int = 400,
    ) -> None:
        """Checkpoints (and the resume, which sets `position`), trackers, history, report and the
        generation copy. `models()` gives (model, optimizer, scheduler, extra parts) to restore."""
        m = self.model_cfg
        self.total_steps = total_steps
        self.checkpointer = Checkpointer(
            self.run_dir, self.cfg.save_freq, self.cfg.max_ckpt_to_keep, self.dist.rank, self.dist.world_size, self.cfg.checkpoint,
            HFAssets(model_config, tokenizer, m.partial_pretrain, m.trust_remote_code, m.attn_implementation, lora),
        )
        self.checkpointer.clean_partial()
        self._parts = models()
        self._base_lrs = list(getattr(self._parts[2], "base_lrs", []))  # before a resume or rollback scales them
        self._resume(*self._parts)
        self.tracking = Tracking(
            # metrics.jsonl ("file") is the run's own record, which the report reads: always on.
            [*self.cfg.logger, "file"],
            TrackerContext(self.run_dir, self.cfg.project_name, self.cfg.experiment_name, env_config.tracker_env()),
            is_primary=self.dist.is_primary,
        )
        primary, s = self.dist.is_primary, self.samples_cfg
        history = SampleHistory(self.run_dir, s.alerts, resume_step=self.step) if s.history and primary else None
        report = LiveReport(self.run_dir, total_steps, self.tracking) if s.report and primary else None
        self.sample_logger = SampleLogger(self.tracking, history, report, max_print_chars)
        self.replica = ModelReplica(model_config, replica_dtype, replica_device, self.dist.device, train_dtype,
                                    m.attn_implementation, m.trust_remote_code, lora)

    def _resume(self, model, optimizer, scheduler, extra: dict) -> None:
        path = self.checkpointer.agree_on_resume(self.cfg.resume_mode, self.cfg.resume_from_path)
        if path is None:
            return
        state = self.checkpointer.load(path, model, optimizer, scheduler, extra)
        self.position = Position(**{k: state.get(k, 0) for k in asdict(Position())})
        self.control = Control.from_state(state.get("control"))
        self._apply_control()
        p = self.position
        log.info("resumed from %s: step %d, epoch %d, batch %d", path, p.global_step, p.epoch, p.batch_in_epoch)

    # ------------------------------------------------------------------ the loop's steps
    def begin(self, full_cfg: Any, bar_name: str) -> None:
        if self.dist.is_primary:
            self.tracking.log_config(redact(to_dict(full_cfg)))
        self._bar_name = bar_name
        self._bar = progress(self.total_steps, self.step, bar_name, enabled=self.dist.is_primary)

    def advance(self, steps_per_epoch: int) -> bool:
        """Count the step just taken; True when it ended an epoch."""
        epoch_end = self.position.advance(steps_per_epoch)
        self._bar.update(1)
        return epoch_end

    def log_step(self, metrics: dict[str, Any], bar: dict[str, str]) -> None:
        """The step's metrics to the trackers every `log_freq` steps and at the last (only then are
        device values read back: no host synchronisation in other steps); `bar` maps a progress
        bar label to the metric it shows."""
        if self.step % self.cfg.log_freq == 0 or self.last_step:
            metrics = {k: float(v) for k, v in metrics.items()}
            self._bar.set_postfix(**{label: f"{metrics[key]:.4f}" for label, key in bar.items()})
            self.tracking.log_metrics(metrics, self.step)

    def due(self, freq: int, epoch_end: bool) -> bool:
        """A per-step action's turn: at each epoch end, the last step, and every `freq` steps (> 0)."""
        return epoch_end or self.last_step or (freq > 0 and self.step % freq == 0)

    def end_step(self, save_checkpoint: Callable[[], Path]) -> None:
        """A checkpoint when one is due; the step's alert action (rollback, or stop: a checkpoint
        and `AlertStopped`) and metric watches (best checkpoint, early stop); on SIGTERM (any
        rank) a checkpoint and `Preempted`."""
        decision, self._decision = self._decision, None
        outcome = self._agree_on_watches()
        if decision is not None and decision.action == "rollback":
            self._roll_back(decision, save_checkpoint)  # this step's weights are the bad ones: not saved
        else:
            wanted = decision is not None or outcome.new_best or outcome.stop is not None
            if self.checkpointer.should_save(self.step, self.last_step) or (wanted and self.checkpointer.last_saved_step != self.step):
                save_checkpoint()
            if outcome.new_best:
                self._keep_best()
            if decision is not None:
                self._stop_on_alert(decision)
            if outcome.stop is not None:
                self.stop_reason = outcome.stop
                if self.dist.is_primary:
                    log.warning("%s; checkpoint %s; the run ends here", outcome.stop, self.checkpointer.step_dir(self.step))
        if not self.done and self.preemption.requested():
            self._bar.close()
            self.preemption.checkpoint_and_stop(self.step, self.checkpointer, save_checkpoint, self.tracking)

    def end_loop(self) -> None:
        self._bar.close()

    def save(self, model, optimizer, scheduler, extra: Optional[dict] = None) -> Path:
        trainer_state = {**asdict(self.position), "control": asdict(self.control)}
        path = self.checkpointer.save(self.step, model, optimizer, scheduler, trainer_state, extra or {})
        log.info("saved checkpoint %s", path)
        return path

    # ------------------------------------------------------------------ the sample event
    def sample_event(self, sharded_model: torch.nn.Module, produce: Callable[[torch.nn.Module], Samples],
                     spec: SampleEventSpec) -> Optional[dict[str, float]]:
        """Collective: every rank calls it at the same step.

        Every rank takes part in the gather of the full model; it stays outside the `try`, so a
        rank failing inside it ends the run instead of going on to the barrier while the others
        are in the next all-gather (a hang). Rank 0 alone then builds or refreshes its copy,
        generates (`produce(copy)`) and logs: that may fail and only warn, and it touches no
        sharded module. The other ranks wait at the barrier. Returns the event's metrics on
        rank 0 (None elsewhere, or when rank 0's part failed)."""
        start = time.perf_counter()
        state = self.replica.gather(sharded_model)
        metrics = None
        try:
            if self.dist.is_primary:
                copy = self.replica.load(state)
                gather_s = time.perf_counter() - start
                samples = produce(copy)
                generation_s = time.perf_counter() - start - gather_s
                log.debug("%s samples: gather %.3fs, generation %.3fs, %s", spec.stage, gather_s, generation_s,
                          samples.settings.describe())
                metrics = self.sample_logger.log(
                    self.step, spec.stage, spec.prefix, spec.style, samples.prompts, samples.generated, samples.references,
                    samples.settings, samples.seeds, generation_s, samples.rewards,
                )
        except Exception as err:  # noqa: BLE001 - samples are optional; training goes on
            log.warning("%s failed at step %d: %s: %s", spec.what, self.step, type(err).__name__, err)
        del state
        dist.barrier()
        self._agree_on_alerts(spec.prefix, metrics)
        self._observe(metrics or {})
        self.samples_s += time.perf_counter() - start
        return metrics

    def take_samples_time(self) -> float:
        """Seconds spent in sample events since the last call (a step's `timing/samples_s`)."""
        seconds, self.samples_s = self.samples_s, 0.0
        return seconds

    # ------------------------------------------------------------------ the end
    def finish(self, model: torch.nn.Module) -> None:
        """Hand SIGTERM back, export the final model, write the report, close the trackers."""
        self.preemption.restore()  # SIGTERM means "stop now" again, as before the run (the API's callers)
        if self.cfg.export_hf_model:
            merged = self.run_dir / "hf_model_merged" if self.model_cfg.lora_export_merged else None
            self.checkpointer.export_hf_model(model, self.run_dir / "hf_model", merged)
            self._export_best()
        finish_run(self.run_dir, self.tracking, self.sample_logger.report, self.dist.is_primary)


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
        restored = Position(**{k: state.get(k, 0) for k in asdict(Position())})
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


BEST_FILE = "best_checkpoint.json"  # in the run directory: the best checkpoint's step, metric and value


# ---------------------------------------------------------------------- entry points
def launch(
    cfg: DictConfig,
    cli_overrides: Sequence[str],
    resolve_config: Callable[[DictConfig, Sequence[str], int], Resolved],
    build_trainer: Callable[[Any, DistContext], Any],
) -> None:
    """Resolve and check the config, start the process group, build the trainer and fit it.
    Bad input before training: one line, exit 2. SIGTERM: checkpoint, exit 143. A sample alert
    whose action is `stop`: checkpoint, exit `ALERT_STOP_EXIT_CODE` (3)."""
    denv = env_config.dist_env()
    with user_errors_exit(denv.rank):
        setup_logging(env_config.log_level(env_config.environ()), denv.rank)
        resolved = resolve_config(cfg, cli_overrides, denv.world_size)
        announce_config(resolved, denv.rank)
        t = resolved.config.trainer
        ctx = init_distributed(denv, t.device, t.collective_timeout_seconds)
        trainer = build_trainer(resolved.config, ctx)
    with preempted_exit(denv.rank), alert_stopped_exit(denv.rank), user_errors_exit(denv.rank, during_training=True):
        trainer.fit()
    teardown()


def cli_main(hydra_main: Callable[[], None]) -> None:
    """`python -m trainer.<trainer>`: `--config-path` relative to the current directory, then Hydra."""
    sys.argv = normalize_config_path(sys.argv, Path.cwd())
    hydra_main()
    exit_now()
