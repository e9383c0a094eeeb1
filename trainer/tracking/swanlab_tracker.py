"""SwanLab backend: metrics, config, and sample texts, offline by default.

Mode: `TrackerEnv.swanlab_mode` (`SWANLAB_MODE`) when set, otherwise "offline": no account and
no network; `swanlab sync <run dir>` uploads an offline run later. Data goes to
`<run_dir>/swanlog/run-<time>-<id>/` (`run-<id>.swanlab` record log, `media/`, `files/`).
Project = `project_name` (characters SwanLab refuses become `-`), experiment = `experiment_name`.

Keys:

    <metric name>                     scalars, at their step
    <prefix>/sample_<i>_prompt        swanlab.Text, at the event's step
    <prefix>/sample_<i>_generation
    <prefix>/sample_<i>_reference     only when the sample has a reference
    <prefix>/samples                  one list per event: a Text per sample, content = generation,
                                      caption = "sample <i>: <prompt>"
    report                            an HTML file passed to log_artifact (swanlab.Html)

What this backend turns off or cleans up, and why:
- SwanLab's terminal proxy replaces `sys.stdout.write`/`sys.stderr.write` at init and puts back
  the saved method at finish on whatever `sys.stdout` is then; if anything swapped the stream in
  between (pytest capture, `redirect_stdout`, tqdm), printing breaks. It is off here
  (`terminal.proxy_type="none"`); the console backend already shows the training output.
- `interactive=False`: no login prompt ever blocks a training job.
- SwanLab's run is a process-wide singleton: one SwanLab backend per process at a time.
- finish() stops SwanLab's own threads but leaves a watchdog inotify thread (and its file
  descriptor) created at init; close() stops the watchdog threads that init started.
- init also installs `sys.excepthook`, a SIGINT handler and an atexit hook (to mark the run
  crashed/aborted); finish() puts them back.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path

import swanlab

from trainer.tracking.base import SampleEvent, Tracker, TrackerContext, register_tracker

log = logging.getLogger(__name__)

LOG_SUBDIR = "swanlog"
DEFAULT_MODE = "offline"
_PROJECT_BAD_CHARS = re.compile(r"[^0-9a-zA-Z_\-+.]")  # SwanLab's project-name rule, max 100
_CAPTION_CHARS = 200


def project_name(name: str) -> str:
    cleaned = _PROJECT_BAD_CHARS.sub("-", name)[:100]
    return cleaned or "project"


@register_tracker("swanlab")
class SwanlabTracker(Tracker):
    # The `report` media key shows its latest step; SwanLab keeps the older copies too (one per
    # sample event), the price of a report that is current during the run.
    replaces_artifacts = True
    remote = True

    def __init__(self, ctx: TrackerContext):
        super().__init__(ctx)
        self.mode = ctx.env.swanlab_mode or DEFAULT_MODE
        self.log_dir = Path(ctx.run_dir).resolve() / LOG_SUBDIR
        project = project_name(ctx.project_name)
        if project != ctx.project_name:
            log.info("swanlab: project name %r is logged as %r", ctx.project_name, project)
        settings = swanlab.Settings(
            interactive=False,
            terminal=swanlab.Settings.Terminal(proxy_type="none"),
        )
        threads_before = set(threading.enumerate())
        self._run = swanlab.init(
            project=project,
            name=ctx.experiment_name,
            mode=self.mode,
            log_dir=str(self.log_dir),
            settings=settings,
        )
        self._lib_threads = [t for t in threading.enumerate() if t not in threads_before]
        self._last_step = 0
        self._closed = False

    @property
    def run_dir(self) -> Path:
        """This run's directory under swanlog/ (where the .swanlab record log is)."""
        return Path(self._run.dir)

    def run_record(self) -> dict[str, str]:
        return {"mode": self.mode, "dir": str(self.run_dir)}

    def log_config(self, config: dict) -> None:
        self._run.config.update(json.loads(json.dumps(config, default=str)))  # plain YAML-able values

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._run.log({k: float(v) for k, v in metrics.items()}, step=step)
        self._last_step = max(self._last_step, step)

    def log_samples(self, event: SampleEvent) -> None:
        data: dict[str, object] = {}
        listing = []
        for s in event.samples:
            key = f"{event.prefix}/sample_{s.index}"
            data[f"{key}_prompt"] = swanlab.Text(s.prompt)
            data[f"{key}_generation"] = swanlab.Text(s.generation)
            if s.reference is not None:
                data[f"{key}_reference"] = swanlab.Text(s.reference)
            prompt = s.prompt if len(s.prompt) <= _CAPTION_CHARS else s.prompt[:_CAPTION_CHARS] + "..."
            listing.append(swanlab.Text(s.generation, caption=f"sample {s.index}: {prompt}"))
        if listing:
            data[f"{event.prefix}/samples"] = listing
        self._run.log(data, step=event.step)
        self._last_step = max(self._last_step, event.step)

    def log_artifact(self, path: Path) -> None:
        path = Path(path)
        if path.suffix.lower() in (".html", ".htm"):
            self._run.log({"report": swanlab.Html(path)}, step=self._last_step)
        else:
            self._run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._run.finish()
        finally:
            self._stop_leftover_threads()

    def _stop_leftover_threads(self) -> None:
        # watchdog's Observer starts an inotify reader thread when it is constructed; SwanLab only
        # stops the observer if it was started, so that thread and its descriptor outlive finish().
        for thread in self._lib_threads:
            if thread.is_alive() and type(thread).__module__.startswith("watchdog.") and hasattr(thread, "stop"):
                thread.stop()
                thread.join(timeout=2)
        self._lib_threads = []
