"""Sample history: every sample of every event in `samples.jsonl`, its signals, and alert rules.

The point of logging samples is to see a regression before the loss shows it. Each sample gets
signals (length, hit-the-limit, repetition, exact match, similarity to the same prompt's previous
generation) and its task metrics; each event is checked against alert rules (degeneration,
collapse, drift of settled answers, right answers forgotten, a drop in the watched task metric
(`samples.alerts.metric`, exact match by default) or a reward against the run's best, a sudden
length change). An alert is a log warning naming the rule, the prompt and the step, a
tracker metric, and a record the report shows.

The file is append-only, one JSON object per line, written per event with a flush and fsync.
On start, records after the resumed step are dropped (they are about to be generated again) and
a torn last line from a crash is discarded, so the history never holds duplicates or garbage.
"""

from __future__ import annotations

import difflib
import itertools
import json
import logging
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from config.schema import AlertConfig
from trainer.tracking import SampleEvent, SampleRecord
from trainer.tracking.file import read_records
from workers.generation import Generated, GenerationSettings

log = logging.getLogger(__name__)

HISTORY_FILE = "samples.jsonl"
REPETITION_NGRAM = 3


# ----------------------------------------------------------------------------- signals
def repetition(token_ids: Sequence[int], n: int = REPETITION_NGRAM) -> float:
    """Share of the generation's n-grams that repeat an earlier one (0: none, near 1: a loop)."""
    grams = [tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def exact_match(generation: str, reference: Optional[str]) -> Optional[float]:
    if reference is None:
        return None
    return float(generation.strip() == reference.strip())


@dataclass
class Alert:
    rule: str
    message: str
    prompt_id: Optional[str] = None  # None: about the whole event


@dataclass(frozen=True)
class _Mean:
    """One event's mean of a per-sample metric, with the spread needed to tell a drop from noise."""

    value: float
    variance: float  # of the samples (population), 0 for a single sample
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "_Mean":
        return cls(sum(values) / len(values), statistics.pvariance(values) if len(values) > 1 else 0.0, len(values))

    def dropped_from(self, best: "_Mean", margin: float, z: float) -> bool:
        """Below `best` by more than `margin` and, with z > 0, by more than z standard errors."""
        stderr = math.sqrt(best.variance / best.count + self.variance / self.count)
        return best.value - self.value > max(margin, z * stderr)


@dataclass
class _Series:
    """What the rules remember about one stream of events (SFT validation, RL samples)."""

    events: int = 0
    previous_generation: dict[str, str] = field(default_factory=dict)
    best_exact_match: Optional[_Mean] = None  # of the watched metric (`alerts.metric`: exact match by default)
    best_reward: dict[str, _Mean] = field(default_factory=dict)
    mean_lengths: list[float] = field(default_factory=list)  # per event, oldest first (the length rule's baseline)
    loop_streak: dict[str, int] = field(default_factory=dict)  # per prompt: events in a row its answer repeated itself
    limit_streak: int = 0  # events in a row in which too many samples ran to max_new_tokens
    wrong_streak: dict[str, int] = field(default_factory=dict)  # per prompt: events in a row answered wrong
    prompt_seen: dict[str, int] = field(default_factory=dict)  # per settled prompt: answers since it settled ...
    prompt_lost: dict[str, int] = field(default_factory=dict)  # ... and how many of them were wrong
    previous_change_share: Optional[float] = None  # share of prompts whose answer changed last time
    stable_streak: int = 0  # events in a row in which at most `stable_share` of the answers changed
    right_streak: dict[str, int] = field(default_factory=dict)  # per prompt: events in a row answered right
    mastered: set[str] = field(default_factory=set)  # prompts once answered right `stable_events` times in a row


def _change_share(series: _Series, pids, generations) -> Optional[float]:
    """Share of prompts (seen before) whose generation differs from their previous one."""
    seen = [(pid, g) for pid, g in zip(pids, generations) if pid in series.previous_generation]
    if not seen:
        return None
    return sum(series.previous_generation[pid] != g for pid, g in seen) / len(seen)


class SampleHistory:
    def __init__(self, run_dir: Path, alerts: AlertConfig, resume_step: int = 0):
        self.path = Path(run_dir) / HISTORY_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rules = alerts
        self.metric = alerts.metric or "exact_match"  # what the drop and forgetting rules watch
        self.series: dict[str, _Series] = {}
        self.last_alerts: list[tuple[str, Optional[str], str]] = []  # the last event's (rule, prompt, message)
        # Records of steps a rollback discarded, and the rollbacks, are the run's history: kept.
        kept = [r for r in read_records(self.path)
                if r.get("step", 0) <= resume_step or r.get("discarded") or r.get("kind") == "rollback"]
        self._rewrite(kept)
        self._replay([r for r in kept if not r.get("discarded")])

    def _rewrite(self, records: list[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, self.path)

    def discard_after(self, step: int, rollback: dict) -> None:
        """A rollback to `step`: the later records stay, marked `discarded`, and the rules forget
        them; `rollback` (kind "rollback") is appended."""
        records = read_records(self.path)
        for r in records:
            if r.get("step", 0) > step and r.get("kind") != "rollback":
                r["discarded"] = True
        self._rewrite([*records, rollback])
        self.series = {}
        self._replay([r for r in records if not r.get("discarded")])

    def _replay(self, records: list[dict]) -> None:
        """Rebuild the rules' memory from the kept history, so a resumed run alerts as before."""
        for _, _, group in _recorded_events(records):
            self._remember_records(self.series.setdefault(group[0]["prefix"], _Series()), group)

    def _remember_records(self, series: _Series, group: list[dict]) -> None:
        self._remember(series, [r["prompt_id"] for r in group], [r["generation"] for r in group],
                       [self._watched(r.get("metrics", {}), r["signals"]) for r in group], [r.get("rewards", {}) for r in group],
                       [r["generated_tokens"] for r in group], [r["signals"] for r in group])

    def _watched(self, metrics: dict, signals: dict) -> Optional[float]:
        """The watched metric of one sample (exact match from its signals in files from before metrics)."""
        return metrics.get(self.metric, signals.get(self.metric))

    def _remember(self, series: _Series, pids, generations, matches, rewards, lengths, signals) -> None:
        series.events += 1
        for pid, sig in zip(pids, signals):
            series.loop_streak[pid] = series.loop_streak.get(pid, 0) + 1 if sig["repetition"] > self.rules.repetition_threshold else 0
        if signals:
            over = sum(bool(sig["hit_limit"]) for sig in signals) / len(signals) > self.rules.limit_hit_share
            series.limit_streak = series.limit_streak + 1 if over else 0
        share = _change_share(series, pids, generations)
        if share is not None:
            series.previous_change_share = share
            series.stable_streak = series.stable_streak + 1 if share <= self.rules.stable_share else 0
        series.previous_generation.update(zip(pids, generations))
        for pid, match in zip(pids, matches):
            if match is None:
                continue
            if pid in series.mastered:
                series.prompt_seen[pid] = series.prompt_seen.get(pid, 0) + 1
                series.prompt_lost[pid] = series.prompt_lost.get(pid, 0) + (match == 0.0)
            series.right_streak[pid] = series.right_streak.get(pid, 0) + 1 if match == 1.0 else 0
            series.wrong_streak[pid] = series.wrong_streak.get(pid, 0) + 1 if match == 0.0 else 0
            if series.right_streak[pid] >= self.rules.stable_events:
                series.mastered.add(pid)
        matches = [m for m in matches if m is not None]
        if matches:
            mean = _Mean.of(matches)
            if series.best_exact_match is None or mean.value > series.best_exact_match.value:
                series.best_exact_match = mean
        for name in dict.fromkeys(name for r in rewards or [] for name in r):
            mean = _Mean.of([r[name] for r in rewards if name in r])
            if name not in series.best_reward or mean.value > series.best_reward[name].value:
                series.best_reward[name] = mean
        mean_length = sum(lengths) / max(1, len(lengths))
        series.mean_lengths = [*series.mean_lengths, mean_length][-max(2, self.rules.persist_events + 1):]

    # ------------------------------------------------------------------ one event
    def record(
        self, event: SampleEvent, generations: Sequence[Generated],
        settings: GenerationSettings | Sequence[GenerationSettings], seeds: Sequence[int],
    ) -> dict[str, float]:
        """Add signals to the event's samples, run the rules, append to the file; returns metrics.
        `settings`: the event's, or each sample's own."""
        series = self.series.setdefault(event.prefix, _Series())
        for s, g in zip(event.samples, generations):
            previous = series.previous_generation.get(s.prompt_id)
            s.signals = {
                "length_tokens": g.num_tokens,
                "hit_limit": not g.stopped_at_eos,
                "repetition": round(repetition(g.token_ids), 4),
                "exact_match": exact_match(g.text, s.reference),
                "similarity_to_previous": None if previous is None else round(similarity(previous, g.text), 4),
            }
        alerts = self._check(event, series)
        event.alerts = [f"{a.rule}: {a.message}" for a in alerts]
        prompts = {s.prompt_id: s.prompt for s in event.samples}
        self.last_alerts = [(a.rule, prompts.get(a.prompt_id), a.message) for a in alerts]
        self._append(event, generations, settings, seeds, alerts)
        for a in alerts:
            where = f"prompt {a.prompt_id}" if a.prompt_id else "all prompts"
            log.warning("sample alert [%s] at step %d (%s, %s): %s", a.rule, event.step, event.stage, where, a.message)

        self._remember(series, [s.prompt_id for s in event.samples], [s.generation for s in event.samples],
                       [self._watched(s.metrics, s.signals) for s in event.samples], [s.rewards for s in event.samples],
                       [g.num_tokens for g in generations], [s.signals for s in event.samples])
        n = max(1, len(event.samples))
        sims = [s.signals["similarity_to_previous"] for s in event.samples if s.signals["similarity_to_previous"] is not None]
        metrics = {
            f"{event.prefix}/repetition_mean": sum(s.signals["repetition"] for s in event.samples) / n,
            f"{event.prefix}/hit_limit_share": sum(s.signals["hit_limit"] for s in event.samples) / n,
            f"{event.prefix}/alerts": float(len(alerts)),
        }
        if sims:
            metrics[f"{event.prefix}/similarity_to_previous_mean"] = sum(sims) / len(sims)
        for rule in sorted({a.rule for a in alerts}):
            metrics[f"{event.prefix}/alert/{rule}"] = float(sum(a.rule == rule for a in alerts))
        return metrics

    def _check(self, event: SampleEvent, series: _Series) -> list[Alert]:
        r = self.rules
        samples = event.samples
        alerts: list[Alert] = []
        # Degeneration and length changes must last `persist_events` events: while a model learns a
        # new format, one answer loops once or one event's answers run long, and the next are fine.
        persist = r.persist_events
        lasting = "" if persist == 1 else f", {persist} events in a row"
        for s in samples:
            if s.signals["repetition"] > r.repetition_threshold and series.loop_streak.get(s.prompt_id, 0) + 1 >= persist:
                alerts.append(Alert("degeneration", f"sample {s.index} repeats itself ({s.signals['repetition']:.0%} of 3-grams{lasting})",
                                    s.prompt_id))
        if samples:
            share = sum(s.signals["hit_limit"] for s in samples) / len(samples)
            if share > r.limit_hit_share and series.limit_streak + 1 >= persist:
                alerts.append(Alert("degeneration", f"{share:.0%} of samples ran to max_new_tokens without stopping{lasting}"))
        firsts = [s.generation for s in samples if s.sample == 0 and not s.greedy]  # one answer per prompt
        if len(firsts) >= 2:
            sims = {(i, j): similarity(firsts[i], firsts[j]) for i, j in itertools.combinations(range(len(firsts)), 2)}
            mean_sim = sum(sims.values()) / len(sims)
            # The largest set of prompts whose answers are near-identical to one prompt's: a bad shard
            # of one canned answer turns most answers into it while the rest still differ, and the
            # mean over all pairs stays low until nearly every answer has turned.
            alike = max(1 + sum(sims[min(i, j), max(i, j)] > r.collapse_similarity for j in range(len(firsts)) if j != i)
                        for i in range(len(firsts)))
            if mean_sim > r.collapse_similarity:
                alerts.append(Alert("collapse", f"different prompts get near-identical generations (mean similarity {mean_sim:.2f})"))
            elif alike >= 3 and alike >= r.collapse_share * len(firsts):
                alerts.append(Alert("collapse", f"{alike} of {len(firsts)} prompts get near-identical generations "
                                                f"(similarity above {r.collapse_similarity:g})"))
        share = _change_share(series, [s.prompt_id for s in samples], [s.generation for s in samples])
        if share is not None and series.stable_streak >= r.stable_events and share >= r.drift_share:
            # Each prompt keeps its seed, so a changed answer means a changed model. Answers that
            # had settled for a while and now move together are the earliest sign of a regression.
            alerts.append(Alert("drift", f"{share:.0%} of answers changed after {series.stable_streak} stable events "
                                         f"({series.previous_change_share:.0%} changed last time)"))
        watched = {s.index: self._watched(s.metrics, s.signals) for s in samples}
        mastered = [s for s in samples if s.prompt_id in series.mastered and watched[s.index] is not None]
        # Forgotten: wrong `persist_events` events in a row. A sampled answer can flip by chance,
        # more often while the model is unsure, and a whole event can dip and recover; a prompt
        # that stays wrong is what a regression looks like. The number forgotten must also beat
        # the run's own rate of such flips (to the power of the events) by `noise_z` deviations.
        forgotten = [s for s in mastered if watched[s.index] == 0.0 and series.wrong_streak.get(s.prompt_id, 0) + 1 >= persist]
        # The run's rate of chance flips: wrong answers to settled prompts over all their answers.
        seen, lost = sum(series.prompt_seen.values()), sum(series.prompt_lost.values())
        chance = ((lost + 1) / (seen + 2)) ** persist
        expected, spread = len(mastered) * chance, math.sqrt(len(mastered) * chance * (1 - chance))
        if (len(forgotten) >= 2 and len(forgotten) >= r.forgotten_share * len(mastered)
                and len(forgotten) > expected + r.noise_z * spread):
            alerts.append(Alert("forgetting", f"{len(forgotten)} of {len(mastered)} prompts once answered right ({self.metric}) "
                                              f"{r.stable_events} times in a row are now wrong{lasting} (sample "
                                              f"{', '.join(str(s.index) for s in forgotten)})"))
        else:
            # One prompt alone, when it was reliable: the chance of its streak of wrong answers, from
            # its own rate before the streak, is below `forgotten_chance`. A regression often shows
            # in one settled answer for several validations before it spreads to others.
            for s in forgotten:
                k = series.wrong_streak.get(s.prompt_id, 0) + 1
                seen = series.prompt_seen.get(s.prompt_id, 0) - (k - 1)
                lost = series.prompt_lost.get(s.prompt_id, 0) - (k - 1)
                if ((lost + 1) / (seen + 2)) ** k < r.forgotten_chance:
                    alerts.append(Alert("forgetting", f"sample {s.index} ({self.metric}), right {seen - lost} of {seen} times "
                                                      f"since it settled, is wrong {k} events in a row", s.prompt_id))
                    break
        if series.events >= r.min_history:
            matches = [v for v in watched.values() if v is not None]
            best = series.best_exact_match
            if matches and best is not None and (mean := _Mean.of(matches)).dropped_from(best, r.metric_drop, r.noise_z):
                label = "exact match" if self.metric == "exact_match" else self.metric
                alerts.append(Alert(f"{self.metric}_drop", f"{label} {mean.value:.2f}, best so far {best.value:.2f}"))
            for name, best in series.best_reward.items():
                values = [s.rewards[name] for s in samples if name in s.rewards]
                if values and (mean := _Mean.of(values)).dropped_from(best, r.metric_drop, r.noise_z):
                    alerts.append(Alert("reward_drop", f"reward {name} {mean.value:.3f}, best so far {best.value:.3f}"))
            if len(series.mean_lengths) >= persist and samples:
                # Against the mean of the event before the change began: every event since then,
                # this one included, beyond the ratio on the same side.
                mean_len = sum(s.signals["length_tokens"] for s in samples) / len(samples)
                base = series.mean_lengths[-persist]
                ratios = [(m + 1) / (base + 1) for m in [*series.mean_lengths[len(series.mean_lengths) - persist + 1:], mean_len]]
                if all(x > r.length_change_ratio for x in ratios) or all(x < 1 / r.length_change_ratio for x in ratios):
                    alerts.append(Alert("length_change", f"mean length {base:.1f} -> {mean_len:.1f} tokens{lasting}"))
        return alerts

    def _append(self, event: SampleEvent, generations, settings: GenerationSettings, seeds, alerts: list[Alert]) -> None:
        now = time.time()
        per_sample = [settings] * len(event.samples) if isinstance(settings, GenerationSettings) else list(settings)
        lines = []
        for s, g, seed, st in zip(event.samples, generations, seeds, per_sample):
            base_settings = {
                "do_sample": st.do_sample, "temperature": st.temperature, "top_k": st.top_k,
                "top_p": st.top_p, "max_new_tokens": st.max_new_tokens,
            }
            extra = {"sample": s.sample, "greedy": True} if s.greedy else {"sample": s.sample} if s.sample else {}
            lines.append({
                "kind": "sample", "step": event.step, "stage": event.stage, "prefix": event.prefix, "index": s.index,
                "prompt_id": s.prompt_id, "prompt": s.prompt, "reference": s.reference, "generation": s.generation,
                "settings": {**base_settings, "seed": int(seed)}, "prompt_tokens": len(g.prompt_ids),
                "generated_tokens": g.num_tokens, "stopped_at_eos": g.stopped_at_eos, "rewards": s.rewards,
                "signals": s.signals, "metrics": s.metrics, **({"tags": s.tags} if s.tags else {}), **extra,
                "alerts": [a.message for a in alerts if a.prompt_id == s.prompt_id], "time": now,
            })
        for a in alerts:
            lines.append({"kind": "alert", "step": event.step, "stage": event.stage, "prefix": event.prefix, "rule": a.rule,
                          "prompt_id": a.prompt_id, "message": a.message, "time": now})
        payload = "".join(json.dumps(line, default=_json_default) + "\n" for line in lines)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())


def _recorded_events(records: Sequence[dict]):
    """(prefix, step, sample records) of each event in a history's records, in file order."""
    samples = [r for r in records if r.get("kind") == "sample"]
    for (prefix, step), group in itertools.groupby(samples, key=lambda r: (r["prefix"], r["step"])):
        yield prefix, step, list(group)


def replay_alerts(records: Sequence[dict], rules: AlertConfig) -> list[dict]:
    """The alerts `rules` raise on a recorded history (a samples.jsonl's records; discarded ones are
    left out). The rules read nothing but what the records hold (signals, metrics, rewards, answers,
    lengths) and `warn` leaves training alone, so this is what a warn-only run with these rules
    raises: rules can be tuned on recorded runs without training again (scripts/alert_precision.py
    --replay). Returns alert records as the history file writes them."""
    with tempfile.TemporaryDirectory() as scratch:
        history = SampleHistory(Path(scratch), rules)
    out = []
    for prefix, step, group in _recorded_events([r for r in records if not r.get("discarded")]):
        series = history.series.setdefault(prefix, _Series())
        event = SampleEvent(step=step, stage=group[0].get("stage", ""), prefix=prefix, style="validation", samples=[
            SampleRecord(index=r["index"], prompt=r["prompt"], generation=r["generation"], reference=r.get("reference"),
                         rewards=r.get("rewards", {}), signals=r["signals"], prompt_id=r["prompt_id"],
                         metrics=r.get("metrics", {}), sample=r.get("sample", 0), greedy=r.get("greedy", False))
            for r in group])
        out += [{"kind": "alert", "step": step, "stage": event.stage, "prefix": prefix, "rule": a.rule,
                 "prompt_id": a.prompt_id, "message": a.message} for a in history._check(event, series)]
        history._remember_records(series, group)
    return out


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
