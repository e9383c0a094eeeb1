"""Sample history: signals, alert rules, and a file that survives crashes and resumes."""

import json
import logging

import pytest

from config.env import tracker_env
from config.schema import AlertConfig
from trainer.history import HISTORY_FILE, SampleHistory, repetition, replay_alerts
from trainer.tracking.file import read_records
from trainer.samples import SampleLogger
from trainer.tracking import SampleEvent, SampleRecord, TrackerContext, Tracking
from workers.generation import Generated, GenerationSettings

SETTINGS = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)


def event(step, texts, references=None, rewards=None, token_ids=None, stopped=None, prefix="val"):
    references = references or [None] * len(texts)
    samples = [
        SampleRecord(index=i + 1, prompt=f"p{i}", generation=t, reference=references[i], prompt_id=f"id{i}",
                     rewards=(rewards[i] if rewards else {}))
        for i, t in enumerate(texts)
    ]
    gens = [
        Generated([1, 2], (token_ids[i] if token_ids else list(range(len(t) + 1))), t, True if stopped is None else stopped[i])
        for i, t in enumerate(texts)
    ]
    return SampleEvent(step, "validation", prefix, "validation", samples), gens


def record(history, step, texts, **kw):
    ev, gens = event(step, texts, **kw)
    return ev, history.record(ev, gens, SETTINGS, seeds=list(range(len(texts))))


def test_repetition_share_of_repeated_trigrams():
    assert repetition([1, 2, 3, 4, 5]) == 0.0
    assert repetition([7, 7, 7, 7, 7, 7]) == pytest.approx(1 - 1 / 4)
    assert repetition([1, 2]) == 0.0


def test_records_carry_signals_and_similarity_to_the_previous_generation(tmp_path):
    history = SampleHistory(tmp_path, AlertConfig(noise_z=0))  # two samples: any drop counts
    record(history, 10, ["12", "hello world"], references=["12", "x"])
    ev, metrics = record(history, 20, ["13", "hello world"], references=["12", "x"])
    rows = [r for r in read_records(tmp_path / HISTORY_FILE) if r["kind"] == "sample"]
    assert [(r["step"], r["index"]) for r in rows] == [(10, 1), (10, 2), (20, 1), (20, 2)]
    assert rows[0]["signals"]["exact_match"] == 1.0 and rows[2]["signals"]["exact_match"] == 0.0
    assert rows[0]["signals"]["similarity_to_previous"] is None
    assert rows[3]["signals"]["similarity_to_previous"] == 1.0
    assert rows[2]["signals"]["similarity_to_previous"] == pytest.approx(0.5)
    assert rows[2]["settings"]["seed"] == 0 and rows[2]["settings"]["max_new_tokens"] == 8
    assert metrics["val/similarity_to_previous_mean"] == pytest.approx(0.75)
    assert metrics["val/alerts"] == 1.0  # exact match fell from 0.5 to 0.0
    assert [r["rule"] for r in read_records(tmp_path / HISTORY_FILE) if r["kind"] == "alert"] == ["exact_match_drop"]


def test_degeneration_and_collapse_rules(tmp_path, caplog):
    history = SampleHistory(tmp_path, AlertConfig(persist_events=1))
    with caplog.at_level(logging.WARNING):
        ev, metrics = record(history, 5, ["a b a b a b a b", "the the the the"], token_ids=[[1, 2] * 6, [3] * 8], stopped=[False, False])
    rules = sorted(a.split(":")[0] for a in ev.alerts)
    assert rules == ["degeneration", "degeneration", "degeneration"]  # two loops and all hit the limit
    assert metrics["val/alert/degeneration"] == 3.0 and metrics["val/hit_limit_share"] == 1.0
    assert "sample alert [degeneration] at step 5 (validation, prompt id0)" in caplog.text
    ev, _ = record(history, 6, ["same answer", "same answer", "same answer"])
    assert any(a.startswith("collapse:") for a in ev.alerts)


def test_collapse_of_most_prompts_alerts_before_the_mean_similarity_does(tmp_path):
    """A shard of one canned answer: 9 of 12 prompts answer it, the other 3 still differ."""
    refusal, own = "I'm sorry, but I can't help with that.", [f"The answer is {i * 37} apples, #### {i * 37}" for i in range(12)]
    for turned, alerted in ((9, True), (6, True), (5, False), (2, False)):
        history = SampleHistory(tmp_path / str(turned), AlertConfig(persist_events=1))
        ev, _ = record(history, 1, [refusal] * turned + own[turned:])
        collapse = [a for a in ev.alerts if a.startswith("collapse:")]
        assert bool(collapse) == alerted, (turned, ev.alerts)
        if alerted:
            assert f"{turned} of 12 prompts get near-identical generations" in collapse[0]
    history = SampleHistory(tmp_path / "off", AlertConfig(persist_events=1, collapse_share=1.0))
    ev, _ = record(history, 1, [refusal] * 9 + own[9:])
    assert not [a for a in ev.alerts if a.startswith("collapse:")]  # 1 turns it off


def test_a_drop_within_the_noise_of_the_sampled_answers_does_not_alert(tmp_path):
    def exact_match_alerts(config, right_after):
        history = SampleHistory(tmp_path / f"{config.noise_z}_{right_after}", config)
        refs = [str(i) for i in range(16)]
        record(history, 1, [str(i) if i < 10 else "x" for i in range(16)], references=refs)  # 10 of 16 right
        ev, _ = record(history, 2, [str(i) if i < right_after else "x" for i in range(16)], references=refs)
        return [a for a in ev.alerts if a.startswith("exact_match_drop")]

    # 10/16 -> 5/16 is a drop of 0.31 > metric_drop, but two standard errors of the difference are 0.34.
    assert not exact_match_alerts(AlertConfig(), right_after=5)
    assert exact_match_alerts(AlertConfig(), right_after=2)  # 0.5 below the best: beyond the noise
    assert exact_match_alerts(AlertConfig(noise_z=0), right_after=5)  # the margin alone


def test_forgetting_fires_when_answers_right_for_a_while_turn_wrong_together(tmp_path):
    refs = ["1", "2", "3", "4", "5"]

    def run(events, name, noise_z=2.0, persist=1):
        history = SampleHistory(tmp_path / name, AlertConfig(stable_events=2, forgotten_share=0.4, noise_z=noise_z,
                                                             persist_events=persist))
        return [[a for a in record(history, step, texts, references=refs)[0].alerts if a.startswith("forgetting")]
                for step, texts in enumerate(events, start=1)]

    right = list(refs)
    alerts = run([right, right, right, right, ["x", "2", "3", "4", "5"], right, ["1", "x", "x", "4", "5"]], "steady")
    assert not any(alerts[:-1])  # one settled answer wrong is chance
    assert alerts[-1] and "2 of 5 prompts" in alerts[-1][0] and "sample 2, 3" in alerts[-1][0]
    # A model whose settled answers keep flipping (sampling while it is unsure): two more flips are its usual noise.
    unsure = [right, right, ["x", "2", "3", "4", "5"], ["1", "x", "3", "4", "5"], right, ["1", "2", "x", "x", "5"],
              right, right, ["x", "x", "3", "4", "5"]]
    assert not any(run(unsure, "unsure"))
    assert run(unsure, "unsure_no_noise_rule", noise_z=0)[-1]
    # persist_events=2: a whole event that dips and recovers is not forgetting; prompts that stay wrong are.
    dip = [right] * 6 + [["x", "x", "x", "4", "5"], right]
    assert not any(run(dip, "dip", persist=2))
    lasting = run([right] * 6 + [["1", "x", "x", "4", "5"]] * 2, "lasting", persist=2)
    assert not any(lasting[:-1]) and "2 of 5 prompts" in lasting[-1][0] and "2 events in a row" in lasting[-1][0]


def test_reward_drop_and_length_change(tmp_path):
    history = SampleHistory(tmp_path, AlertConfig(metric_drop=0.2, length_change_ratio=2.0, persist_events=1))
    record(history, 1, ["abc", "abd"], rewards=[{"r": 1.0}, {"r": 0.8}], prefix="samples")
    ev, _ = record(history, 2, ["abcabcabcabcabcabc", "x" * 20], rewards=[{"r": 0.5}, {"r": 0.4}], prefix="samples")
    rules = {a.split(":")[0] for a in ev.alerts}
    assert {"reward_drop", "length_change"} <= rules


def test_resume_drops_later_records_and_a_torn_line_and_remembers_the_past(tmp_path):
    history = SampleHistory(tmp_path, AlertConfig())
    record(history, 10, ["12"], references=["12"])
    record(history, 20, ["12"], references=["12"])
    with open(tmp_path / HISTORY_FILE, "a") as f:
        f.write('{"kind": "sample", "step": 30, "pro')  # crash mid-write
    assert [r["step"] for r in read_records(tmp_path / HISTORY_FILE)] == [10, 20]  # the reader survives

    resumed = SampleHistory(tmp_path, AlertConfig(), resume_step=10)
    assert [r["step"] for r in read_records(tmp_path / HISTORY_FILE)] == [10]
    ev, metrics = record(resumed, 20, ["13"], references=["12"])
    assert ev.samples[0].signals["similarity_to_previous"] == pytest.approx(0.5)  # vs step 10's "12"
    assert any(a.startswith("exact_match_drop") for a in ev.alerts)  # best so far came from before the resume
    lines = (tmp_path / HISTORY_FILE).read_text().splitlines()
    assert all(json.loads(l) for l in lines) and [json.loads(l)["step"] for l in lines if '"sample"' in l] == [10, 20]


def test_drift_fires_when_settled_answers_move_together(tmp_path):
    history = SampleHistory(tmp_path, AlertConfig(drift_share=0.4, stable_share=0.2, stable_events=2))
    answers = ["1", "2", "3", "4", "5"]
    record(history, 1, ["a", "b", "c", "d", "e"])
    ev, _ = record(history, 2, answers)  # everything changes while learning: not stable yet
    assert not [a for a in ev.alerts if a.startswith("drift")]
    record(history, 3, answers)  # one stable event
    ev, _ = record(history, 4, ["1", "2", "x", "y", "5"])  # a move after a single stable event: still learning
    assert not [a for a in ev.alerts if a.startswith("drift")]
    record(history, 5, ["1", "2", "x", "y", "5"])
    record(history, 6, ["1", "2", "x", "y", "5"])  # settled for two events
    ev, metrics = record(history, 7, ["1", "2", "3", "4", "5"])  # 40% moved at once
    assert [a for a in ev.alerts if a.startswith("drift")] == [
        "drift: 40% of answers changed after 2 stable events (0% changed last time)"]
    assert metrics["val/alert/drift"] == 1.0


def test_replaying_a_recorded_history_raises_the_alerts_the_run_raised(tmp_path):
    """Rules tuned offline (scripts/alert_precision.py --replay) see what a run would have seen."""
    rules = AlertConfig(drift_share=0.4, stable_share=0.2, stable_events=2, metric_drop=0.2, length_change_ratio=2.0,
                        persist_events=1)
    history = SampleHistory(tmp_path, rules)
    refs = ["1", "2", "3", "4", "5"]
    events = [["a", "b", "c", "d", "e"], refs, refs, refs, ["1", "x", "y", "z", "5"], ["1" * 30, "2", "3", "4", "5"],
              refs, ["x", "x", "x", "x", "x"]]
    for step, texts in enumerate(events, start=1):
        record(history, step, texts, references=refs)
    recorded = [{k: v for k, v in r.items() if k != "time"} for r in read_records(tmp_path / HISTORY_FILE) if r["kind"] == "alert"]
    assert {r["rule"] for r in recorded} >= {"drift", "exact_match_drop", "length_change"}  # the replay has something to match
    assert replay_alerts(read_records(tmp_path / HISTORY_FILE), rules) == recorded
    # Other rules, the same records: a stricter drop margin keeps only what still clears it.
    stricter = replay_alerts(read_records(tmp_path / HISTORY_FILE), AlertConfig(**{**rules.__dict__, "metric_drop": 0.9}))
    assert any(r["rule"] == "exact_match_drop" for r in stricter)
    assert [r for r in stricter if r["rule"] == "exact_match_drop"] == [r for r in recorded if r["rule"] == "exact_match_drop"
                                                                        and float(r["message"].split()[2].rstrip(",")) <= 0.1]


def test_degeneration_and_length_change_must_last_persist_events(tmp_path):
    """One answer looping once, or one event of long answers, is what a model learning a format does."""
    history = SampleHistory(tmp_path, AlertConfig(persist_events=2, length_change_ratio=2.0))
    loop, fine = [1, 2] * 4, [1, 2, 3]  # short loops: the mean length stays put
    rules = lambda ev: [a.split(":")[0] for a in ev.alerts]  # noqa: E731
    ev, _ = record(history, 1, ["ok", "ok too"], token_ids=[fine, fine])
    ev, _ = record(history, 2, ["a b a b", "ok too"], token_ids=[loop, fine])
    assert rules(ev) == []  # prompt id0 loops once
    ev, _ = record(history, 3, ["ok", "ok too"], token_ids=[fine, fine])
    ev, _ = record(history, 4, ["ok", "a b a b"], token_ids=[fine, loop])
    assert rules(ev) == []  # another prompt, once: no streak
    ev, _ = record(history, 5, ["ok", "a b a b"], token_ids=[fine, loop])
    assert rules(ev) == ["degeneration"] and "sample 2 repeats itself" in ev.alerts[0] and "2 events in a row" in ev.alerts[0]
    # Running to max_new_tokens: one event is not enough, two are.
    ev, _ = record(history, 6, ["ok", "fine"], token_ids=[fine, fine], stopped=[False, False])
    assert "degeneration" not in rules(ev)
    ev, _ = record(history, 7, ["ok", "fine"], token_ids=[fine, fine], stopped=[False, False])
    assert rules(ev) == ["degeneration"] and "ran to max_new_tokens" in ev.alerts[0]

    lengths = SampleHistory(tmp_path / "lengths", AlertConfig(persist_events=2, length_change_ratio=2.0))
    short, long_ = [[1, 2, 3]] * 2, [list(range(10, 30))] * 2
    fired = {}
    for step, ids in enumerate([short, short, long_, short, long_, long_, long_], start=1):
        ev, _ = record(lengths, step, ["x", "y"], token_ids=ids)
        fired[step] = [a for a in ev.alerts if a.startswith("length_change")]
    # A one-event spike (step 3) passes; a lasting change alerts at its second event (step 6), once.
    assert [step for step, alerts in fired.items() if alerts] == [6]
    assert fired[6] == ["length_change: mean length 3.0 -> 20.0 tokens, 2 events in a row"]


def test_a_resumed_history_remembers_streaks(tmp_path):
    """The streaks are rebuilt from the file: a loop before the resume and one after alert."""
    history = SampleHistory(tmp_path, AlertConfig(persist_events=2))
    record(history, 10, ["a b a b"], token_ids=[[1, 2] * 6])
    resumed = SampleHistory(tmp_path, AlertConfig(persist_events=2), resume_step=10)
    ev, _ = record(resumed, 20, ["a b a b"], token_ids=[[1, 2] * 6])
    assert [a.split(":")[0] for a in ev.alerts] == ["degeneration"]


def test_one_reliable_prompt_that_stays_wrong_is_forgetting_and_a_flaky_one_is_not(tmp_path):
    refs = ["1", "2", "3", "4", "5"]
    history = SampleHistory(tmp_path, AlertConfig(stable_events=2, persist_events=2, forgotten_chance=1e-4))
    steps = [refs] * 12  # every prompt settles and stays right: a clean record
    flaky = [["x" if (i + j) % 2 else a for j, a in enumerate(refs[:1])] + refs[1:] for i in range(6)]  # prompt 1 flips
    history_flaky = SampleHistory(tmp_path / "flaky", AlertConfig(stable_events=2, persist_events=2, forgotten_chance=1e-4))
    alerts, flaky_alerts = [], []
    for step, texts in enumerate(steps + [["1", "x", "3", "4", "5"]] * 4, start=1):
        alerts.append([a for a in record(history, step, texts, references=refs)[0].alerts if a.startswith("forgetting")])
    # wrong once: nothing; wrong 2-3 times after 10 right ones: (1/12)^k is still above 1e-4 at k=3 ...
    assert not any(alerts[:15]) and alerts[15] == ["forgetting: sample 2 (exact_match), right 10 of 10 times since it settled, "
                                                   "is wrong 4 events in a row"]
    for step, texts in enumerate([refs, refs] + flaky * 2 + [["x", "2", "3", "4", "5"]] * 4, start=1):
        flaky_alerts.append([a for a in record(history_flaky, step, texts, references=refs)[0].alerts if a.startswith("forgetting")])
    assert not any(flaky_alerts)  # a prompt wrong half the time since it settled: its streak is chance


def test_a_reward_the_first_sample_lacks_is_still_watched(tmp_path):
    # the reward model's score on the second sample only (its scorer failed on the first)
    history = SampleHistory(tmp_path, AlertConfig(metric_drop=0.2, persist_events=1))
    record(history, 1, ["abc", "abd"], rewards=[{"r": 1.0}, {"r": 0.8, "rm": 2.0}], prefix="samples")
    ev, _ = record(history, 2, ["abc", "abd"], rewards=[{"r": 1.0}, {"r": 0.8, "rm": -3.0}], prefix="samples")
    assert [a.split(":")[0] for a in ev.alerts] == ["reward_drop"] and "rm" in ev.alerts[0], ev.alerts

    tracking = Tracking(["file"], TrackerContext(tmp_path / "run", "p", "e", tracker_env({})), is_primary=True)
    gens = [Generated([1, 2], [5, 6], t, True) for t in ("abc", "abd")]
    metrics = SampleLogger(tracking, None).log(3, "train", "samples", "rollout", ["p0", "p1"], gens, [None, None], SETTINGS,
                                               [0, 1], 0.01, rewards=[{"r": 1.0}, {"r": 0.8, "rm": 2.0}])
    assert metrics["samples/reward/r"] == pytest.approx(0.9) and metrics["samples/reward/rm"] == 2.0
