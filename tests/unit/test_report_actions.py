"""What a run did about its alerts, in the report: rollbacks (the discarded steps kept apart from
the same steps trained again) and stops, on the run page and the comparison page; runs without
them render as before."""

from __future__ import annotations

import json
import re

from report_fixtures import build_rollback_run, build_small_run
from test_report import Tree, timeline
from trainer.report import read_samples, render_report, run_progress, write_compare, write_report
from trainer.report.shared import read_finite_metrics, read_history, read_metric_branches
from trainer.report.live import LiveReport
from trainer.tracking import Tracking, TrackerContext
from config.env import tracker_env


def circles(series) -> dict[int, float]:
    """step -> value from the dots' tooltips ("name @ step S: V")."""
    out = {}
    for c in series.find_all("circle"):
        m = re.search(r"@ step (\d+): ([\d.]+)$", c.all_text())
        out[int(m.group(1))] = float(m.group(2))
    return out


def shown(node) -> str:
    """A diffed generation's own text: without the words deleted since the previous event."""
    return "".join(node.text) + "".join(shown(c) for c in node.children if c.tag != "del")


def test_metrics_split_at_the_rollback_record(tmp_path):
    facts = build_rollback_run(tmp_path)
    branches = read_metric_branches(tmp_path)
    assert branches.markers == [{"step": 6, "to_step": 4, "lr_scale": 0.5}]
    [discarded] = branches.discarded
    assert {s: m["train/loss"] for s, m in discarded.items()} == facts["discarded_loss"]
    assert discarded[6]["val/loss"] == 1.5 and discarded[6]["val/alert/degeneration"] == 1.0
    assert {s: branches.kept[s]["train/loss"] for s in (5, 6, 7, 8)} == facts["retrained_loss"]
    assert "val/alert/degeneration" not in branches.kept[6]  # not mixed into the step trained again
    assert branches.kept[4]["train/loss"] == 0.6 and branches.kept[6]["val/rollback_to_step"] == 4.0
    # without a rollback: what the reader of every other run gives (resumed steps: the last record wins)
    small = tmp_path / "small"
    build_small_run(small)
    plain = read_metric_branches(small)
    assert plain.kept == read_finite_metrics(small) and plain.discarded == [] and plain.markers == []


def test_history_keeps_discarded_samples_apart_in_order(tmp_path):
    build_rollback_run(tmp_path)
    history = read_history(tmp_path)
    order = [(s["step"], bool(s.get("discarded")), s["prompt_id"]) for s in history.samples]
    assert order == [(2, False, "pa1"), (2, False, "pb2"), (4, False, "pa1"), (4, False, "pb2"), (6, True, "pa1"), (6, True, "pb2"),
                     (6, False, "pa1"), (6, False, "pb2"), (8, False, "pa1"), (8, False, "pb2")]
    assert [(a["step"], bool(a.get("discarded"))) for a in history.alerts] == [(6, True), (8, False)]
    [rollback] = history.rollbacks
    assert (rollback["number"], rollback["step"], rollback["to_step"], rollback["skipped"]) == (1, 6, 4, [5, 6])


def test_run_page_marks_the_rollback_the_discarded_steps_and_the_stop(tmp_path):
    facts = build_rollback_run(tmp_path / "rb")
    tree = Tree(write_report(tmp_path / "rb").read_text(encoding="utf-8"))
    # the list of actions, linked from the header
    [item] = tree.root.find_all("li", id="rollback-1")
    assert f"step 6: {facts['rollback_text']}" in item.all_text() and item.attrs["data-to-step"] == "4"
    assert "What is 6*7? Answer:" in item.all_text() and "repeats itself at step 6" in item.all_text()
    [stop] = tree.root.find_all("li", id="run-stop")
    assert facts["stop_text"] in stop.all_text() and "global_step_8" in stop.all_text()
    [stat] = tree.root.find_all(id="stat-actions")
    assert stat.all_text() == f"1 rollback · {facts['stop_text']}"

    for pid in ("pa1", "pb2"):
        d = timeline(tree, pid)
        rows = [r for r in d.find_all("tr") if r.parent.tag == "tbody"]
        kinds = [("rollback" if "rollback-row" in r.attrs["class"] else "stop" if "stop-row" in r.attrs["class"]
                  else "alert" if "alert-row" in r.attrs["class"] else r.attrs["data-step"]
                  + ("d" if "discarded" in r.attrs["class"] else "")) for r in rows]
        expected = ["2", "4", "6d", "alert", "rollback", "6", "8", "alert", "stop"] if pid == "pa1" else \
            ["2", "4", "6d", "rollback", "6", "8", "stop"]
        assert kinds == expected
        [rollback_row] = [r for r in rows if "rollback-row" in r.attrs["class"]]
        assert facts["rollback_text"] in rollback_row.all_text()
        assert rollback_row.find_all("a")[0].attrs["href"] == "#rollback-1"
        [discarded] = [r for r in rows if "discarded" in r.attrs.get("class", "") and r.attrs.get("data-step")]
        assert facts["discarded"][pid] in discarded.find_all("div", class_="gen")[0].all_text()
        [label] = discarded.find_all("span", class_="disc-label")
        assert label.all_text() == "discarded by the rollback at step 6"
        [retrained] = [r for r in rows if r.attrs.get("data-step") == "6" and r.attrs["class"] == "event"]
        gen = retrained.find_all("div", class_="gen")[0]
        assert " ".join(shown(gen).split()) == facts["retrained"][pid]
        assert facts["discarded"][pid].split()[0] not in gen.all_text()  # diffed against step 4, not the discarded row
        assert "1 discarded" in d.children[0].all_text()
    [alert_row] = [r for r in tree.root.find_all("tr", class_="alert-row") if "discarded" in r.attrs["class"]]
    assert "step 6" in alert_row.all_text()

    # the grid: the discarded event and the step trained again are columns of their own
    [grid] = tree.root.find_all("div", id="grid")
    assert grid.attrs["data-cols"] == str(facts["columns"])
    assert len([c for c in grid.find_all("a", class_="c") if c.attrs.get("data-disc") == "1"]) == 2

    # every chart: the rollback at its alert step and the restored step, the stop
    charts = tree.root.find_all("svg", class_="chart")
    assert len(charts) == 2
    for svg in charts:
        [rollback] = svg.find_all("line", class_="rollback-marker")
        assert (rollback.attrs["data-step"], rollback.attrs["data-to-step"]) == ("6", "4")
        assert [m.attrs["data-step"] for m in svg.find_all("line", class_="restore-marker")] == ["4"]
        assert [m.attrs["data-step"] for m in svg.find_all("line", class_="stop-marker")] == ["8"]
    # the discarded segment of train/loss apart from the kept line, which holds the steps trained again
    loss = tree.root.find_all("svg", id="chart-loss-svg")[0]
    by_kind = {("discarded" in g.attrs["class"], g.attrs["data-series"]): g for g in loss.find_all("g", class_="series")}
    assert circles(by_kind[(True, "train/loss")]) == facts["discarded_loss"]
    kept = circles(by_kind[(False, "train/loss")])
    assert {s: kept[s] for s in (5, 6, 7, 8)} == facts["retrained_loss"]
    assert circles(by_kind[(True, "val/loss")]) == {6: 1.5} and circles(by_kind[(False, "val/loss")])[6] == 0.65
    # the discarded line branches off the kept point of the step rolled back to
    [line] = by_kind[(True, "train/loss")].find_all("polyline")
    [kept_line] = by_kind[(False, "train/loss")].find_all("polyline")
    assert line.attrs["points"].split()[0] == kept_line.attrs["points"].split()[3]  # step 4, the 4th kept point


def test_reshuffled_data_and_a_stop_by_a_metric_watch(tmp_path):
    run = tmp_path / "rs"
    facts = build_rollback_run(run, skip_data=False)
    assert facts["rollback_text"].endswith("data reshuffled")
    # a run that early stopping ended: LiveReport.finish writes it (trainer/run.py passes the watch's stop)
    tracking = Tracking(["file"], TrackerContext(run, "p", "e", tracker_env({})), is_primary=True)
    live = LiveReport(run, total_steps=12, tracking=tracking)
    stop = {"rule": "early_stopping", "step": 8, "message": "early stopping at step 8: val/loss has not improved", "checkpoint": "c"}
    live.finish(stop)
    tracking.close()
    state = json.loads((run / "run_state.json").read_text())
    assert state["status"] == "finished" and state["stop"] == stop
    page = write_report(run).read_text(encoding="utf-8")
    assert facts["rollback_text"] in page and "stopped: early_stopping at step 8" in page
    assert "early stopping at step 8: val/loss has not improved" in page


def test_compare_page_shows_each_runs_rollbacks_and_stop(tmp_path):
    facts = build_rollback_run(tmp_path / "rb")
    build_small_run(tmp_path / "plain")
    tree = Tree(write_compare([tmp_path / "rb", tmp_path / "plain"], tmp_path / "cmp.html").read_text(encoding="utf-8"))
    [actions] = tree.root.find_all("ul", id="actions-A")
    assert f"step 6: {facts['rollback_text']}" in actions.all_text() and facts["stop_text"] in actions.all_text()
    assert "2 samples of discarded steps left out of the comparison" in actions.all_text()
    assert not tree.root.find_all("ul", id="actions-B")
    for svg in tree.root.find_all("svg", class_="chart"):
        [rollback] = svg.find_all("line", class_="rollback-marker")
        assert rollback.attrs["data-step"] == "6" and rollback.parent.attrs["href"] == "#actions-A"
        assert [t.all_text() for t in svg.find_all("text", class_="action-label")] == ["A↺", "A■"]
    loss = tree.root.find_all("svg", id="cmp-loss-svg")[0]
    [discarded] = [g for g in loss.find_all("g", class_="series") if "discarded" in g.attrs["class"] and g.attrs["data-series"] == "A train/loss"]
    assert circles(discarded) == facts["discarded_loss"]
    text = tree.root.all_text()
    assert facts["discarded"]["pa1"] not in text  # compared by the history each run kept


def test_runs_without_rollbacks_render_as_before(tmp_path):
    """The page of a run without rollbacks or a stop is the one the readers of before give
    (metrics merged by step, samples by (step, stage, prompt)), with none of the actions' parts."""
    run = tmp_path / "small"
    build_small_run(run)
    page = write_report(run).read_text(encoding="utf-8")
    metrics = read_finite_metrics(run)
    samples, alerts = read_samples(run)
    assert page == render_report(run.name, metrics, samples, alerts, run_progress(run, metrics, samples))
    # (the run's directory name holds "rollbacks": the test's name)
    for part in ("stat-actions", "rollback-", "disc-label", "data-disc", "action-markers", "stop-marker", "#actions"):
        assert part not in page, part
    compare = write_compare([run, run], tmp_path / "cmp.html").read_text(encoding="utf-8")
    for part in ("run-actions", "rollback-", "series discarded", "action-markers"):
        assert part not in compare, part
