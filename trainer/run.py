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

`entry_point` makes a trainer module's `main` (`python -m trainer.<trainer>`).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from config import env as env_config
from config.loading import Resolved, redact, to_dict
from config.schema import EvalConfig, ModelConfig, SamplesConfig, TrainerConfig
from trainer.actions import Control, Decision, Watches, rollback_warning
from trainer.checkpoint import Checkpointer, HFAssets
from trainer.cli import (
    alert_stopped_exit, announce_config, exit_now, finish_run, normalize_config_path, preempted_exit, setup_logging,
    user_errors_exit,
)
from trainer.distributed import DistContext, init_distributed, teardown
from trainer import resume_guard
from trainer.faults import PreemptionWatch, check_shared_run_dir, same_config_on_every_rank
from trainer.harness import Harness
from trainer.history import SampleHistory
from trainer.report import LiveReport
from trainer.progress import progress
from trainer.run_actions import RunActions
from trainer.samples import SampleLogger, SampleMeta
from trainer.token_cache import Ranks
from trainer.tracking import TrackerContext, Tracking, check_available
from workers.generation import Generated, GenerationSettings
from workers.lora import LoraSpec
from workers.metrics import build_metric_set
from workers.replica import ModelReplica
from workers.reward_model import ScoringFailed

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
    meta: Optional[list[SampleMeta]] = None  # each answer's sample index, greedy flag, tags, id, settings
    generation_s: float = 0.0  # set by the sample event
    benchmark_metrics: dict[str, float] = field(default_factory=dict)  # lm-eval's, set by the sample event


# Scores of rank 0's samples computed by every rank (a sharded reward model): (prompts, responses)
# -> one {name: score} per response.
ScoreFn = Callable[[list[str], list[str]], list[dict[str, float]]]


@dataclass
class SampleEventSpec:
    """How an event is labelled: its stage (`validation`, `25%`, `post-train`), the trackers'
    key prefix (`val`, `samples`) and the console style."""

    stage: str
    prefix: str
    style: str
    what: str = field(default="samples")  # named in the warning when rank 0's part fails


class Run(RunActions):
    """A run's services: run directory, preemption watch, checkpoints and resume, trackers,
    sample history, live report, the rank-0 generation copy; its position; its sample event."""

    def __init__(self, trainer_cfg: TrainerConfig, samples_cfg: SamplesConfig, model_cfg: ModelConfig, dist_ctx: DistContext,
                 essential: Optional[dict[str, Any]] = None, eval_cfg: Optional[EvalConfig] = None):
        self.cfg, self.samples_cfg, self.model_cfg = trainer_cfg, samples_cfg, model_cfg
        self.dist = dist_ctx
        self.run_dir = Path(trainer_cfg.default_local_dir)
        check_shared_run_dir(self.run_dir)  # before anything is loaded: every rank, within seconds
        # The run's essential keys (resume_guard.essential_config), saved with each checkpoint: a
        # resume of another run's checkpoint stops here, before anything is loaded.
        self.essential = essential or {}
        resume_guard.check(trainer_cfg.resume_mode, trainer_cfg.resume_from_path, trainer_cfg.resume_force,
                           self.run_dir, self.essential)
        self.preemption = PreemptionWatch()
        check_available(trainer_cfg.logger)  # a missing tracker package fails before any model
        self.metrics = build_metric_set(samples_cfg.metrics)  # so does an unknown task metric
        self.harness = Harness.create(eval_cfg, self.run_dir) if eval_cfg else None  # and lm-eval's tasks
        self.position = Position()
        self.total_steps = 0
        self.samples_s = 0.0  # time in sample events since `take_samples_time` was last called
        self._bar = None
        # What the run decides for itself (trainer/actions.py): alert actions and metric watches.
        self.control = Control()
        self.watches = Watches(trainer_cfg)
        self.stop_reason: Optional[str] = None  # early stopping / stop_at: the run ends cleanly after this step
        self._stop_record: Optional[dict] = None  # rank 0: that stop for run_state.json and the report
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
        self.sample_logger = SampleLogger(self.tracking, history, report, max_print_chars, self.metrics)
        if self.harness is not None and primary:
            self.harness.attach(self.tracking, tokenizer, resume_step=self.step)
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
                    self._stop_record = {"rule": outcome.stop_by, "step": self.step, "message": outcome.stop,
                                         "checkpoint": str(self.checkpointer.step_dir(self.step))}
        if not self.done and self.preemption.requested():
            self._bar.close()
            self.preemption.checkpoint_and_stop(self.step, self.checkpointer, save_checkpoint, self.tracking)

    def end_loop(self) -> None:
        self._bar.close()

    def save(self, model, optimizer, scheduler, extra: Optional[dict] = None) -> Path:
        trainer_state = {**asdict(self.position), resume_guard.ESSENTIAL_KEY: self.essential, "control": asdict(self.control)}
        path = self.checkpointer.save(self.step, model, optimizer, scheduler, trainer_state, extra or {})
        log.info("saved checkpoint %s", path)
        return path

    # ------------------------------------------------------------------ the sample event
    def sample_event(self, sharded_model: torch.nn.Module, produce: Callable[[torch.nn.Module], Samples],
                     spec: SampleEventSpec, score: Optional[ScoreFn] = None) -> Optional[dict[str, float]]:
        """Collective: every rank calls it at the same step.

        Every rank takes part in the gather of the full model; it stays outside the `try`, so a
        rank failing inside it ends the run instead of going on to the barrier while the others
        are in the next all-gather (a hang). Rank 0 alone then builds or refreshes its copy,
        generates (`produce(copy)`) and logs: that may fail and only warn, and it touches no
        sharded module. The other ranks wait at the barrier. `score` (a sharded reward model)
        runs on every rank between generation and logging (`_score_on_every_rank`). Returns the
        event's metrics on rank 0 (None elsewhere, or when rank 0's part failed)."""
        start = time.perf_counter()
        state = self.replica.gather(sharded_model)
        samples = self._generate_on_rank_zero(state, produce, spec, start) if self.dist.is_primary else None
        del state
        if score is not None:
            samples = self._score_on_every_rank(samples, score, spec)
        metrics = self._log_on_rank_zero(samples, spec) if samples is not None else None
        dist.barrier()
        self._agree_on_alerts(spec.prefix, metrics)
        self._observe(metrics or {})
        self.samples_s += time.perf_counter() - start
        return metrics

    def _generate_on_rank_zero(self, state: dict, produce: Callable[[torch.nn.Module], Samples], spec: SampleEventSpec,
                               start: float) -> Optional[Samples]:
        """Rank 0 alone: load the gathered state into its copy and generate. Out of memory or any
        other failure here warns (None); the copy is released either way, so a copy on the GPU
        gives its memory back to training."""
        try:
            copy = self.replica.load(state)
            gather_s = time.perf_counter() - start
            samples = produce(copy)
            samples.generation_s = time.perf_counter() - start - gather_s
            log.debug("%s samples: gather %.3fs, generation %.3fs, %s", spec.stage, gather_s, samples.generation_s,
                      samples.settings.describe())
            if self.harness is not None:  # benchmarks on the same copy; warns on its own failure
                samples.benchmark_metrics = self.harness.maybe_run(copy, self.step, spec.stage)
            return samples
        except Exception as err:  # noqa: BLE001 - samples are optional; training goes on
            log.warning("%s failed at step %d: %s: %s", spec.what, self.step, type(err).__name__, err)
            return None
        finally:
            self.replica.release()

    def _log_on_rank_zero(self, samples: Samples, spec: SampleEventSpec) -> Optional[dict[str, float]]:
        try:
            metrics = self.sample_logger.log(
                self.step, spec.stage, spec.prefix, spec.style, samples.prompts, samples.generated, samples.references,
                samples.settings, samples.seeds, samples.generation_s, samples.rewards, samples.meta,
            )
            return {**metrics, **samples.benchmark_metrics}  # what the metric watches may watch
        except Exception as err:  # noqa: BLE001 - samples are optional; training goes on
            log.warning("%s failed at step %d: %s: %s", spec.what, self.step, type(err).__name__, err)
            return None

    def _score_on_every_rank(self, samples: Optional[Samples], score: ScoreFn, spec: SampleEventSpec) -> Optional[Samples]:
        """Collective. Rank 0 broadcasts its prompts and responses (None when its part failed:
        then nobody scores), every rank scores the same texts (`score(prompts, responses)`, one
        dict of named scores per response), rank 0 adds them to its samples' rewards. The texts
        are the same on every rank. Only `ScoringFailed` (raised alike on every rank, before any
        forward) is a warning; any other error, perhaps on one rank only inside the sharded model's
        forwards, ends the run, where catching it would leave the ranks in different collectives."""
        box = [None if samples is None else (samples.prompts, [g.text for g in samples.generated])]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return samples
        try:
            extra = score(*box[0])
        except ScoringFailed as err:  # samples are optional; training goes on
            log.warning("%s: scoring failed at step %d: %s: %s", spec.what, self.step, type(err).__name__, err)
            return samples
        if samples is not None:
            samples.rewards = [{**(r or {}), **e} for r, e in zip(samples.rewards or [None] * len(extra), extra)]
        return samples

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
        finish_run(self.run_dir, self.tracking, self.sample_logger.report, self.dist.is_primary, self._stop_record)


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
        same_config_on_every_rank(resolved.config)
        trainer = build_trainer(resolved.config, ctx)
    with preempted_exit(denv.rank), alert_stopped_exit(denv.rank), user_errors_exit(denv.rank, during_training=True):
        trainer.fit()
    teardown()


def entry_point(config_name: str, resolve_config: Callable[[DictConfig, Sequence[str], int], Resolved],
                build_trainer: Callable[[Any, DistContext], Any]) -> Callable[[], None]:
    """A trainer module's `main`: `python -m trainer.<trainer> [--config-name NAME] [key=value ...]`.
    `--config-path` is taken relative to the current directory; the bundled configs are the default."""

    @hydra.main(config_path="pkg://config", config_name=config_name, version_base="1.3")
    def hydra_main(cfg: DictConfig) -> None:
        launch(cfg, HydraConfig.get().overrides.task, resolve_config, build_trainer)

    def main() -> None:
        sys.argv = normalize_config_path(sys.argv, Path.cwd())
        hydra_main()
        exit_now()

    return main
