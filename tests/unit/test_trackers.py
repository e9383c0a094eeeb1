"""Tracker backends: each one writes through the fan-out and is read back with its own reader.

No network: MLflow uses a SQLite file in the run directory, SwanLab and W&B run offline,
TensorBoard writes event files.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from config.env import TrackerEnv
from trainer.tracking import base
from trainer.tracking.base import (
    SampleEvent,
    SampleRecord,
    Tracker,
    TrackerContext,
    TrackerUnavailable,
    Tracking,
    check_available,
)
from trainer.tracking.file import read_metrics, read_records

PROJECT = "unit_proj"
EXPERIMENT = "unit_run"
CONFIG = {
    "optim": {"lr": 0.001, "betas": [0.9, 0.95]},
    "model": {"name": "tiny"},
    "note": "x" * 7000,  # longer than MLflow's param limit
}
METRICS = {1: {"train/loss": 1.5, "train/lr": 0.001}, 2: {"train/loss": 0.5, "train/lr": 0.0005}}
REPORT_HTML = "<html><body><h1>Training report</h1></body></html>"
LIVE_REPORT_HTML = "<html><body><h1>Live report, step 1</h1></body></html>"


def prompt(i: int) -> str:
    return f"prompt {i}: 2+{i}="


def generation(step: int, i: int) -> str:
    return f"answer {i} at step {step} | with a pipe\nand a second line"


def sample_event(step: int) -> SampleEvent:
    samples = [
        SampleRecord(index=i, prompt=prompt(i), generation=generation(step, i), reference=str(2 + i)) for i in (1, 2)
    ]
    return SampleEvent(step=step, stage="validation", prefix="val", style="validation", samples=samples)


def make_ctx(tmp_path: Path, wandb_mode: str | None = "offline") -> TrackerContext:
    env = TrackerEnv(mlflow_tracking_uri=None, swanlab_mode=None, wandb_mode=wandb_mode)
    return TrackerContext(run_dir=tmp_path / "run", project_name=PROJECT, experiment_name=EXPERIMENT, env=env)


def run_backend(name: str, ctx: TrackerContext, caplog: pytest.LogCaptureFixture) -> Tracker:
    """Config, metrics and samples at steps 1 and 2, an HTML report, close (twice)."""
    tracking = Tracking([name], ctx, is_primary=True)
    assert tracking.names == [name], caplog.text
    backend = tracking.backends[0]
    tracking.log_config(CONFIG)
    report = ctx.run_dir / "report.html"
    for step in (1, 2):
        tracking.log_metrics(METRICS[step], step)
        tracking.log_samples(sample_event(step))
        if step == 1:  # the live report, re-logged after a sample event (to the backends that replace it)
            report.write_text(LIVE_REPORT_HTML)
            tracking.replace_artifact(report)
    report.write_text(REPORT_HTML)
    tracking.log_artifact(report)
    assert tracking.names == [name], caplog.text  # the fan-out drops a backend that raised
    tracking.close()
    backend.close()  # a second close does nothing
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("trainer")]
    assert warnings == []
    return backend


def rows_of(table: dict) -> list[dict]:
    return [dict(zip(table["columns"], row)) for row in table["data"]]


# ---------------------------------------------------------------- MLflow


def test_mlflow_round_trip_and_resume(tmp_path, caplog):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    ctx = make_ctx(tmp_path)
    backend = run_backend("mlflow", ctx, caplog)
    uri = f"sqlite:///{(ctx.run_dir / 'mlflow.db').resolve()}"
    assert backend.tracking_uri == uri

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(PROJECT)
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run.info.run_name == EXPERIMENT
    assert run.info.status == "FINISHED"
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")) == [(1, 1.5), (2, 0.5)]
    assert run.data.params["optim.lr"] == "0.001"
    assert run.data.params["optim.betas"] == "[0.9, 0.95]"
    assert len(run.data.params["note"]) == 6000

    downloads = tmp_path / "downloads"

    def read(artifact: str) -> str:
        return Path(client.download_artifacts(run_id, artifact, str(downloads))).read_text()

    for step in (1, 2):
        for i in (1, 2):
            assert read(f"val/step_{step:08d}/sample_{i}_prompt.txt") == prompt(i)
            assert read(f"val/step_{step:08d}/sample_{i}_generation.txt") == generation(step, i)
            assert read(f"val/step_{step:08d}/sample_{i}_reference.txt") == str(2 + i)
    step_rows = rows_of(json.loads(read("val/samples_step_00000002.json")))
    assert [(r["step"], r["sample"], r["generation"]) for r in step_rows] == [(2, i, generation(2, i)) for i in (1, 2)]
    all_rows = rows_of(json.loads(read("val/samples_all.json")))
    assert [(r["step"], r["sample"], r["generation"]) for r in all_rows] == [
        (step, i, generation(step, i)) for step in (1, 2) for i in (1, 2)
    ]
    assert all_rows[0]["prompt"] == prompt(1) and all_rows[0]["reference"] == "3"
    tables = {a["path"] for a in json.loads(run.data.tags["mlflow.loggedArtifacts"]) if a["type"] == "table"}
    assert {"val/samples_all.json", "val/samples_step_00000002.json"} <= tables  # the UI lists them as tables
    assert json.loads(read("config.json")) == CONFIG
    assert read("report.html") == REPORT_HTML

    # A run that did not finish (the process died) is resumed, not duplicated.
    client.set_terminated(run_id, "FAILED")
    tracking = Tracking(["mlflow"], ctx, is_primary=True)
    assert tracking.backends[0].run_id == run_id
    with caplog.at_level(logging.WARNING):
        tracking.log_config({**CONFIG, "model": {"name": "other"}})  # a param cannot change: warned, kept
        assert tracking.flush(60)  # the warning comes from the tracker's own thread
    assert any("model.name" in r.getMessage() for r in caplog.records)
    tracking.log_metrics({"train/loss": 0.25}, 3)
    tracking.log_samples(sample_event(3))
    assert tracking.names == ["mlflow"]
    live = ctx.run_dir / "report.html"
    live.write_text(REPORT_HTML.replace("Training", "Live"))
    tracking.replace_artifact(live)  # the live report overwrites the artifact logged before
    tracking.close()
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3]
    all_rows = rows_of(json.loads(read("val/samples_all.json")))
    assert [r["step"] for r in all_rows] == [1, 1, 2, 2, 3, 3]
    assert read("report.html") == REPORT_HTML.replace("Training", "Live")
    assert [a.path for a in client.list_artifacts(run_id) if a.path.endswith(".html")] == ["report.html"]

    # A finished run is left alone.
    tracking = Tracking(["mlflow"], ctx, is_primary=True)
    assert tracking.backends[0].run_id != run_id
    tracking.close()


# ---------------------------------------------------------------- TensorBoard


def test_tensorboard_round_trip(tmp_path, caplog):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    ctx = make_ctx(tmp_path)
    run_backend("tensorboard", ctx, caplog)
    acc = EventAccumulator(str(ctx.run_dir / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.5), (2, 0.5)]

    def texts(tag: str) -> dict[int, str]:
        # PyTorch's add_text stores a string tensor under "<tag>/text_summary" (text plugin).
        events = acc.Tensors(f"{tag}/text_summary")
        return {e.step: tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in events}

    assert texts("val/sample_1_prompt") == {1: prompt(1), 2: prompt(1)}
    assert texts("val/sample_1_generation") == {1: generation(1, 1), 2: generation(2, 1)}
    assert texts("val/sample_2_generation") == {1: generation(1, 2), 2: generation(2, 2)}
    assert texts("val/sample_2_reference") == {1: "4", 2: "4"}
    table = texts("val/samples")[2]
    assert "| sample | prompt | reference | generation |" in table
    assert "answer 1 at step 2 \\| with a pipe<br>and a second line" in table
    config_text = texts("config")[0]
    assert config_text.startswith("```json\n") and config_text.endswith("\n```")
    assert json.loads(config_text[len("```json\n") : -len("\n```")]) == CONFIG
    (note,) = texts("artifacts").values()
    assert "HTML" in note and str((ctx.run_dir / "report.html").resolve()) in note


# ---------------------------------------------------------------- SwanLab


def test_swanlab_offline_round_trip(tmp_path, caplog, capsys):
    pytest.importorskip("swanlab")
    import yaml
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.proto.swanlab.run.v1.run_pb2 import RunState
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    ctx = make_ctx(tmp_path)  # swanlab_mode None -> offline
    threads_before = set(threading.enumerate())
    excepthook_before = sys.excepthook
    backend = run_backend("swanlab", ctx, caplog)

    # Printing still reaches (captured) stdout, and SwanLab left no thread or hook behind.
    print("stdout still works")
    assert "stdout still works" in capsys.readouterr().out
    assert [t.name for t in threading.enumerate() if t not in threads_before] == []
    assert sys.excepthook is excepthook_before

    (run_file,) = (ctx.run_dir / "swanlog").glob("run-*/run-*.swanlab")
    assert run_file.parent == backend.run_dir
    reader = DataStoreReader()
    reader.open(run_file)
    records = []
    for raw in reader:
        record = Record()
        record.ParseFromString(raw)
        records.append(record)
    reader.close()
    by_type: dict[str, list] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        by_type.setdefault(kind, []).append(getattr(record, kind))

    (start,) = by_type["start"]
    assert (start.project, start.name) == (PROJECT, EXPERIMENT)
    (finish,) = by_type["finish"]
    assert finish.state == RunState.RUN_STATE_FINISHED
    scalars = {(s.key, s.step): s.value.number for s in by_type["scalar"]}
    assert scalars[("train/loss", 1)] == 1.5 and scalars[("train/loss", 2)] == 0.5

    media = {(m.key, m.step): list(m.value.items) for m in by_type["media"]}

    def text_of(item) -> str:
        return (run_file.parent / "media" / "text" / item.filename).read_text()

    for step in (1, 2):
        (item,) = media[("val/sample_1_prompt", step)]
        assert text_of(item) == prompt(1)
        (item,) = media[("val/sample_2_generation", step)]
        assert text_of(item) == generation(step, 2)
    listing = media[("val/samples", 2)]
    assert [text_of(item) for item in listing] == [generation(2, 1), generation(2, 2)]
    assert [item.caption for item in listing] == [f"sample {i}: {prompt(i)}" for i in (1, 2)]
    (report,) = media[("report", 2)]
    assert (run_file.parent / "media" / "html" / report.filename).read_text() == REPORT_HTML
    (live,) = media[("report", 1)]  # the live report, logged at its event
    assert (run_file.parent / "media" / "html" / live.filename).read_text() == LIVE_REPORT_HTML

    saved_config = yaml.safe_load((run_file.parent / "files" / "config.yaml").read_text())
    assert saved_config["optim"]["value"] == CONFIG["optim"]


# ---------------------------------------------------------------- Weights & Biases


def test_wandb_offline_round_trip(tmp_path, caplog, monkeypatch):
    pytest.importorskip("wandb")
    # W&B has no setting for where it stages table artifacts and keeps its caches and user
    # settings: keep them out of $HOME for the test.
    for variable, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(variable, str(tmp_path / "wandb_home" / sub))

    ctx = make_ctx(tmp_path, wandb_mode=None)  # None -> offline
    threads_before = set(threading.enumerate())
    backend = run_backend("wandb", ctx, caplog)
    assert [t.name for t in threading.enumerate() if t not in threads_before] == []  # service torn down

    (run_file,) = (ctx.run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert run_file.parent == backend.run_dir
    # W&B's own reader of the record log ("wandb leet inspect", run by wandb-core).
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    history: dict[int, dict] = {}
    for record in records:
        if record["type"] == "history":
            item = record["history"]["item"]
            history.setdefault(item["_step"], {}).update(item)
    assert history[1]["train/loss"] == 1.5 and history[2]["train/loss"] == 0.5
    for step in (1, 2):
        assert history[step]["val/sample_1_prompt"] == prompt(1)
        assert history[step]["val/sample_2_generation"] == generation(step, 2)
        assert history[step]["val/sample_2_reference"] == "4"

    files = run_file.parent / "files"
    step_table = json.loads((files / history[2]["val/samples.path"]).read_text())
    assert [(r["step"], r["sample"], r["generation"]) for r in rows_of(step_table)] == [
        (2, i, generation(2, i)) for i in (1, 2)
    ]
    # The cumulative table is incremental: each step's log holds only that step's new rows,
    # and together they are every event so far.
    increments = [json.loads((files / history[step]["val/samples_all.path"]).read_text()) for step in (1, 2)]
    assert [(r["step"], r["sample"], r["prompt"]) for t in increments for r in rows_of(t)] == [
        (step, i, prompt(i)) for step in (1, 2) for i in (1, 2)
    ]
    assert history[2]["val/samples_all._type"] == "incremental-table-file"
    assert history[2]["report._type"] == "html-file"
    assert (files / history[2]["report.path"]).read_text() == REPORT_HTML
    assert (files / "report.html").read_text() == REPORT_HTML  # the live file, kept current
    assert "report" not in history[1]  # the live report is a file of the run, not a media entry per event

    config: dict = {}
    for record in records:
        if record["type"] == "config":
            config.update(record["config"]["update"])
    assert config["optim"] == CONFIG["optim"] and config["model"] == CONFIG["model"]


# ---------------------------------------------------------------- the fan-out


class _Exploding(Tracker):
    name = "exploding"
    closed = 0

    def log_metrics(self, metrics, step):
        if step >= 2:
            raise RuntimeError("backend is down")

    def close(self):
        type(self).closed += 1


class _BrokenStart(Tracker):
    name = "broken_start"

    def __init__(self, ctx):
        raise ConnectionError("no server")


def test_failing_backend_is_disabled_and_the_others_go_on(tmp_path, caplog, monkeypatch):
    monkeypatch.setitem(base._CLASSES, "exploding", _Exploding)
    monkeypatch.setitem(base._CLASSES, "broken_start", _BrokenStart)
    monkeypatch.setattr(_Exploding, "closed", 0)
    ctx = make_ctx(tmp_path)
    with caplog.at_level(logging.WARNING, logger="trainer.tracking.base"):
        tracking = Tracking(["file", "exploding", "broken_start"], ctx, is_primary=True)
        assert tracking.names == ["file", "exploding"]
        for step, loss in ((1, 1.0), (2, 0.5), (3, 0.25)):
            tracking.log_metrics({"loss": loss}, step)
    assert tracking.names == ["file"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "broken_start failed to start" in warnings[0] and "no server" in warnings[0]
    assert "exploding failed in log_metrics" in warnings[1] and "backend is down" in warnings[1]
    assert _Exploding.closed == 1  # closed once when dropped, not again by Tracking.close()
    tracking.close()
    assert _Exploding.closed == 1
    assert read_metrics(ctx.run_dir) == {1: {"loss": 1.0}, 2: {"loss": 0.5}, 3: {"loss": 0.25}}


def test_missing_package_names_the_extra_to_install(tmp_path, monkeypatch):
    # Make `import mlflow` fail as if it were not installed (None in sys.modules blocks an import).
    for module in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.delitem(sys.modules, "trainer.tracking.mlflow_tracker", raising=False)
    monkeypatch.delitem(base._CLASSES, "mlflow", raising=False)

    with pytest.raises(TrackerUnavailable) as err:
        check_available(["console", "file", "mlflow"])
    message = str(err.value)
    assert "\n" not in message
    assert message == "trainer.logger: mlflow needs the 'mlflow' package: pip install 'sample-aware-trainer[mlflow]'"
    with pytest.raises(TrackerUnavailable, match="mlflow"):
        Tracking(["file", "mlflow"], make_ctx(tmp_path), is_primary=True)

    with pytest.raises(TrackerUnavailable, match=r"unknown tracker 'nope' \(known: console, file, mlflow"):
        check_available(["nope"])


def test_non_primary_rank_creates_no_backend_and_writes_nothing(tmp_path):
    ctx = make_ctx(tmp_path)
    tracking = Tracking(["file", "tensorboard", "mlflow", "swanlab", "wandb"], ctx, is_primary=False)
    assert tracking.backends == [] and tracking.names == []
    tracking.log_config(CONFIG)
    tracking.log_metrics(METRICS[1], 1)
    tracking.log_samples(sample_event(1))
    tracking.log_artifact(tmp_path / "report.html")
    tracking.close()
    assert list(tmp_path.iterdir()) == []


def test_jsonl_reader_keeps_every_complete_record_and_survives_any_broken_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    torn = '{"step": 3, "note": "caf\u00e9"}'.encode()[:-3]  # a crash cut the last line inside a character
    path.write_bytes(b'{"step": 1, "loss": 1.0}\n[1, 2]\n{"step": 2, "lo\n{"step": 2, "loss": 0.5}\n' + torn)
    assert read_records(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    assert read_metrics(tmp_path) == {1: {"loss": 1.0}, 2: {"loss": 0.5}}
    assert read_records(tmp_path / "missing.jsonl") == []


def test_credentials_in_a_tracker_uri_never_reach_the_log(tmp_path, monkeypatch, capfd):
    """MLflow names its tracking URI in its errors; a URI with credentials must not reach the
    console or a log file (stderr), from our lines or a library's."""
    pytest.importorskip("mlflow")
    from trainer.cli import setup_logging

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refused port: fail at once
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(logging.INFO, 0)
        env = TrackerEnv(mlflow_tracking_uri="http://alice:s3cr3t-token@127.0.0.1:9", swanlab_mode=None, wandb_mode=None)
        tracking = Tracking(["mlflow"], TrackerContext(tmp_path / "run", PROJECT, EXPERIMENT, env), is_primary=True)
        logging.getLogger("mlflow.anything").warning("connecting to %s", env.mlflow_tracking_uri)  # a library's own line
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    err = capfd.readouterr().err
    assert tracking.names == []  # it failed to start, with a warning naming where
    assert "tracker mlflow failed to start" in err and "http://***@127.0.0.1:9" in err, err
    assert "connecting to http://***@127.0.0.1:9" in err
    assert "s3cr3t" not in err and "alice" not in err
