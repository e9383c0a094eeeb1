"""Synthetic run directories for the HTML report tests, written by hand with the file contract.

`build_small_run` writes a run whose facts the tests know (see the returned dict): four prompts,
validation events (prefix "val"), RL sample events (prefix "samples"), alerts in place and one
event-wide alert, a resume that logs step 150 again (a duplicated sample and alert, the last one
wins), a generation with "<script>alert(1)</script>", and a torn last line in both files.
`build_large_run` writes hundreds of events for the size test.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Optional

SETTINGS_GREEDY = {"do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": 32, "seed": 0}
SETTINGS_SAMPLED = {"do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": 0.9, "max_new_tokens": 48, "seed": 1234}

SCRIPT = "<script>alert(1)</script>"

# prompt_id -> (prompt, reference)
PROMPTS = {
    "pa1": ("What is 6*7? Answer:", "42"),
    "pb2": ('Translate to French: <b>cat</b> & "dog"', "chat et chien"),
    "pd4": ("Say ok once:", "ok"),
    "pc3": ("Write a haiku about rain.", None),
}

# (step, stage, prefix) -> {prompt_id: generation}; the order of the events is the file order
FIRST_RUN = [
    (0, "validation", "val", {"pa1": "I do not know", "pb2": "le chat", "pd4": "okay"}),
    (50, "validation", "val", {"pa1": "The answer is 42 because six times seven", "pb2": "le chat et le chien", "pd4": "ok"}),
    (100, "validation", "val", {"pa1": "The answer is 41 because six times seven", "pb2": SCRIPT + " chat et chien", "pd4": "ok"}),
    (100, "step_100", "samples", {"pc3": "rain falls on the roof\nsoft drums in the night\nmorning is quiet"}),
    (150, "validation", "val", {"pa1": "The answer is 40 STALE", "pb2": "chat et chien", "pd4": "ok ok ok ok ok ok ok ok ok ok ok ok"}),
]
AFTER_RESUME = [  # resumed from the step-100 checkpoint: step 150 is logged again
    (150, "validation", "val", {"pa1": "The answer is 42", "pb2": "chat et chien", "pd4": "ok ok ok ok ok ok ok ok ok ok ok ok"}),
    (200, "validation", "val", {"pa1": "42", "pb2": "chat et chien", "pd4": "ok"}),
    (200, "step_200", "samples", {"pc3": "rain rain rain"}),
    (200, "post-train", "val", {"pa1": "42", "pb2": "chat et chien", "pd4": "ok"}),
]

ALERTS_FIRST_RUN = [
    {"step": 100, "stage": "validation", "rule": "exact_match_drop", "prompt_id": "pa1",
     "message": "exact match fell from 1 to 0 (was right at step 50)"},
    {"step": 150, "stage": "validation", "rule": "degeneration", "prompt_id": "pd4",
     "message": "repetition 0.92 and hit the 32-token limit"},
]
ALERTS_AFTER_RESUME = [
    {"step": 150, "stage": "validation", "rule": "degeneration", "prompt_id": "pd4",
     "message": "repetition 0.92 and hit the 32-token limit (after resume)"},
    {"step": 150, "stage": "validation", "rule": "collapse", "prompt_id": None,
     "message": "3 of 3 generations are near-identical"},
    {"step": 200, "stage": "step_200", "rule": "reward_drop", "prompt_id": "pc3",
     "message": "reward 'format' fell from 1 to 0.2"},
]


def _words_similarity(a: Optional[str], b: str) -> Optional[float]:
    if a is None:
        return None
    import difflib

    return round(difflib.SequenceMatcher(None, a.split(), b.split()).ratio(), 3)


def _repetition(text: str) -> float:
    words = text.split()
    if len(words) < 2:
        return 0.0
    return round(1 - len(set(words)) / len(words), 3)


def sample_record(step: int, stage: str, prefix: str, index: int, pid: str, prompt: str, reference: Optional[str],
                  generation: str, previous: Optional[str], rewards: Optional[dict] = None,
                  alerts: Optional[list] = None, settings: Optional[dict] = None, t: float = 0.0) -> dict:
    tokens = len(generation.split())
    settings = settings or (SETTINGS_GREEDY if prefix == "val" else SETTINGS_SAMPLED)
    hit = tokens >= 12
    em = None if reference is None else float(generation.strip() == reference.strip())
    return {
        "kind": "sample", "step": step, "stage": stage, "prefix": prefix, "index": index, "prompt_id": pid,
        "prompt": prompt, "reference": reference, "generation": generation, "settings": settings,
        "prompt_tokens": len(prompt.split()), "generated_tokens": tokens, "stopped_at_eos": not hit,
        "rewards": rewards or {},
        "signals": {"length_tokens": tokens, "hit_limit": hit, "repetition": _repetition(generation),
                    "exact_match": em, "similarity_to_previous": _words_similarity(previous, generation)},
        "alerts": alerts or [], "time": 1_700_000_000.0 + t,
    }


def _write_lines(path: Path, records: list[dict], torn: bytes) -> None:
    with open(path, "wb") as handle:
        for r in records:
            handle.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
        handle.write(torn)  # a crash in the middle of a write: no newline, cut inside a UTF-8 char


def build_small_run(run_dir: Path) -> dict:
    """Write metrics.jsonl and samples.jsonl; return the facts the tests check."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    alerts_in_sample = {(100, "pa1"): ["exact_match_drop"], (150, "pd4"): ["degeneration"], (200, "pc3"): ["reward_drop"]}
    rewards = {(100, "pc3"): {"format": 1.0, "correct": 0.5}, (200, "pc3"): {"format": 0.2, "correct": 0.0}}
    records: list[dict] = []
    previous: dict[tuple, str] = {}
    t = 0.0
    for phase, events, alerts in (("first", FIRST_RUN, ALERTS_FIRST_RUN), ("resume", AFTER_RESUME, ALERTS_AFTER_RESUME)):
        for step, stage, prefix, gens in events:
            for index, (pid, gen) in enumerate(gens.items(), start=1):
                prompt, ref = PROMPTS[pid]
                key = (pid, prefix)
                stage_alerts = alerts_in_sample.get((step, pid), []) if stage != "post-train" else []
                records.append(sample_record(step, stage, prefix, index, pid, prompt, ref, gen, previous.get(key),
                                             rewards.get((step, pid)), stage_alerts, t=t))
                previous[key] = gen
                t += 1
            for a in alerts:
                if (a["step"], a["stage"]) == (step, stage):
                    records.append({"kind": "alert", **a, "time": 1_700_000_000.0 + t})
    torn = json.dumps({"kind": "sample", "step": 250, "stage": "validation", "prefix": "val", "index": 1,
                       "prompt_id": "pa1", "prompt": "é", "generation": "torn"}, ensure_ascii=False).encode()
    _write_lines(run_dir / "samples.jsonl", records, torn[: torn.index("é".encode()) + 1])

    metrics: list[dict] = []
    rng = random.Random(0)
    for step in range(1, 151):
        metrics.append({"step": step, "time": float(step), "train/loss": 2.2 * math.exp(-step / 60) + 0.4 + rng.uniform(0, 0.05),
                        "train/lr": 1e-4, "train/grad_norm": 1.0 + rng.random()})
    for step in range(101, 201):  # resumed from 100: steps 101..150 again, then on
        metrics.append({"step": step, "time": 1000.0 + step, "train/loss": 2.2 * math.exp(-step / 60) + 0.35,
                        "train/lr": 1e-4, "train/grad_norm": 1.0})
    em = {0: 0.0, 50: 1.0, 100: 0.5, 150: 0.5, 200: 1.0}
    for step, value in em.items():
        metrics.append({"step": step, "time": 2000.0 + step, "val/loss": 2.0 * math.exp(-step / 70) + 0.5, "val/exact_match": value,
                        "val/alerts": float(step in (100, 150))})
    metrics.append({"step": 100, "time": 3000.0, "samples/reward/format": 1.0, "samples/reward/correct": 0.5})
    metrics.append({"step": 200, "time": 3001.0, "samples/reward/format": 0.2, "samples/reward/correct": 0.0})
    _write_lines(run_dir / "metrics.jsonl", metrics, b'{"step": 201, "time": 4000.0, "train/lo')

    return {
        "prompt_ids": ["pa1", "pb2", "pd4", "pc3"],  # order of first appearance
        "events_per_prompt": {"pa1": 6, "pb2": 6, "pd4": 6, "pc3": 2},
        "sample_events": 8,  # distinct (step, stage, prefix)
        "steps": 201,  # distinct steps 0..200
        "alerts": [  # (step, rule, prompt_id), in report order
            (100, "exact_match_drop", "pa1"), (150, "degeneration", "pd4"), (150, "collapse", None), (200, "reward_drop", "pc3"),
        ],
        "alert_steps": [100, 150, 200],
        "diff": {"prompt_id": "pa1", "step": 100, "deleted": "42", "inserted": "41"},
        "after_resume": {"prompt_id": "pa1", "step": 150, "generation": "The answer is 42", "stale": "STALE"},
        "script_prompt": "pb2",
        "filter_word": "haiku",  # matches pc3 only
        "reward_series": ["samples/reward/correct", "samples/reward/format", "val/exact_match"],
    }


def build_large_run(run_dir: Path, events: int = 300, prompts: int = 5, train_steps: int = 3000, words: int = 60) -> dict:
    """`events` validation events x `prompts` prompts, a metric every train step, a few alerts."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(400)]
    gens = {f"p{j}": [rng.choice(vocab) for _ in range(words)] for j in range(prompts)}
    every = max(1, train_steps // events)
    records: list[dict] = []
    n_alerts = 0
    previous: dict[str, str] = {}
    for e in range(events):
        step = (e + 1) * every
        for j in range(prompts):
            pid = f"p{j}"
            words_ = gens[pid]
            for _ in range(3):  # a few words change per event
                words_[rng.randrange(len(words_))] = rng.choice(vocab)
            gen = " ".join(words_)
            alert = e % 40 == 39 and j == e % prompts
            records.append(sample_record(step, "validation", "val", j + 1, pid, f"Prompt number {j}: continue the story",
                                         "w1 w2", gen, previous.get(pid), {"format": rng.random()},
                                         ["length_change"] if alert else [], t=step))
            previous[pid] = gen
            if alert:
                n_alerts += 1
                records.append({"kind": "alert", "step": step, "stage": "validation", "rule": "length_change", "prompt_id": pid,
                                "message": "length changed by 2.4x", "time": 0.0})
    _write_lines(run_dir / "samples.jsonl", records, b"")
    metrics = [{"step": s, "time": float(s), "train/loss": 3 * math.exp(-s / 800) + 0.2 + rng.uniform(0, 0.1), "train/lr": 1e-4}
               for s in range(1, train_steps + 1)]
    metrics += [{"step": (e + 1) * every, "time": 0.0, "val/loss": 3 * math.exp(-(e + 1) * every / 900) + 0.3,
                 "val/exact_match": rng.random(), "val/reward/format": rng.random()} for e in range(events)]
    _write_lines(run_dir / "metrics.jsonl", metrics, b"")
    return {"events": events, "prompts": prompts, "train_steps": train_steps, "alerts": n_alerts}


def build_grid_run(run_dir: Path, prompts: int = 64, events: int = 200, words: int = 25) -> dict:
    """`prompts` x `events` validation samples of three kinds (a third each): with a reference that
    the model learns to match after a prompt-specific event, with a reward only, with neither (the
    grid then colours how much the answer changed). One alert per 25 events, on a known cell."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(2)
    vocab = [f"w{i}" for i in range(300)]
    records: list[dict] = []
    previous: dict[str, str] = {}
    texts = {j: [rng.choice(vocab) for _ in range(words)] for j in range(prompts)}
    learned_at = {j: rng.randrange(events) for j in range(prompts)}
    alert_cells = []
    for e in range(events):
        step = (e + 1) * 10
        for j in range(prompts):
            pid, kind = f"g{j:02d}", j % 3
            reference = f"answer {j}" if kind == 0 else None
            if kind == 0 and e >= learned_at[j]:
                gen = reference
            else:
                for _ in range(rng.randrange(4)):
                    texts[j][rng.randrange(words)] = rng.choice(vocab)
                gen = " ".join(texts[j])
            reward = {"score": round(e / events + rng.uniform(-0.2, 0.2), 3)} if kind == 1 else None
            alert = e % 25 == 24 and j == (e // 25) % prompts
            records.append(sample_record(step, "validation", "val", j + 1, pid, f"Grid prompt {j}: go on",
                                         reference, gen, previous.get(pid), reward, ["drift"] if alert else [], t=step))
            previous[pid] = gen
            if alert:
                alert_cells.append((pid, e + 1))
                records.append({"kind": "alert", "step": step, "stage": "validation", "rule": "drift", "prompt_id": pid,
                                "message": "answers moved together", "time": 0.0})
    _write_lines(run_dir / "samples.jsonl", records, b"")
    metrics = [{"step": s, "time": float(s), "train/loss": 3 * math.exp(-s / 600) + 0.2} for s in range(1, events * 10 + 1)]
    _write_lines(run_dir / "metrics.jsonl", metrics, b"")
    return {"prompts": prompts, "events": events, "alert_cells": alert_cells, "learned_at": learned_at}


# A run that rolled back and then stopped, in the files' format as trainer/history.py,
# trainer/run_actions.py and trainer/tracking/file.py write them (compare a real run of
# tests/distributed/test_alert_actions_ranks.py): validations at steps 2, 4 and 6; an alert at 6
# rolls back to step 4 (the step-6 samples and alert stay, marked "discarded", then the "rollback"
# record); steps 5-6 are trained again, a second alert at step 8 stops the run.
ROLLBACK_GENERATIONS = [  # (step, discarded, {prompt_id: generation})
    (2, False, {"pa1": "I think 41", "pb2": "le chat"}),
    (4, False, {"pa1": "42", "pb2": "chat et chien"}),
    (6, True, {"pa1": "BROKEN BROKEN BROKEN BROKEN", "pb2": "GARBAGE"}),
    (6, False, {"pa1": "42 again", "pb2": "chat et chien"}),
    (8, False, {"pa1": "42 42 42 42 42 42", "pb2": "chat et chien"}),
]
DISCARDED_LOSS = {5: 0.9, 6: 1.3}  # train/loss of the discarded steps (rising: why the run rolled back)
RETRAINED_LOSS = {5: 0.55, 6: 0.5, 7: 0.45, 8: 0.4}


def build_rollback_run(run_dir: Path, skip_data: bool = True) -> dict:
    """Write samples.jsonl, metrics.jsonl and run_state.json of the run above; return its facts."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    previous: dict[str, str] = {}
    t = 0.0
    for step, discarded, gens in ROLLBACK_GENERATIONS:
        alert = step in (6, 8) and (discarded or step == 8)
        for index, (pid, gen) in enumerate(gens.items(), start=1):
            prompt, ref = PROMPTS[pid]
            tags = [f"repeats itself at step {step}"] if alert and pid == "pa1" else []
            record = sample_record(step, "validation", "val", index, pid, prompt, ref, gen, previous.get(pid), alerts=tags, t=t)
            records.append({**record, "discarded": True} if discarded else record)
            if not discarded:
                previous[pid] = gen
            t += 1
        if alert:
            a = {"kind": "alert", "step": step, "stage": "validation", "prefix": "val", "rule": "degeneration", "prompt_id": "pa1",
                 "message": f"repeats itself at step {step}", "time": 1_700_000_000.0 + t}
            records.append({**a, "discarded": True} if discarded else a)
        if discarded:
            records.append({"kind": "rollback", "step": 6, "prefix": "val", "to_step": 4, "rule": "degeneration",
                            "prompt": PROMPTS["pa1"][0], "message": "repeats itself at step 6", "rollbacks": 1, "lr_scale": 0.5,
                            "skipped": [5, 6] if skip_data else None, "time": 1_700_000_000.0 + t})
    _write_lines(run_dir / "samples.jsonl", records, b"")

    def train(step: int, loss: float) -> dict:
        return {"step": step, "time": float(step), "train/loss": loss, "train/lr": 1e-3}

    metrics = [train(s, 1.0 - 0.1 * s) for s in range(1, 5)] + [train(s, v) for s, v in DISCARDED_LOSS.items()]
    metrics.insert(2, {"step": 2, "time": 2.5, "val/loss": 0.95, "val/exact_match": 0.0})
    metrics.insert(5, {"step": 4, "time": 4.5, "val/loss": 0.7, "val/exact_match": 1.0})
    metrics.append({"step": 6, "time": 6.5, "val/loss": 1.5, "val/exact_match": 0.0, "val/alerts": 1.0, "val/alert/degeneration": 1.0})
    metrics.append({"step": 6, "time": 6.6, "val/rollback": 1.0, "val/rollback_to_step": 4.0, "train/lr_scale": 0.5})
    for s, v in RETRAINED_LOSS.items():
        metrics.append({**train(s, v), "train/lr": 5e-4})
        if s in (6, 8):
            metrics.append({"step": s, "time": s + 0.5, "val/loss": 0.65 if s == 6 else 0.8, "val/exact_match": 1.0,
                            "val/alerts": float(s == 8)})
    _write_lines(run_dir / "metrics.jsonl", metrics, b"")
    reason = "sample alert [degeneration] at step 8 (prompt 'What is 6*7? Answer:'): repeats itself at step 8"
    (run_dir / "run_state.json").write_text(json.dumps({
        "status": "stopped", "total_steps": 12, "exit_code": 3, "updated": 1_700_000_100.0, "reason": reason,
        "stop": {"rule": "degeneration", "prompt": PROMPTS["pa1"][0], "step": 8, "message": "repeats itself at step 8",
                 "checkpoint": str(run_dir / "global_step_8")}, "host": "elsewhere"}))
    return {
        "rollback_text": "rolled back to step 4: degeneration, learning rate ×0.5, "
                         + ("data of steps 5–6 skipped" if skip_data else "data reshuffled"),
        "stop_text": "stopped: degeneration at step 8",
        "discarded": {"pa1": "BROKEN BROKEN BROKEN BROKEN", "pb2": "GARBAGE"},
        "retrained": {"pa1": "42 again", "pb2": "chat et chien"},
        "discarded_loss": DISCARDED_LOSS, "retrained_loss": RETRAINED_LOSS,
        "columns": 5,  # sample events: 2, 4, 6 (discarded), 6, 8
    }
