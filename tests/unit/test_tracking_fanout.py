"""The tracker fan-out's sender threads: a slow, failing or stuck remote tracker never holds up
the caller, warns once, drops (and says so), resumes when it answers, and closes in bounded time.

Fake remote trackers stand in for a server: they block on an Event or raise while "down".
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from pathlib import Path

import pytest

from config.env import TRACKER_CLIENT_BOUNDS, TrackerEnv, apply_client_bounds, tracker_env
from trainer.tracking import base
from trainer.tracking.base import SampleEvent, SampleRecord, Tracker, TrackerContext, Tracking, read_run_records
from trainer.tracking.file import read_metrics


def make_ctx(tmp_path: Path) -> TrackerContext:
    return TrackerContext(tmp_path / "run", "proj", "exp", TrackerEnv(None, None, None))


class _Remote(Tracker):
    """Records every call it gets, in order; `gate` (when set) must open before a call returns;
    `down` makes calls raise as if the server were unreachable."""

    remote = True
    replaces_artifacts = True
    instance: "_Remote | None" = None
    gate: threading.Event | None = None
    down = False

    def __init__(self, ctx):
        super().__init__(ctx)
        self.calls: list[tuple] = []
        type(self).instance = self

    def _call(self, *record) -> None:
        if type(self).gate is not None:
            type(self).gate.wait()
        if type(self).down:
            raise ConnectionError("Connection refused")
        self.calls.append(record)

    def log_metrics(self, metrics, step):
        self._call("metrics", step, dict(metrics))

    def log_samples(self, event):
        self._call("samples", event.step, [s.generation for s in event.samples])

    def replace_artifact(self, path):
        self._call("replace", Path(path).name, Path(path).read_text())

    def run_record(self):
        return {"run_id": "r-1", "tracking_uri": "http://alice:s3cr3t@example.org:5000"}


@pytest.fixture()
def remote(monkeypatch):
    class Fake(_Remote):
        gate = None
        down = False
        instance = None

    monkeypatch.setitem(base._CLASSES, "fake", Fake)
    monkeypatch.setattr(base, "REST_S", (0.05, 0.2))
    return Fake


def fanout_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "trainer.tracking.base"]


def test_a_stalled_tracker_costs_the_caller_nothing_drops_beyond_its_queue_and_resumes(tmp_path, remote, caplog):
    remote.gate = threading.Event()  # the "server" holds every call until the gate opens
    ctx = make_ctx(tmp_path)
    caplog.set_level(logging.INFO, logger="trainer.tracking.base")
    tracking = Tracking(["file", "fake"], ctx, is_primary=True, queue_size=4, call_budget_s=0.05)
    tracking.log_metrics({"loss": 1.0}, 1)
    time.sleep(0.1)  # that call is now over its budget
    started = time.perf_counter()
    for step in range(2, 21):
        tracking.log_metrics({"loss": 1.0 / step}, step)
    caller_s = time.perf_counter() - started
    assert caller_s < 1.0  # 19 calls; the tracker has not answered one of them
    assert read_metrics(ctx.run_dir) == {step: {"loss": 1.0 / step} for step in range(1, 21)}  # the file is complete
    (warning,) = fanout_warnings(caplog)  # one warning for the whole outage, naming the tracker
    assert warning.startswith("tracker fake: a log_metrics call has waited on its server for over 0.05 s")
    assert "dropped" in warning and f"python -m trainer.tracking sync {ctx.run_dir} --to fake" in warning

    remote.gate.set()  # the server answers again
    assert tracking.flush(10)
    received = [c[1] for c in remote.instance.calls]
    assert received == list(range(1, 6))  # the call in flight and the 4 queued, in order; the rest dropped
    tracking.log_metrics({"loss": 0.0}, 21)  # logging resumes
    assert tracking.flush(10)
    assert remote.instance.calls[-1] == ("metrics", 21, {"loss": 0.0})
    assert any(r.getMessage() == "tracker fake answers again; 15 calls were dropped meanwhile "
               f"(`python -m trainer.tracking sync {ctx.run_dir} --to fake` replays them)" for r in caplog.records)
    tracking.close()
    (closing,) = fanout_warnings(caplog)[1:]
    assert closing.startswith("tracker fake: 15 calls were not sent (15 log_metrics)")


def test_a_failing_tracker_warns_once_rests_and_picks_up_when_its_server_is_back(tmp_path, remote, caplog):
    ctx = make_ctx(tmp_path)
    tracking = Tracking(["file", "fake"], ctx, is_primary=True)
    tracking.log_metrics({"loss": 1.0}, 1)
    assert tracking.flush(10)
    remote.down = True
    for step in range(2, 8):
        tracking.log_metrics({"loss": 1.0}, step)
        tracking.log_samples(SampleEvent(step, "validation", "val", "validation", [SampleRecord(1, "p", f"g{step}")]))
    assert tracking.flush(10)
    remote.down = False  # the server is back: after its rest the tracker takes calls again
    step = 8
    while remote.instance.calls[-1][1] != step - 1:
        assert step < 200, "logging did not resume"
        tracking.log_metrics({"loss": 0.5}, step)
        assert tracking.flush(10)
        step += 1
        time.sleep(0.02)
    (warning,) = fanout_warnings(caplog)
    assert warning.startswith("tracker fake: log_metrics failed (ConnectionError: Connection refused); its calls are "
                              "dropped until it answers again; training goes on")
    assert "fake" in tracking.names  # a failing remote tracker is kept, not disabled
    assert [c[1] for c in remote.instance.calls][0] == 1
    steps = [c[1] for c in remote.instance.calls]
    assert steps == sorted(steps)  # whatever got through, in the order it was logged
    assert set(read_metrics(ctx.run_dir)) >= set(range(1, 8))


def test_close_waits_a_bounded_time_for_a_stuck_tracker_and_says_what_it_left(tmp_path, remote, caplog):
    remote.gate = threading.Event()  # never opened: the server hangs for good
    tracking = Tracking(["fake"], make_ctx(tmp_path), is_primary=True, close_timeout_s=0.3)
    for step in range(1, 4):
        tracking.log_metrics({"loss": 1.0}, step)
    started = time.perf_counter()
    tracking.close()
    assert time.perf_counter() - started < 2.0
    (warning,) = fanout_warnings(caplog)
    assert warning.startswith("tracker fake: 3 calls were not sent (3 log_metrics); it did not finish within 0 s")
    remote.gate.set()  # let the daemon thread end


def test_calls_keep_their_values_and_order_and_a_live_file_is_sent_as_it_was(tmp_path, remote):
    remote.gate = threading.Event()
    ctx = make_ctx(tmp_path)
    tracking = Tracking(["fake"], ctx, is_primary=True)
    report = ctx.run_dir / "report.html"
    metrics = {"loss": 1.0}
    tracking.log_metrics(metrics, 1)
    metrics["extra"] = 2.0  # the caller changes its dict after the call (SampleLogger does)
    report.write_text("report at step 1")
    tracking.replace_artifact(report)
    report.write_text("report at step 2")  # rewritten before the tracker got to it
    tracking.log_samples(SampleEvent(2, "validation", "val", "validation", [SampleRecord(1, "p", "g")]))
    tracking.replace_artifact(report)
    remote.gate.set()
    tracking.close()
    assert remote.instance.calls == [
        ("metrics", 1, {"loss": 1.0}),
        ("replace", "report.html", "report at step 1"),
        ("samples", 2, ["g"]),
        ("replace", "report.html", "report at step 2"),
    ]
    assert not (ctx.run_dir / base.OUTBOX_DIR / "fake").exists()  # the copies are gone


def test_run_record_is_kept_without_secrets(tmp_path, remote):
    ctx = make_ctx(tmp_path)
    Tracking(["file", "fake"], ctx, is_primary=True).close()
    assert read_run_records(ctx.run_dir) == {"fake": {"run_id": "r-1", "tracking_uri": "http://***@example.org:5000"}}
    assert "s3cr3t" not in (ctx.run_dir / base.RECORD_FILE).read_text()


def test_a_slow_start_does_not_hold_the_run_and_a_failed_start_disables_the_tracker(tmp_path, remote, monkeypatch, caplog):
    release = threading.Event()

    class SlowStart(remote):
        def __init__(self, ctx):
            release.wait()
            super().__init__(ctx)

    class NoServer(_Remote):
        def __init__(self, ctx):
            raise ConnectionError("no server at http://bob:pw@host:1")

    monkeypatch.setitem(base._CLASSES, "slow_start", SlowStart)
    monkeypatch.setitem(base._CLASSES, "no_server", NoServer)
    tracking = Tracking(["file", "slow_start", "no_server"], make_ctx(tmp_path), is_primary=True, start_timeout_s=0.2)
    assert tracking.names == ["file", "slow_start"]
    tracking.log_metrics({"loss": 1.0}, 1)  # queued while it starts
    release.set()
    assert tracking.flush(10)
    assert SlowStart.instance.calls == [("metrics", 1, {"loss": 1.0})]
    tracking.close()
    warnings = fanout_warnings(caplog)
    assert warnings == [
        "tracker slow_start is still starting after 0 s; training goes on, its calls wait in its queue (at most 1000)",
        "tracker no_server failed to start and is disabled: ConnectionError: no server at http://***@host:1",
    ]


def test_client_bounds_apply_only_where_the_user_set_nothing(monkeypatch):
    for bound in TRACKER_CLIENT_BOUNDS:
        monkeypatch.delenv(bound.variable, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")  # the user's own choice
    env = tracker_env()
    assert dict(env.client_bounds) == {b.variable: b.value for b in TRACKER_CLIENT_BOUNDS if b.variable != "MLFLOW_HTTP_REQUEST_TIMEOUT"}
    apply_client_bounds(env.client_bounds)
    import os

    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2" and os.environ["WANDB_FINISH_TIMEOUT"] == "60"
    # The names are the ones the installed clients read (their sources; importing mlflow costs 6 s).
    mlflow_vars = (Path(importlib.util.find_spec("mlflow").origin).parent / "environment_variables.py").read_text()
    wandb_settings = (Path(importlib.util.find_spec("wandb").origin).parent / "sdk" / "wandb_settings.py").read_text()
    for bound in TRACKER_CLIENT_BOUNDS:
        if bound.variable.startswith("MLFLOW_"):
            assert f'"{bound.variable}"' in mlflow_vars, bound.variable
        else:  # W&B maps WANDB_<NAME> to its setting <name>
            assert f"\n    {bound.variable.removeprefix('WANDB_').lower()}: float" in wandb_settings, bound.variable
