"""The HTML run report: reading samples.jsonl, the page's content, escaping, size, the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from report_fixtures import SCRIPT, build_large_run, build_small_run
from trainer.report import read_samples, word_diff, write_report

ROOT = Path(__file__).resolve().parents[2]
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
SVG_VOID = {"line", "polyline", "circle", "path", "rect"}  # self-closed in the SVG we write


class Node:
    def __init__(self, tag: str, attrs: dict, parent: "Node | None"):
        self.tag, self.attrs, self.parent, self.children, self.text = tag, attrs, parent, [], []

    def iter(self):
        yield self
        for c in self.children:
            yield from c.iter()

    def find_all(self, tag=None, **attrs):
        def ok(n):
            if tag and n.tag != tag:
                return False
            for k, v in attrs.items():
                k = k.rstrip("_").replace("_", "-")
                have = n.attrs.get(k)
                if k == "class":
                    if have is None or v not in have.split():
                        return False
                elif have != v:
                    return False
            return True

        return [n for n in self.iter() if ok(n)]

    def ancestors(self):
        p = self.parent
        while p is not None:
            yield p
            p = p.parent

    def all_text(self) -> str:
        return "".join(self.text) + "".join(c.all_text() for c in self.children)


class Tree(HTMLParser):
    """A small DOM: enough to check nesting (which <details> an alert row is in)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {}, None)
        self.cur = self.root
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: (v if v is not None else "") for k, v in attrs}, self.cur)
        self.cur.children.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Node(tag, {k: (v if v is not None else "") for k, v in attrs}, self.cur))

    def handle_endtag(self, tag):
        node = self.cur
        while node is not None and node.tag != tag:
            node = node.parent
        assert node is not None, f"stray </{tag}>"
        assert node is self.cur or self.cur.tag in SVG_VOID, f"</{tag}> closes <{self.cur.tag}>"
        self.cur = node.parent

    def handle_data(self, data):
        self.cur.text.append(data)


@pytest.fixture
def small(tmp_path):
    run = tmp_path / "run-small"
    facts = build_small_run(run)
    out = write_report(run)
    return run, facts, out, out.read_text(encoding="utf-8")


def timeline(tree: Tree, pid: str) -> Node:
    [node] = [d for d in tree.root.find_all("details", class_="timeline") if d.attrs["data-prompt-id"] == pid]
    return node


def test_read_samples_skips_torn_line_and_keeps_last_copy(tmp_path):
    facts = build_small_run(tmp_path)
    samples, alerts = read_samples(tmp_path)
    assert all(s["step"] <= 200 for s in samples)  # the torn step-250 line is gone
    keys = [(s["step"], s["stage"], s["prompt_id"]) for s in samples]
    assert len(keys) == len(set(keys)) == sum(facts["events_per_prompt"].values())
    assert [(s["step"], s["index"]) for s in samples] == sorted((s["step"], s["index"]) for s in samples)
    resumed = [s for s in samples if (s["step"], s["prompt_id"]) == (facts["after_resume"]["step"], facts["after_resume"]["prompt_id"])]
    assert [s["generation"] for s in resumed] == [facts["after_resume"]["generation"]]
    assert [(a["step"], a["rule"], a["prompt_id"]) for a in alerts] == facts["alerts"]
    assert "(after resume)" in alerts[1]["message"]


def test_read_samples_missing_file(tmp_path):
    assert read_samples(tmp_path) == ([], [])


def test_word_diff_marks_changed_words_only():
    assert word_diff("The answer is 42 now", "The answer is 41 now") == "The answer is <del>42</del> <ins>41</ins> now"
    assert word_diff("a b c", "a c") == "a <del>b</del> c"
    assert word_diff("a", "a b\nc") == "a <ins>b\nc</ins>"
    assert word_diff(None, "<x>") == "&lt;x&gt;"
    assert word_diff("x", SCRIPT) == "<del>x</del> <ins>&lt;script&gt;alert(1)&lt;/script&gt;</ins>"


def test_report_is_self_contained(small):
    run, _, out, text = small
    assert out == run / "report.html" and out.is_file()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing behind
    # no external resources: no src=, no <link>, no http(s) or protocol-relative href/src/url()
    assert not re.search(r"""\b(src|href)\s*=\s*["']?\s*(https?:|//)""", text, re.I)
    assert not re.search(r"<link\b", text, re.I)
    assert not re.search(r"<script\b[^>]*\bsrc\s*=", text, re.I)
    assert not re.search(r"url\(\s*['\"]?(https?:|//)", text, re.I)
    assert not re.search(r"@import", text)
    Tree(text)  # well nested


def test_header(small):
    _, facts, _, text = small
    tree = Tree(text)
    [steps] = tree.root.find_all(id="stat-steps")
    [events] = tree.root.find_all(id="stat-events")
    [alerts] = tree.root.find_all(id="stat-alerts")
    assert steps.attrs["data-value"] == str(facts["steps"])
    assert events.attrs["data-value"] == str(facts["sample_events"])
    assert alerts.attrs["data-value"] == str(len(facts["alerts"]))
    [first] = tree.root.find_all("a", id="first-alert-link")
    assert first.attrs["href"] == "#alert-1"
    assert "run-small" in tree.root.find_all(id="run-name")[0].all_text()


def test_charts(small):
    _, facts, _, text = small
    tree = Tree(text)
    [loss] = tree.root.find_all("svg", id="chart-loss-svg")
    [rewards] = tree.root.find_all("svg", id="chart-rewards-svg")
    assert [g.attrs["data-series"] for g in loss.find_all("g", class_="series")] == ["train/loss", "val/loss"]
    assert [g.attrs["data-series"] for g in rewards.find_all("g", class_="series")] == facts["reward_series"]
    for svg in (loss, rewards):
        assert svg.find_all("g", class_="x-axis") and svg.find_all("g", class_="y-axis")
        assert len(svg.find_all("text", class_="tick")) >= 6
        legend = [g.attrs.get("data-series") for g in svg.find_all("g", class_="legend-item") if g.attrs.get("data-series")]
        assert legend == [g.attrs["data-series"] for g in svg.find_all("g", class_="series")]
        for poly in svg.find_all("polyline"):
            assert len(poly.attrs["points"].split()) >= 2
    markers = loss.find_all("line", class_="alert-marker")
    assert sorted(int(m.attrs["data-step"]) for m in markers) == facts["alert_steps"]
    for m in markers:  # each links to an alert row
        assert m.parent.tag == "a" and re.fullmatch(r"#alert-\d+", m.parent.attrs["href"])
    val = [g for g in loss.find_all("g", class_="series") if g.attrs["data-series"] == "val/loss"][0]
    assert len(val.find_all("circle")) == 5  # few points: drawn as dots too


def test_timelines_one_per_prompt(small):
    _, facts, _, text = small
    tree = Tree(text)
    details = tree.root.find_all("details", class_="timeline")
    assert [d.attrs["data-prompt-id"] for d in details] == facts["prompt_ids"]
    for d in details:
        assert "open" not in d.attrs  # collapsed by default
        pid = d.attrs["data-prompt-id"]
        rows = d.find_all("tr", class_="event")
        assert len(rows) == int(d.attrs["data-events"]) == facts["events_per_prompt"][pid]
        steps = [int(r.attrs["data-step"]) for r in rows]
        assert steps == sorted(steps)
        summary = d.children[0]
        assert summary.tag == "summary" and f"{len(rows)} events" in summary.all_text()
    summary_pc3 = timeline(tree, "pc3").children[0].all_text()
    assert "format 0.2" in summary_pc3 and "correct 0" in summary_pc3  # latest rewards
    assert "EM 1" in timeline(tree, "pa1").children[0].all_text()  # latest exact match
    # the full prompt and reference are shown inside
    pa1 = timeline(tree, "pa1")
    assert pa1.find_all("pre", class_="prompt-text")[0].all_text() == "What is 6*7? Answer:"
    assert pa1.find_all("pre", class_="reference-text")[0].all_text() == "42"
    # the stale pre-resume generation is gone
    assert "STALE" not in text


def test_word_diff_in_timeline(small):
    _, facts, _, text = small
    tree = Tree(text)
    d = facts["diff"]
    [row] = [r for r in timeline(tree, d["prompt_id"]).find_all("tr", class_="event") if r.attrs["data-step"] == str(d["step"])]
    [dels] = [n.all_text() for n in row.find_all("del")]
    [inss] = [n.all_text() for n in row.find_all("ins")]
    assert (dels, inss) == (d["deleted"], d["inserted"])
    assert f"<del>{d['deleted']}</del> <ins>{d['inserted']}</ins>" in text
    first = timeline(tree, d["prompt_id"]).find_all("tr", class_="event")[0]
    assert not first.find_all("ins") and not first.find_all("del")  # nothing to compare with


def test_alerts_in_place_with_anchors(small):
    _, facts, _, text = small
    tree = Tree(text)
    ids = [n.attrs["id"] for n in tree.root.iter() if "id" in n.attrs]
    assert len(ids) == len(set(ids))
    alert_rows = tree.root.find_all("tr", class_="alert-row")
    assert [r.attrs["id"] for r in alert_rows] != []
    by_id = {r.attrs["id"]: r for r in alert_rows}
    assert sorted(by_id) == sorted(f"alert-{i}" for i in range(1, len(facts["alerts"]) + 1))
    for n, (step, rule, pid) in enumerate(facts["alerts"], start=1):
        row = by_id[f"alert-{n}"]
        assert rule in row.all_text() and f"step {step}" in row.all_text()
        holder = next(a for a in row.ancestors() if a.tag == "details")
        if pid is None:
            assert holder.attrs["id"] == "event-alerts"
        else:
            assert holder.attrs.get("data-prompt-id") == pid
            # right after the row of its event, which is highlighted
            siblings = row.parent.children
            before = siblings[siblings.index(row) - 1]
            while "alert-row" in before.attrs.get("class", ""):
                before = siblings[siblings.index(before) - 1]
            assert before.attrs["data-step"] == str(step) and "has-alert" in before.attrs["class"]
    # the badge counts the prompt's alerts
    for pid in ("pa1", "pd4", "pc3"):
        d = timeline(tree, pid)
        expected = sum(1 for _, _, p in facts["alerts"] if p == pid)
        assert d.attrs["data-alerts"] == str(expected)
        [badge] = d.children[0].find_all("span", class_="badge")
        assert badge.all_text() == str(expected)
    assert not timeline(tree, "pb2").children[0].find_all("span", class_="badge")
    # the list at the top links to every row
    links = [a.attrs["href"] for a in tree.root.find_all(id="alert-list")[0].find_all("a")]
    assert links == [f"#alert-{i}" for i in range(1, len(facts["alerts"]) + 1)]


def test_user_text_is_escaped(small):
    _, facts, _, text = small
    assert SCRIPT not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert len(re.findall(r"<script\b", text)) == 2  # our own two inline scripts, nothing else
    assert "<b>cat</b>" not in text and "&lt;b&gt;cat&lt;/b&gt; &amp; &quot;dog&quot;" in text
    tree = Tree(text)
    shown = timeline(tree, facts["script_prompt"]).all_text()
    assert SCRIPT in shown  # shown as text
    assert not [s for s in tree.root.find_all("script") if "alert(1)" in s.all_text()]


def test_missing_data_notes(tmp_path):
    only_samples = tmp_path / "a"
    build_small_run(only_samples)
    (only_samples / "metrics.jsonl").unlink()
    text = write_report(only_samples).read_text()
    assert 'id="chart-loss-empty"' in text and 'id="chart-rewards-empty"' in text and "<svg" not in text
    assert text.count('<details class="timeline') == 4
    only_metrics = tmp_path / "b"
    build_small_run(only_metrics)
    (only_metrics / "samples.jsonl").unlink()
    text = write_report(only_metrics, tmp_path / "elsewhere" / "r.html").read_text()
    assert 'id="chart-loss-svg"' in text and 'id="no-samples"' in text and 'id="no-alerts"' in text


def test_large_run_stays_small(tmp_path):
    facts = build_large_run(tmp_path / "big", events=300, prompts=5, train_steps=3000)
    start = time.perf_counter()
    out = write_report(tmp_path / "big")
    elapsed = time.perf_counter() - start
    size = out.stat().st_size
    print(f"large report: {size / 1e6:.2f} MB in {elapsed:.2f} s")
    assert size < 5_000_000
    text = out.read_text()
    tree = Tree(text)
    assert len(tree.root.find_all("details", class_="timeline")) == facts["prompts"]
    assert len(tree.root.find_all("tr", class_="event")) == facts["events"] * facts["prompts"]
    assert len(tree.root.find_all("tr", class_="alert-row")) == facts["alerts"]
    for g in tree.root.find_all("g", class_="series"):
        points = len(g.find_all("polyline")[0].attrs["points"].split())
        assert 2 <= points <= 500, g.attrs["data-series"]
    [train] = [g for g in tree.root.find_all("g", class_="series") if g.attrs["data-series"] == "train/loss"]
    assert int(train.attrs["data-points"]) == 500  # 3000 points downsampled


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "trainer.report", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_cli(tmp_path):
    run = tmp_path / "run"
    build_small_run(run)
    proc = run_cli(str(run))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(run / "report.html") and (run / "report.html").is_file()
    out = tmp_path / "x" / "custom.html"
    proc = run_cli(str(run), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out) and out.read_text().startswith("<!DOCTYPE html>")


@pytest.mark.parametrize("make", ["empty", "missing"])
def test_cli_not_a_run_dir(tmp_path, make):
    target = tmp_path / "empty"
    if make == "empty":
        target.mkdir()
    proc = run_cli(str(target))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(target) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (target / "report.html").exists()


def test_alerts_without_a_sample_row_and_alerts_only_in_samples(tmp_path):
    """An alert at a step where its prompt has no sample, an alert for an unknown prompt, and an
    alert string in a sample record with no alert record: all shown, with anchors."""
    import json

    from report_fixtures import sample_record

    recs = [
        sample_record(10, "validation", "val", 1, "p", "prompt p", "x", "a b c", None),
        sample_record(30, "validation", "val", 1, "p", "prompt p", "x", "a b d", "a b c", alerts=["length_change"]),
        {"kind": "alert", "step": 20, "stage": "step_20", "rule": "reward_drop", "prompt_id": "p", "message": "no row at 20"},
        {"kind": "alert", "step": 40, "stage": "validation", "rule": "collapse", "prompt_id": "ghost", "message": "unknown prompt"},
        {"kind": "alert", "step": 50, "stage": "validation", "rule": "reward_drop", "prompt_id": "p", "message": "after the last row"},
    ]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    tree = Tree(write_report(tmp_path).read_text())
    d = timeline(tree, "p")
    rows = [(r.attrs.get("data-step") or r.attrs["id"]) for r in d.find_all("tr") if r.parent.tag == "tbody"]
    assert rows == ["10", "alert-1", "30", "alert-2", "alert-4"]  # in step order, in place
    assert "length_change" in tree.root.find_all(id="alert-2")[0].all_text()  # from the sample record
    ghost = tree.root.find_all(id="alert-3")[0]
    assert next(a for a in ghost.ancestors() if a.tag == "details").attrs["id"] == "event-alerts"
    assert d.attrs["data-alerts"] == "3"


def test_grid_colours_by_a_chosen_task_metric_and_charts_metrics_tags_and_lm_eval(tmp_path):
    from report_fixtures import sample_record

    run = tmp_path / "run-metrics"
    run.mkdir()
    samples = []
    for step in (10, 20):
        for index, (pid, answer) in enumerate((("gsm", "so #### 72"), ("essay", "a long text")), start=1):
            s = sample_record(step, "validation", "val", index, pid, f"prompt {pid}", "#### 72" if pid == "gsm" else "a text",
                              answer, None)
            s["metrics"] = {"exact_match": 0.0, "last_number_match": 1.0 if pid == "gsm" else 0.0,
                            "rouge_l": 0.25 * step / 10 + (0.5 if pid == "essay" else 0.0)}
            samples.append(s)
    greedy = dict(samples[-1], index=3, prompt_id="essay#greedy", greedy=True)
    samples.append(greedy)
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    metrics = [{"step": step, "time": float(step), "val/metric/last_number_match": 0.5, "val/metric/rouge_l/pass@4": 0.5,
                "val/tag/math/metric/last_number_match": 1.0, "eval/sums/acc": 0.25 * step / 10, "eval/time_s": 3.0}
               for step in (10, 20)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    tree = Tree(write_report(run).read_text(encoding="utf-8"))
    [select] = tree.root.find_all("select", id="grid-metric")
    assert [o.attrs["value"] for o in select.find_all("option")] == ["auto", "exact_match", "last_number_match", "rouge_l"]
    cells = {(c.parent.attrs["data-prompt-id"], c.attrs["href"]): c.attrs["data-cls"].split("|")
             for c in tree.root.find_all("a", class_="c") if "data-cls" in c.attrs}
    # auto (exact match: all wrong), exact_match, last_number_match (right for gsm), rouge_l (graded: buckets)
    assert cells[("gsm", "#p1-e1")] == ["em0", "em0", "em1", "r0"]
    assert cells[("essay", "#p2-e2")] == ["em0", "em0", "em0", "r4"]
    for chart in ("chart-metrics", "chart-tags", "chart-eval"):
        assert tree.root.find_all("div", id=chart), chart
    eval_chart = tree.root.find_all("div", id="chart-eval")[0].all_text()
    assert "eval/sums/acc" in eval_chart and "eval/time_s" not in eval_chart
    essay = timeline(tree, "essay#greedy").all_text()
    assert "greedy" in essay and "rouge_l 1" in essay
