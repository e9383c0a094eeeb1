"""Put on a tracker what it missed during a run, from the run directory.

    python -m trainer.tracking sync RUN_DIR --to mlflow [--run-id ID] [--tracking-uri URI]

The run directory is the complete record of a run (`metrics.jsonl`, `samples.jsonl`,
`config.json`, `report.html`); a remote tracker may lack what the fan-out dropped while its
server was away. `trackers.json` (written by the run) names the tracker's run, so the replay
fills that run rather than creating another.

MLflow: adds each (metric, step) the server lacks (read with `get_metric_history`, so running it
twice adds nothing), the params it lacks, each sample event whose table artifact is missing
(texts and table, then the cumulative table rewritten in step order), the latest `report.html`,
and marks the run FINISHED when the run directory says it finished and the server still has it
running. Server: `--tracking-uri`, else the one recorded (unless it held credentials, which are
never recorded), else `MLFLOW_TRACKING_URI`.

W&B and SwanLab keep their own complete record of every call that reached them, online or
offline, in the run directory (`wandb/`, `swanlog/`); their own `wandb sync` / `swanlab sync`
upload it, and this command prints which one to run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Callable, Optional

from config.env import TrackerEnv, apply_client_bounds, tracker_env
from config.loading import redact_credentials
from trainer.tracking.base import RECORD_FILE, SampleEvent, SampleRecord, TrackerContext, read_run_records
from trainer.tracking.file import METRICS_FILE, read_records

SAMPLES_FILE = "samples.jsonl"  # written by trainer.history
CONFIG_FILE = "config.json"  # written by the file tracker
REPORT_FILE = "report.html"


class SyncError(RuntimeError):
    """Bad input to `sync`: one line naming the culprit."""


def _steps_text(steps: list[int]) -> str:
    steps = sorted(set(steps))
    if not steps:
        return ""
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"


def _latest_metrics(run_dir: Path) -> dict[tuple[str, int], tuple[float, Optional[float]]]:
    """{(metric, step): (value, unix time)} from metrics.jsonl; a later record of a step wins
    (a resumed run logs the steps after its checkpoint again)."""
    latest: dict[tuple[str, int], tuple[float, Optional[float]]] = {}
    for record in read_records(run_dir / METRICS_FILE):
        step, when = int(record.pop("step")), record.pop("time", None)
        for key, value in record.items():
            latest[(key, step)] = (float(value), when)
    return latest


def _sample_events(run_dir: Path) -> list[SampleEvent]:
    samples = [r for r in read_records(run_dir / SAMPLES_FILE) if r.get("kind") == "sample"]
    events = []
    for (prefix, step, stage), group in itertools.groupby(samples, key=lambda r: (r["prefix"], r["step"], r["stage"])):
        records = [
            SampleRecord(index=r["index"], prompt=r["prompt"], generation=r["generation"], reference=r.get("reference"),
                         rewards=dict(r.get("rewards") or {}), prompt_id=r.get("prompt_id", ""))
            for r in group
        ]
        events.append(SampleEvent(step=int(step), stage=stage, prefix=prefix, style="validation", samples=records))
    return events


def sync_mlflow(run_dir: Path, run_id: Optional[str], tracking_uri: Optional[str], env: TrackerEnv) -> str:
    record = read_run_records(run_dir).get("mlflow", {})
    run_id = run_id or record.get("run_id")
    if not run_id:
        raise SyncError(f"{run_dir / RECORD_FILE} names no mlflow run: pass --run-id")
    recorded_uri = record.get("tracking_uri")
    if recorded_uri and "***" in recorded_uri:
        recorded_uri = None  # it held credentials, which were not kept
    apply_client_bounds(env.client_bounds)  # a server that is still away fails fast here too
    from mlflow.entities import Metric

    from trainer.report import read_run_state
    from trainer.tracking.mlflow_tracker import (
        MlflowTracker,
        all_table_path,
        clean_key,
        default_tracking_uri,
        json_safe,
        step_table_path,
        table_columns,
    )

    uri = tracking_uri or recorded_uri or env.mlflow_tracking_uri or default_tracking_uri(run_dir)
    ctx = TrackerContext(run_dir, "", "", TrackerEnv(uri, None, None))
    try:
        tracker = MlflowTracker(ctx, run_id=run_id)
    except Exception as err:  # noqa: BLE001 - one line, whatever MLflow raised
        first = redact_credentials(str(err)).strip().splitlines()[:1]
        raise SyncError(f"mlflow run {run_id} at {redact_credentials(uri)}: {type(err).__name__}: {' '.join(first)}") from None
    client = tracker.client
    done: list[str] = []

    # Metrics: only the (metric, step) pairs the server lacks.
    by_key: dict[str, list[tuple[int, float, Optional[float]]]] = {}
    for (key, step), (value, when) in _latest_metrics(run_dir).items():
        by_key.setdefault(clean_key(key), []).append((step, value, when))
    missing: list = []
    for key, points in sorted(by_key.items()):
        have = {m.step for m in client.get_metric_history(run_id, key)}
        missing.extend(Metric(key, value, int((when or 0) * 1000), step) for step, value, when in sorted(points) if step not in have)
    for start in range(0, len(missing), 1000):
        client.log_batch(run_id, metrics=missing[start : start + 1000])
    if missing:
        done.append(f"{len(missing)} metric values ({_steps_text([m.step for m in missing])})")

    # Params (and config.json) from the run's config.
    config_path = run_dir / CONFIG_FILE
    if config_path.is_file():
        before = len(tracker.params)
        tracker.log_config(json.loads(config_path.read_text()))
        if len(tracker.params) > before:
            done.append(f"{len(tracker.params) - before} params")

    # Sample events whose table is missing; then each touched prefix's cumulative table.
    events = _sample_events(run_dir)
    listed: dict[str, set[str]] = {}
    replayed: list[SampleEvent] = []
    for event in events:
        if event.prefix not in listed:
            listed[event.prefix] = {f.path for f in client.list_artifacts(run_id, event.prefix)}
        if step_table_path(event.prefix, event.step) not in listed[event.prefix]:
            tracker.log_event_files(event)
            replayed.append(event)
    for prefix in sorted({e.prefix for e in replayed}):
        rows = [{k: json_safe(v) for k, v in row.items()} for e in events if e.prefix == prefix for row in e.table_rows()]
        if all_table_path(prefix) in listed[prefix]:
            tracker.overwrite_table(all_table_path(prefix), rows)
        else:
            client.log_table(run_id, table_columns(rows), all_table_path(prefix))
    if replayed:
        done.append(f"{len(replayed)} sample events ({_steps_text([e.step for e in replayed])})")

    if (run_dir / REPORT_FILE).is_file():
        tracker.log_artifact(run_dir / REPORT_FILE)  # replaces the server's copy, which may be stale
    if read_run_state(run_dir).get("status") == "finished" and client.get_run(run_id).info.status == "RUNNING":
        tracker.close()  # set_terminated(FINISHED): the run's own close could not reach the server
        done.append("run marked FINISHED")
    where = f"mlflow run {run_id} at {redact_credentials(uri)}"
    return f"{where}: added {', '.join(done)}" if done else f"{where}: nothing missing"


def _native_sync(name: str, command: str) -> Callable[..., str]:
    def sync(run_dir: Path, run_id: Optional[str], tracking_uri: Optional[str], env: TrackerEnv) -> str:  # noqa: ARG001
        record = read_run_records(run_dir).get(name)
        if not record or not record.get("dir"):
            raise SyncError(f"{run_dir / RECORD_FILE} names no {name} run")
        return (f"{name} keeps every call that reached it in {record['dir']}; upload it with: {command} {record['dir']}"
                f" (calls the run's log reports as dropped for 'tracker {name}' are not in it)")

    return sync


SYNCERS: dict[str, Callable[..., str]] = {
    "mlflow": sync_mlflow,
    "wandb": _native_sync("wandb", "wandb sync"),
    "swanlab": _native_sync("swanlab", "swanlab sync"),
}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.tracking", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sync = commands.add_parser("sync", help="put on a tracker what it missed, from the run directory")
    sync.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    sync.add_argument("--to", required=True, choices=sorted(SYNCERS), help="the tracker to fill")
    sync.add_argument("--run-id", help="the tracker's run (default: the one in RUN_DIR/trackers.json)")
    sync.add_argument("--tracking-uri", help="MLflow server (default: the one recorded, else MLFLOW_TRACKING_URI)")
    args = parser.parse_args(argv)
    if not (args.run_dir / METRICS_FILE).is_file():
        print(f"sync: {args.run_dir} has no {METRICS_FILE}: not a run directory", file=sys.stderr)
        return 2
    try:
        print(SYNCERS[args.to](args.run_dir.resolve(), args.run_id, args.tracking_uri, tracker_env()))
    except SyncError as err:
        print(f"sync: {err}", file=sys.stderr)
        return 2
    return 0
