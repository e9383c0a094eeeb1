"""Weights & Biases backend: metrics, config, sample texts and tables, offline by default.

Mode: `TrackerEnv.wandb_mode` (`WANDB_MODE`) when set, otherwise "offline": no account and no
network; `wandb sync <run_dir>/wandb/offline-run-...` uploads it later. Files go to
`<run_dir>/wandb/` (`offline-run-<time>-<id>/run-<id>.wandb` is the record log, media and tables
are under `files/`). Project = `project_name`, run name = `experiment_name`.

Keys (all logged with the step they belong to; W&B drops data logged at a step lower than one
already logged, so the trainer logs in step order):

    <metric name>                     history scalars
    <prefix>/sample_<i>_prompt        plain strings
    <prefix>/sample_<i>_generation
    <prefix>/sample_<i>_reference     only when the sample has a reference
    <prefix>/samples                  wandb.Table of this event (SampleEvent.table_rows())
    <prefix>/samples_all              incremental wandb.Table of every event so far (each log
                                      adds only the new rows)
    report                            an HTML file passed to log_artifact (wandb.Html, as is)

Settings and clean-up, and why:
- `console="off"`, `silent=True`: W&B neither captures nor decorates our terminal output. (Importing
  wandb still wraps `sys.stdout.write`/`sys.stderr.write` for good with a pass-through; printing
  is unaffected.)
- `reinit="create_new"`: the run is independent of `wandb.run` and of any other run.
- wandb.setup(mode=...) before init: W&B 0.31 records client telemetry (OpenTelemetry) against
  the process-wide settings, not the run's, so an offline run would still post to W&B's servers
  when the process exits unless the process-wide mode is offline too.
- init starts the `wandb-core` service process and wraps `sys.excepthook` and `sys.exit`;
  close() finishes the run and, when no other W&B run is active in this process, calls
  wandb.teardown() to stop the service and puts the two hooks back.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import wandb

from trainer.tracking.base import SampleEvent, Tracker, TrackerContext, register_tracker

DEFAULT_MODE = "offline"


def make_table(rows: list[dict[str, Any]]) -> "wandb.Table":
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    data = [[row.get(c) for c in columns] for row in rows]
    return wandb.Table(columns=columns, data=data, allow_mixed_types=True)  # a cell type must not stop logging


def _no_other_run_active() -> bool:
    try:
        from wandb.sdk import wandb_setup

        return wandb_setup.singleton().most_recent_active_run is None
    except Exception:  # noqa: BLE001 - internals moved: leave the service to wandb's atexit hook
        return False


@register_tracker("wandb")
class WandbTracker(Tracker):
    remote = True  # online, calls go through wandb-core's own queue; offline they still pass its service
    replaces_artifacts = True  # a file saved with policy "live" is uploaded again whenever it changes
    follows_files = True  # ... so it needs the file itself, not a copy of it as it was

    def __init__(self, ctx: TrackerContext):
        super().__init__(ctx)
        self.mode = ctx.env.wandb_mode or DEFAULT_MODE
        saved_hooks = (sys.excepthook, sys.exit)
        wandb.setup(settings=wandb.Settings(mode=self.mode))
        settings = wandb.Settings(console="off", silent=True, reinit="create_new")
        self._run = wandb.init(
            project=ctx.project_name,
            name=ctx.experiment_name,
            dir=str(Path(ctx.run_dir).resolve()),
            mode=self.mode,
            settings=settings,
        )
        # (hook before, hook wandb put in its place) for sys.excepthook and sys.exit
        self._hooks = list(zip(saved_hooks, (sys.excepthook, sys.exit)))
        self._cumulative: dict[str, "wandb.Table"] = {}
        self._live_files: set[Path] = set()
        self._last_step: int | None = None
        self._closed = False

    @property
    def run_dir(self) -> Path:
        """This run's directory (where the .wandb record log is)."""
        return Path(self._run.dir).parent  # run.dir is <run dir>/files

    def run_record(self) -> dict[str, str]:
        return {"run_id": self._run.id, "mode": self.mode, "dir": str(self.run_dir)}

    def _log(self, data: dict[str, Any], step: int | None) -> None:
        self._run.log(data, step=step)
        if step is not None:
            self._last_step = step if self._last_step is None else max(self._last_step, step)

    def log_config(self, config: dict) -> None:
        self._run.config.update(config, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._log({k: float(v) for k, v in metrics.items()}, step)

    def log_samples(self, event: SampleEvent) -> None:
        data: dict[str, Any] = {}
        for s in event.samples:
            key = f"{event.prefix}/sample_{s.index}"
            data[f"{key}_prompt"] = s.prompt
            data[f"{key}_generation"] = s.generation
            if s.reference is not None:
                data[f"{key}_reference"] = s.reference
        rows = event.table_rows()
        if rows:
            data[f"{event.prefix}/samples"] = make_table(rows)
            # An incremental table uploads only the new rows each time; re-logging the whole
            # history as a new immutable table would grow quadratically over a run.
            cumulative = self._cumulative.get(event.prefix)
            if cumulative is None:
                columns = list(dict.fromkeys(k for row in rows for k in row))
                cumulative = self._cumulative[event.prefix] = wandb.Table(
                    columns=columns, allow_mixed_types=True, log_mode="INCREMENTAL"
                )
            for row in rows:
                cumulative.add_data(*[row.get(c) for c in cumulative.columns])
            data[f"{event.prefix}/samples_all"] = cumulative
        self._log(data, event.step)

    def log_artifact(self, path: Path) -> None:
        path = Path(path)
        if path.suffix.lower() in (".html", ".htm"):
            self._log({"report": wandb.Html(path.read_text(encoding="utf-8"), inject=False)}, self._last_step)
        else:
            self._run.save(str(path), base_path=str(path.parent), policy="now")

    def replace_artifact(self, path: Path) -> None:
        # One file in the run's Files tab, kept current, rather than an HTML media entry per event.
        path = Path(path)
        if path not in self._live_files:
            self._run.save(str(path), base_path=str(path.parent), policy="live")
            self._live_files.add(path)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._run.finish()
        if _no_other_run_active():
            wandb.teardown()
            self._restore_hooks()

    def _restore_hooks(self) -> None:
        # Starting the service wraps sys.excepthook and sys.exit (to pass the exit code to it);
        # teardown leaves them, and every later start would wrap them again.
        (hook_before, hook_wandb), (exit_before, exit_wandb) = self._hooks
        if hook_wandb is not hook_before and sys.excepthook is hook_wandb:
            sys.excepthook = hook_before
        if exit_wandb is not exit_before and sys.exit is exit_wandb:
            sys.exit = exit_before
