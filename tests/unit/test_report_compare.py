"""Runs compared: matching prompts and events, where runs disagree, the warnings, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from report_fixtures import SETTINGS_GREEDY, sample_record
from trainer.report.compare_page import compare_prompts, load_runs, render_compare, sampling_warnings

ROOT = Path(__file__).resolve().parents[2]


def write_run(run: Path, events: dict[int, dict[str, str]], settings: dict = SETTINGS_GREEDY, stage: str = "validation") -> Path:
    """events: step -> {prompt_id: generation}; metrics: a loss per event."""
    run.mkdir(parents=True, exist_ok=True)
    records, previous = [], {}
    for step, gens in events.items():
        for index, (pid, gen) in enumerate(gens.items(), start=1):
            records.append(sample_record(step, stage, "val", index, pid, f"prompt {pid}", "42", gen, previous.get(pid),
                                         settings=settings))
            previous[pid] = gen
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "time": 0.0, "train/loss": 1 / (s + 1), "val/exact_match": 0.5})
                                               + "\n" for s in events))
    return run


A_EVENTS = {0: {"p1": "hello", "p2": "x", "p3": "same"}, 10: {"p1": "4 2", "p2": "y", "p3": "same"},
            20: {"p1": "42", "p2": "z", "p3": "same"}}
# B samples at other steps (nearest events: 0->1, 10->9, 20->22), has a prompt A lacks
B_EVENTS = {1: {"p1": "hello", "p2": "x", "p3": "same", "p9": "only in B"}, 9: {"p1": "4 2", "p2": "DIFFERENT", "p3": "same"},
            22: {"p1": "41", "p2": "ALSO DIFFERENT", "p3": "same"}}


def test_prompts_matched_by_id_steps_by_nearest_event_and_disagreements_ranked(tmp_path):
    runs = load_runs([write_run(tmp_path / "a", A_EVENTS), write_run(tmp_path / "b", B_EVENTS)])
    prompts, unshared = compare_prompts(runs)
    by_id = {p.pid: p for p in prompts}
    assert sorted(by_id) == ["p1", "p2", "p3"] and unshared == {"A": 0, "B": 1}
    assert [[s["step"] for s in row] for row in by_id["p2"].rows] == [[0, 1], [10, 9], [20, 22]]
    assert (by_id["p2"].first_divergence, by_id["p2"].disagreements) == (10, 2)
    assert (by_id["p1"].first_divergence, by_id["p1"].disagreements) == (20, 1)
    assert (by_id["p3"].first_divergence, by_id["p3"].disagreements) == (None, 0)
    assert sampling_warnings(runs, prompts) == []
    page = render_compare(runs)
    # the list of disagreements: most first; each links to the first diverging row
    items = [(r.split('data-prompt-id="')[1].split('"')[0]) for r in page.split('<tr class="disagree-item"')[1:]]
    assert items == ["p2", "p1"]
    assert 'href="#c2-e2"' in page  # p2 (#2) diverges at its second event
    # side by side, run B's text diffed against run A's
    assert "<del>42</del> <ins>41</ins>" in page
    assert page.count('<tr class="event disagree"') == 3
    assert 'id="no-warnings"' in page and "A train/loss" in page and "B train/loss" in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page


def test_warns_when_sampling_settings_or_seeds_differ(tmp_path):
    sampled = {**SETTINGS_GREEDY, "do_sample": True, "temperature": 0.7}
    other_seed = {**SETTINGS_GREEDY, "seed": 99}
    a = write_run(tmp_path / "a", A_EVENTS)
    runs = load_runs([a, write_run(tmp_path / "b", B_EVENTS, settings=sampled)])
    warnings = sampling_warnings(runs, compare_prompts(runs)[0])
    assert len(warnings) == 1 and warnings[0].startswith("sampling settings differ for val samples")
    assert "do_sample=no" in warnings[0] and "temperature=0.7" in warnings[0]
    runs = load_runs([a, write_run(tmp_path / "c", B_EVENTS, settings=other_seed)])
    warnings = sampling_warnings(runs, compare_prompts(runs)[0])
    assert warnings == ["sampling seeds differ for 3 of 3 shared prompts (another trainer.seed?): differences are not only the model's"]
    assert "⚠ sampling seeds differ" in render_compare(runs)


def test_runs_without_a_shared_prompt_say_so(tmp_path):
    runs = load_runs([write_run(tmp_path / "a", {0: {"p1": "x"}}), write_run(tmp_path / "b", {0: {"q1": "x"}})])
    prompts, unshared = compare_prompts(runs)
    assert prompts == [] and unshared == {"A": 1, "B": 1}
    page = render_compare(runs)
    assert 'id="no-shared-prompts"' in page and 'id="no-disagreement"' not in page


def test_cli_compares_three_runs_and_names_same_named_runs_apart(tmp_path):
    dirs = [write_run(tmp_path / x / "run", A_EVENTS if x != "y" else B_EVENTS) for x in ("x", "y", "z")]
    out = tmp_path / "compare.html"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "trainer.report", *map(str, dirs), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert len([l for l in proc.stderr.splitlines() if "status unknown" in l]) == 3
    page = out.read_text()
    assert "<b>A</b> x/run" in page and "<b>B</b> y/run" in page and "<b>C</b> z/run" in page
    proc = subprocess.run([sys.executable, "-m", "trainer.report", str(dirs[0]), str(tmp_path / "nothing")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nothing'}: no metrics.jsonl or samples.jsonl (not a run directory?)"]


def test_task_metrics_and_lm_eval_are_compared_as_curves(tmp_path):
    a, b = write_run(tmp_path / "a", A_EVENTS), write_run(tmp_path / "b", B_EVENTS)
    for run, value in ((a, 0.25), (b, 0.75)):
        with open(run / "metrics.jsonl", "a") as handle:
            for step in (10, 20):
                handle.write(json.dumps({"step": step, "time": 0.0, "val/metric/last_number_match": value,
                                         "val/tag/math/metric/last_number_match": value, "eval/sums/acc": value,
                                         "eval/time_s": 2.0}) + "\n")
    page = render_compare(load_runs([a, b]))
    chart = page.split('id="cmp-metrics"')[1].split("</div>")[0]
    for name in ("A val/metric/last_number_match", "B val/metric/last_number_match", "A eval/sums/acc", "B eval/sums/acc"):
        assert name in chart, name
    assert "eval/time_s" not in chart and "/tag/" not in chart
