"""MLflow backend: metrics, flattened config params, and samples as text and table artifacts.

Where it writes: `TrackerEnv.mlflow_tracking_uri` (`MLFLOW_TRACKING_URI`) when set, otherwise a
SQLite store in the run directory, `sqlite:///<run_dir>/mlflow.db`, with artifacts in
`<run_dir>/mlartifacts/` (no server needed; `mlflow ui --backend-store-uri sqlite:///...` shows it).
Experiment = `project_name`, run name = `experiment_name`. A run of that name in the experiment
that did not finish (RUNNING, FAILED, KILLED: the process died or was stopped) is resumed, so a
training run restarted from a checkpoint keeps one MLflow run; a FINISHED run is never reopened,
a new one is created instead.

Artifact layout of one run:

    config.json                                      full config (log_config)
    <prefix>/step_<step:08d>/sample_<i>_prompt.txt   one file per sample and text, i = sample index
    <prefix>/step_<step:08d>/sample_<i>_generation.txt
    <prefix>/step_<step:08d>/sample_<i>_reference.txt    only when the sample has a reference
    <prefix>/samples_step_<step:08d>.json            table of one event (log_table, "split" JSON)
    <prefix>/samples_all.json                        every event's rows so far, same format
    <file name>                                      log_artifact (e.g. the HTML report)

`log_table` appends to an existing table artifact, but it downloads the old file to do so and
MLflow shows a "Downloading artifacts" progress bar on stderr each time. So the cumulative table
is kept in memory (read back once when a run is resumed) and rewritten; it is created with
`log_table`, which registers it as a table for the UI, and overwritten with `log_artifact`.

MLflow metrics are numeric only, which is why the sample texts are artifacts. Config values are
params (dotted keys, values cut to MLflow's 6000-character limit); MLflow refuses to change a
param, so on a resumed run a changed value is only logged in `config.json` and warned about.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import mlflow  # noqa: F401 - first, so a missing package is reported as 'mlflow'
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from config.loading import flatten, redact_credentials, redact_log_credentials
from trainer.tracking.base import SampleEvent, Tracker, TrackerContext, register_tracker

log = logging.getLogger(__name__)

_KEY_MAX_LENGTH = 250  # MLflow's limit for param and metric names
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")  # MLflow accepts / alphanumerics _ . - space :
_BATCH_PARAMS = 100  # MLflow's per-request limits
_BATCH_METRICS = 1000
_RESUMABLE = ("RUNNING", "SCHEDULED", "FAILED", "KILLED")


def _disable_telemetry() -> None:
    """Drop MLflow's usage-telemetry client for this process.

    MLflow's documented opt-out is the `MLFLOW_DISABLE_TELEMETRY` variable, read when `mlflow` is
    imported; setting it here would mean writing `os.environ`. The client only starts its threads
    and contacts its server when the first event is recorded, so removing it right after import
    keeps every call below offline. If the (private) hook moves in a later MLflow, the user's
    variable still works.
    """
    try:
        from mlflow.telemetry.client import _set_telemetry_client

        _set_telemetry_client(None)
    except Exception:  # noqa: BLE001
        log.debug("mlflow: could not switch telemetry off; set MLFLOW_DISABLE_TELEMETRY=true")


def clean_key(key: str) -> str:
    """A name MLflow accepts: bad characters become `_`, at most 250 characters."""
    return _BAD_KEY_CHARS.sub("_", str(key))[:_KEY_MAX_LENGTH]


def param_value(value: Any) -> str:
    text = json.dumps(value, default=str) if isinstance(value, (list, tuple, dict)) else str(value)
    if len(text) > MAX_PARAM_VAL_LENGTH:
        marker = "...[cut]"
        text = text[: MAX_PARAM_VAL_LENGTH - len(marker)] + marker
    return text


def table_columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows -> {column: values} (the dict form log_table takes); missing cells are None."""
    names: list[str] = []
    for row in rows:
        names.extend(k for k in row if k not in names)
    return {name: [row.get(name) for row in rows] for name in names}


def json_safe(value: Any) -> Any:
    """NaN and infinities become None (null), as pandas writes them in log_table's JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def sample_text_path(event: SampleEvent, index: int, kind: str) -> str:
    return f"{event.prefix}/step_{event.step:08d}/sample_{index}_{kind}.txt"


def step_table_path(prefix: str, step: int) -> str:
    return f"{prefix}/samples_step_{step:08d}.json"


def all_table_path(prefix: str) -> str:
    return f"{prefix}/samples_all.json"


def default_tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


@register_tracker("mlflow")
class MlflowTracker(Tracker):
    remote = True
    replaces_artifacts = True  # an artifact logged again under the same path overwrites the old one

    def __init__(self, ctx: TrackerContext, run_id: Optional[str] = None):
        """`run_id`: log to that existing run (the replay of `python -m trainer.tracking sync`)."""
        super().__init__(ctx)
        _disable_telemetry()
        redact_log_credentials(logging.getLogger("mlflow"))  # MLflow's own handler bypasses the root logger's
        run_dir = Path(ctx.run_dir).resolve()
        self.tracking_uri = ctx.env.mlflow_tracking_uri or default_tracking_uri(run_dir)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self._all_rows: dict[str, Optional[list[dict[str, Any]]]] = {}  # prefix -> cumulative rows
        self._closed = False
        if run_id is not None:
            run = self.client.get_run(run_id)
            self.run_id, self.experiment_id = run_id, run.info.experiment_id
            self._params, self._resumed = dict(run.data.params), True
            return
        experiment_id = self.experiment_id = self._experiment_id(run_dir)
        run = self._resumable_run(experiment_id)
        if run is not None:
            self.run_id = run.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            self._params = dict(run.data.params)
            self._resumed = True
            log.info("mlflow: resuming run %s (%s) in %s", ctx.experiment_name, self.run_id, redact_credentials(self.tracking_uri))
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=ctx.experiment_name).info.run_id
            self._params = {}
            self._resumed = False

    @property
    def params(self) -> dict[str, str]:
        """The run's params on the server (as far as this tracker knows)."""
        return dict(self._params)

    def run_record(self) -> dict[str, str]:
        return {"run_id": self.run_id, "experiment_id": self.experiment_id,
                "tracking_uri": redact_credentials(self.tracking_uri)}

    def _experiment_id(self, run_dir: Path) -> str:
        name = self.ctx.project_name
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            # The default store keeps its artifacts next to it; a user-set URI (a server) decides itself.
            location = None if self.ctx.env.mlflow_tracking_uri else (run_dir / "mlartifacts").as_uri()
            return self.client.create_experiment(name, artifact_location=location)
        if experiment.lifecycle_stage == "deleted":
            self.client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def _resumable_run(self, experiment_id: str):
        name = self.ctx.experiment_name
        if "'" in name:  # MLflow's filter syntax has no escape for it; start a new run
            return None
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"attributes.run_name = '{name}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if runs and runs[0].info.status in _RESUMABLE:
            return runs[0]
        return None

    # ---------------------------------------------------------------- logging

    def log_config(self, config: dict) -> None:
        self.client.log_text(self.run_id, json.dumps(config, indent=2, default=str), "config.json")
        params: dict[str, str] = {}
        for key, value in flatten(config).items():
            params.setdefault(clean_key(key), param_value(value))
        changed = sorted(k for k, v in params.items() if k in self._params and self._params[k] != v)
        if changed:
            log.warning(
                "mlflow: run %s already has other values for %s; MLflow params cannot change, see config.json",
                self.run_id,
                ", ".join(changed[:10]) + (" ..." if len(changed) > 10 else ""),
            )
        new = [Param(k, v) for k, v in params.items() if k not in self._params]
        for start in range(0, len(new), _BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=new[start : start + _BATCH_PARAMS])
        self._params.update({p.key: p.value for p in new})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(clean_key(k), float(v), now, int(step)) for k, v in metrics.items()]
        for start in range(0, len(batch), _BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=batch[start : start + _BATCH_METRICS])

    def log_samples(self, event: SampleEvent) -> None:
        rows = self.log_event_files(event)
        if rows:
            self._log_cumulative(event.prefix, rows)

    def log_event_files(self, event: SampleEvent) -> list[dict[str, Any]]:
        """The event's own artifacts (texts and table); returns its table rows."""
        for s in event.samples:
            self.client.log_text(self.run_id, s.prompt, sample_text_path(event, s.index, "prompt"))
            self.client.log_text(self.run_id, s.generation, sample_text_path(event, s.index, "generation"))
            if s.reference is not None:
                self.client.log_text(self.run_id, s.reference, sample_text_path(event, s.index, "reference"))
        rows = [{k: json_safe(v) for k, v in row.items()} for row in event.table_rows()]
        if rows:
            self.client.log_table(self.run_id, table_columns(rows), step_table_path(event.prefix, event.step))
        return rows

    def _log_cumulative(self, prefix: str, rows: list[dict[str, Any]]) -> None:
        artifact_file = all_table_path(prefix)
        if prefix not in self._all_rows:
            self._all_rows[prefix] = self._read_table(artifact_file) if self._resumed else None
        previous = self._all_rows[prefix]
        if previous is None:  # first table of this prefix in this run: log_table registers it
            self.client.log_table(self.run_id, table_columns(rows), artifact_file)
            self._all_rows[prefix] = list(rows)
            return
        previous.extend(rows)
        self.overwrite_table(artifact_file, previous)

    def overwrite_table(self, artifact_file: str, rows: list[dict[str, Any]]) -> None:
        """Rewrite a table artifact that exists (log_table would download and append to it)."""
        columns = table_columns(rows)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / posixpath.basename(artifact_file)
            data = [list(values) for values in zip(*columns.values())]
            local.write_text(json.dumps({"columns": list(columns), "data": data}, default=str))
            self.client.log_artifact(self.run_id, str(local), posixpath.dirname(artifact_file) or None)

    def _read_table(self, artifact_file: str) -> Optional[list[dict[str, Any]]]:
        """Rows of a table artifact of this run, or None when there is none."""
        listed = {f.path for f in self.client.list_artifacts(self.run_id, posixpath.dirname(artifact_file) or None)}
        if artifact_file not in listed:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            table = json.loads(Path(self.client.download_artifacts(self.run_id, artifact_file, tmp)).read_text())
        return [dict(zip(table["columns"], row)) for row in table["data"]]

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.client.set_terminated(self.run_id, status=RunStatus.to_string(RunStatus.FINISHED))

