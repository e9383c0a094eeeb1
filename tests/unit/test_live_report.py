"""The report kept current during a run: rewritten at each sample event, atomically, re-logged to
the trackers that replace a file, and how far a running, crashed or finished run got."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

from config.env import tracker_env
from config.schema import AlertConfig
from report_fixtures import build_small_run
from trainer.history import SampleHistory
from trainer.report import LiveReport
from trainer.report import RUN_STATE_FILE, run_progress, write_report, write_run_state
from trainer.samples import SampleLogger
from trainer.tracking import Tracker, TrackerContext, Tracking, base
from trainer.tracking.file import read_metrics
from workers.generation import Generated, GenerationSettings

ROOT = Path(__file__).resolve().parents[2]


class _Recorder(Tracker):
    """Records what it is handed: the report's text at each replace_artifact / log_artifact."""

    replaces_artifacts = True
    seen: list[tuple[str, str]] = []

    def replace_artifact(self, path):
        type(self).seen.append(("replace", Path(path).read_text(encoding="utf-8")))

    def log_artifact(self, path):
        type(self).seen.append(("log", Path(path).read_text(encoding="utf-8")))


class _KeepsEveryCopy(_Recorder):
    replaces_artifacts = False
    seen: list[tuple[str, str]] = []


def _event(logger: SampleLogger, step: int, texts: list[str]) -> dict:
    gens = [Generated([1, 2, i], [5, 6], t, True) for i, t in enumerate(texts)]
    return logger.log(step, "validation", "val", "validation", [f"prompt {i}" for i in range(len(texts))], gens,
                      ["a", "b"], GenerationSettings(max_new_tokens=4, do_sample=False), [7, 8], 0.01)


def test_report_rewritten_at_each_event_and_relogged_only_where_it_replaces(tmp_path, monkeypatch):
    monkeypatch.setitem(base._CLASSES, "recorder", _Recorder)
    monkeypatch.setitem(base._CLASSES, "keeps_every_copy", _KeepsEveryCopy)
    monkeypatch.setattr(_Recorder, "seen", [])
    monkeypatch.setattr(_KeepsEveryCopy, "seen", [])
    run = tmp_path / "run"
    tracking = Tracking(["file", "recorder", "keeps_every_copy"], TrackerContext(run, "p", "e", tracker_env({})), is_primary=True)
    live = LiveReport(run, total_steps=40, tracking=tracking)
    assert json.loads((run / RUN_STATE_FILE).read_text())["status"] == "running"
    logger = SampleLogger(tracking, SampleHistory(run, AlertConfig()), live)

    metrics = _event(logger, 10, ["a", "x"])
    page = (run / "report.html").read_text()
    assert 'data-cols="1"' in page and "step 10 of 40 (25%)" in page and "running" in page
    assert metrics["val/report_time_s"] > 0
    _event(logger, 20, ["a", "b"])
    page = (run / "report.html").read_text()
    assert 'data-cols="2"' in page and "step 20 of 40 (50%)" in page
    # the exact-match cells: prompt 1 turned right at the second event
    assert re.findall(r'<a class="c (em\d)', page) == ["em1", "em1", "em0", "em1"]
    assert [kind for kind, _ in _Recorder.seen] == ["replace", "replace"]
    assert 'data-cols="1"' in _Recorder.seen[0][1] and 'data-cols="2"' in _Recorder.seen[1][1]
    assert _KeepsEveryCopy.seen == []  # a backend that keeps every copy gets the report at the end only
    assert set(read_metrics(run)[10]) >= {"val/exact_match", "val/report_time_s"}
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind

    from trainer.cli import finish_run

    finish_run(run, tracking, live, is_primary=True)
    assert json.loads((run / RUN_STATE_FILE).read_text())["status"] == "finished"
    assert "finished: step 20 of 40 (50%)" in (run / "report.html").read_text()
    assert [kind for kind, _ in _KeepsEveryCopy.seen] == ["log"] and _Recorder.seen[-1][0] == "log"


def test_a_failing_report_warns_once_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    tracking = Tracking(["file"], TrackerContext(run, "p", "e", tracker_env({})), is_primary=True)
    logger = SampleLogger(tracking, None, LiveReport(run, 10, tracking))

    def broken(run_dir, out=None):
        raise ValueError("disk on fire")

    monkeypatch.setattr("trainer.report.live.write_report", broken)
    with caplog.at_level(logging.WARNING, logger="trainer.report.live"):
        for step in (1, 2):
            metrics = _event(logger, step, ["a", "b"])
            assert metrics["val/exact_match"] == 1.0 and "val/report_time_s" not in metrics
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "disk on fire" in warnings[0] and "training goes on" in warnings[0]


def test_a_reader_never_sees_half_a_report(tmp_path):
    """Rewrites in a loop while another thread reads: every read is a whole page."""
    run = tmp_path / "run"
    build_small_run(run)
    write_report(run)
    done = threading.Event()

    def rewrite():
        for _ in range(15):
            write_report(run)
        done.set()

    writer = threading.Thread(target=rewrite)
    writer.start()
    reads = 0
    while not done.is_set() or reads == 0:
        text = (run / "report.html").read_text(encoding="utf-8")
        assert text.startswith("<!DOCTYPE html>") and text.endswith("</html>\n"), len(text)
        reads += 1
    writer.join()
    assert reads > 1


def test_progress_of_running_stopped_finished_and_unknown_runs(tmp_path):
    run = tmp_path / "run"
    build_small_run(run)  # steps up to 200, last sample event at 200
    from trainer.report import read_metrics as metrics_of, read_samples

    metrics, samples = metrics_of(run), read_samples(run)[0]
    assert run_progress(run, metrics, samples).startswith("status unknown (no run_state.json): step 200;")
    write_run_state(run, {"status": "running", "total_steps": 800, "pid": os.getpid()})
    line = run_progress(run, metrics, samples)
    assert line.startswith("running, or stopped without notice: step 200 of 800 (25%); last sample event at step 200")
    assert "last record" in line and " ago" in line
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    write_run_state(run, {"status": "running", "total_steps": 800, "pid": int(gone)})
    assert run_progress(run, metrics, samples).startswith(f"stopped (process {int(gone)} is gone): step 200 of 800 (25%)")
    write_run_state(run, {"status": "stopped", "total_steps": 800, "reason": "sample alert [collapse] at step 200 (all prompts): same"})
    assert run_progress(run, metrics, samples).startswith("stopped: sample alert [collapse] at step 200 (all prompts): same: step 200 of 800")
    write_run_state(run, {"status": "finished", "total_steps": 200, "pid": 1})
    assert run_progress(run, metrics, samples) == "finished: step 200 of 200 (100%); last sample event at step 200"


def test_cli_on_a_crashed_run_says_how_far_it_got(tmp_path):
    run = tmp_path / "run"
    build_small_run(run)  # torn last lines, as a crash leaves them
    write_run_state(run, {"status": "running", "total_steps": 1000, "pid": 2 ** 22 + 12345})  # no such process
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "trainer.report", str(run)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(run / "report.html")
    assert f"{run}: stopped (process {2 ** 22 + 12345} is gone): step 200 of 1000 (20%)" in proc.stderr
    assert "stopped (process" in (run / "report.html").read_text()
