"""A real MLflow server that goes away in the middle of an SFT run (in this process, one rank).

The server is stopped right after the first validation's samples reached it. The run must keep
its pace (step-time ratio within the run), warn once in its own words, keep `metrics.jsonl`
complete, and finish; once the server is back, `python -m trainer.tracking sync` puts the
missed steps and sample events on the same MLflow run, and a second sync adds nothing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

import trainer.fsdp_sft_trainer as sft
from config.env import TRACKER_CLIENT_BOUNDS, DistEnv
from config.loading import resolve
from config.schema import SFTConfig
from trainer.distributed import init_distributed
from trainer.tracking.base import read_run_records
from trainer.tracking.file import read_metrics, read_records
from trainer.tracking.sync import main as tracking_main

from helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
STEPS, TEST_FREQ = 16, 8  # 64 training rows, 8 per step: one epoch per validation


def start_server(workdir: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on a SQLite store in `workdir` (artifacts under it too), ready to serve."""
    log = open(workdir / f"server-{time.time_ns()}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # No job-executor processes (a huey consumer and its workers): nothing here uses them.
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, (workdir / log.name).read_text()[-2000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    stop_server(proc)
    pytest.fail(f"mlflow server did not start on port {port}")


def stop_server(proc: subprocess.Popen) -> None:
    """The server and its workers (its own process group, started above)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def make_trainer(tiny_model, tiny_data, run_dir: Path) -> sft.FSDPSFTTrainer:
    overrides = [
        f"model.partial_pretrain={tiny_model}", f"data.train_files={tiny_data['train']}", f"data.val_files={tiny_data['val']}",
        f"trainer.default_local_dir={run_dir}", "trainer.logger=[console,file,mlflow]", "trainer.log_freq=1",
        "data.max_length=24", "data.train_batch_size=8", "data.micro_batch_size_per_gpu=8", "generation.max_new_tokens=4",
        "data.prompt_key=prompt", "data.response_key=response", f"trainer.total_training_steps={STEPS}",
        f"trainer.test_freq={TEST_FREQ}", "trainer.save_freq=-1", "trainer.export_hf_model=false",
        "trainer.max_val_samples=2",
    ]
    with initialize_config_module(config_module="config", version_base="1.3"):
        cfg = compose("sft_trainer", overrides=overrides)
    return sft.FSDPSFTTrainer(resolve(cfg, SFTConfig, overrides, {}).config, init_distributed(DistEnv(0, 0, 1, False), "cpu"))


def step_seconds(run_dir: Path, steps: range) -> list[float]:
    """Time between the train metrics of consecutive steps, leaving out steps that follow a
    validation (their interval holds the validation, and for the first one the server's stop)."""
    times = {}
    for record in read_records(run_dir / "metrics.jsonl"):
        if "train/loss" in record:
            times[record["step"]] = record["time"]
    return [times[s] - times[s - 1] for s in steps if (s - 1) % TEST_FREQ != 0]


def test_mlflow_server_going_away_costs_no_pace_and_sync_fills_it_afterwards(tiny_model, tiny_data, tmp_path, monkeypatch, caplog,
                                                                             capsys):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    server_dir = tmp_path / "server"
    server_dir.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    for bound in TRACKER_CLIENT_BOUNDS:  # what the run sets, undone after the test
        monkeypatch.setenv(bound.variable, os.environ.get(bound.variable, bound.value))
    server = start_server(server_dir, port)
    try:
        run_dir = tmp_path / "run"
        trainer = make_trainer(tiny_model, tiny_data, run_dir)
        log_samples, stopped = trainer.run.tracking.log_samples, []

        def log_samples_then_stop_the_server(event):
            log_samples(event)
            if not stopped:
                assert trainer.run.tracking.flush(60)  # everything so far is on the server
                stop_server(server)
                stopped.append((event.step, time.perf_counter()))

        monkeypatch.setattr(trainer.run.tracking, "log_samples", log_samples_then_stop_the_server)
        log_metrics, in_calls = trainer.run.tracking.log_metrics, []  # (start, seconds the trainer spent in the call)

        def timed_log_metrics(metrics, step):
            started = time.perf_counter()
            log_metrics(metrics, step)
            in_calls.append((started, time.perf_counter() - started))

        monkeypatch.setattr(trainer.run.tracking, "log_metrics", timed_log_metrics)
        with caplog.at_level(logging.INFO):
            trainer.fit()
        (stopped_at_step, stopped_at), = stopped
        assert stopped_at_step == TEST_FREQ

        # The pace held: median step time after the stop within a small factor of before (loose:
        # other jobs share these cores), and the trainer spent next to none of it in tracker calls
        # (with MLflow called in line, each call would wait out its retries: seconds).
        before = statistics.median(step_seconds(run_dir, range(2, TEST_FREQ + 1)))
        after_steps = step_seconds(run_dir, range(TEST_FREQ + 2, STEPS + 1))
        after = statistics.median(after_steps)
        assert after < 3 * before, (before, after)
        spent_after = sum(seconds for started, seconds in in_calls if started > stopped_at)
        assert spent_after < 0.05 * (in_calls[-1][0] - stopped_at), (spent_after, in_calls[-1][0] - stopped_at)
        # One warning named mlflow while training, one at close saying what was not sent.
        ours = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("trainer")]
        named = [m for m in ours if "mlflow" in m]
        assert len(named) == 2, named
        assert named[0].startswith("tracker mlflow: ") and "dropped until it answers again; training goes on" in named[0]
        assert "calls were not sent" in named[1] and f"sync {run_dir} --to mlflow" in named[1]
        assert not any(r.getMessage().startswith("Retrying") for r in caplog.records)  # urllib3's per-retry lines
        metrics = read_metrics(run_dir)
        assert all("train/loss" in metrics[s] for s in range(1, STEPS + 1))  # the run's own record is complete
        assert {s for s, m in metrics.items() if "val/loss" in m} == {8, 16}

        server = start_server(server_dir, port)  # the server is back, with what it had
        record = read_run_records(run_dir)["mlflow"]
        assert record["tracking_uri"] == uri
        client = MlflowClient(tracking_uri=uri)
        run_id = record["run_id"]
        on_server = [m.step for m in client.get_metric_history(run_id, "train/loss")]
        assert set(range(1, TEST_FREQ + 1)) <= set(on_server) and len(on_server) < STEPS

        out = subprocess.run(
            [sys.executable, "-m", "trainer.tracking", "sync", str(run_dir), "--to", "mlflow"],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert out.returncode == 0, out.stderr
        summary = out.stdout.strip().splitlines()[-1]  # MLflow prints its "View run" links before it
        assert summary.startswith(f"mlflow run {run_id} at {uri}: added ") and "1 sample events (step 16)" in summary, summary
        assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(1, STEPS + 1))
        assert sorted(m.step for m in client.get_metric_history(run_id, "val/loss")) == [8, 16]
        tables = {f.path for f in client.list_artifacts(run_id, "val")}
        assert {f"val/samples_step_{s:08d}.json" for s in (8, 16)} <= tables
        everything = json.loads(Path(client.download_artifacts(run_id, "val/samples_all.json", str(tmp_path))).read_text())
        assert [row[everything["columns"].index("step")] for row in everything["data"]] == [8, 8, 16, 16]  # in step order
        assert client.get_run(run_id).info.status == "FINISHED"

        capsys.readouterr()
        assert tracking_main(["sync", str(run_dir), "--to", "mlflow"]) == 0  # again: nothing to add
        assert capsys.readouterr().out.strip().splitlines()[-1] == f"mlflow run {run_id} at {uri}: nothing missing"
        assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(1, STEPS + 1))
    finally:
        stop_server(server)


def test_sync_names_what_is_missing_in_one_line(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert tracking_main(["sync", str(tmp_path), "--to", "mlflow"]) == 2
    assert capsys.readouterr().err == f"sync: {tmp_path / 'trackers.json'} names no mlflow run: pass --run-id\n"
    assert tracking_main(["sync", str(tmp_path / "nope"), "--to", "mlflow"]) == 2
    assert capsys.readouterr().err == f"sync: {tmp_path / 'nope'} has no metrics.jsonl: not a run directory\n"
    assert tracking_main(["sync", str(tmp_path), "--to", "wandb"]) == 2
    assert capsys.readouterr().err == f"sync: {tmp_path / 'trackers.json'} names no wandb run\n"
