"""Sample events: generations from the primary rank, turned into one event, printed to stdout
in the documented form, and sent to every tracker and to the run's sample history.

SFT validation and RL sample logging both come through `SampleLogger.log`, which also scores
every sample with the task metrics (`samples.metrics`, `workers.metrics`): per event their means
(`<prefix>/metric/<name>`), with k answers per prompt mean@k and pass@k, the greedy answer's
apart (`.../greedy`), and per prompt tag (`<prefix>/tag/<tag>/metric/<name>`).
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

from tqdm import tqdm

from trainer.history import SampleHistory, exact_match
from trainer.report import LiveReport
from trainer.tracking import SampleEvent, SampleRecord, Tracking
from trainer.tracking.console import format_samples
from workers.generation import Generated, GenerationSettings
from workers.metrics import at_k, mean
from workers.rewards import RewardSet

log = logging.getLogger(__name__)


def prompt_id(prompt_ids: Sequence[int]) -> str:
    """A stable id for a prompt (its tokens), the same in every event and across resumes."""
    return hashlib.sha1(",".join(map(str, prompt_ids)).encode()).hexdigest()[:12]


def sample_seed(run_seed: int, pid: str) -> int:
    """Each prompt's own sampling seed: two events differ only because the model changed."""
    return int(hashlib.sha1(f"{run_seed}:{pid}".encode()).hexdigest()[:8], 16)


@dataclass(frozen=True)
class SampleMeta:
    """One answer's place among its prompt's answers (`trainer.sample_prompts`)."""

    sample: int = 0  # which of the k sampled answers
    greedy: bool = False  # the greedy answer beside them
    tags: tuple[str, ...] = ()
    prompt_id: Optional[str] = None  # the prompt's stable id (None: from its tokens)
    settings: Optional[GenerationSettings] = None  # its own settings (None: the event's)

    def key(self, pid: str) -> str:
        """The id of this answer's series in the history: the prompt's id for its first sample."""
        return f"{pid}#greedy" if self.greedy else pid if self.sample == 0 else f"{pid}#{self.sample}"


@dataclass
class SampleLogger:
    tracking: Tracking
    history: Optional[SampleHistory] = None
    report: Optional[LiveReport] = None  # rewritten after each event, once its metrics are on file
    max_print_chars: int = 400  # longer texts are cut in the printed block; trackers get them whole
    metrics: RewardSet = field(default_factory=lambda: RewardSet([]))  # the task metrics (samples.metrics)

    def log(
        self,
        step: int,
        stage: str,
        prefix: str,
        style: str,
        prompts: Sequence[str],
        generations: Sequence[Generated],
        references: Sequence[Optional[str]],
        settings: GenerationSettings,
        seeds: Sequence[int],
        generation_time_s: float,
        rewards: Optional[Sequence[dict[str, float]]] = None,
        meta: Optional[Sequence[SampleMeta]] = None,
    ) -> dict[str, float]:
        """Log one event; returns its numeric metrics (also sent to the trackers)."""
        meta = list(meta) if meta is not None else [SampleMeta()] * len(generations)
        records = []
        for i, (prompt, gen, ref, m) in enumerate(zip(prompts, generations, references, meta), start=1):
            pid = m.prompt_id or prompt_id(gen.prompt_ids)
            records.append(
                SampleRecord(
                    index=i,
                    prompt=prompt,
                    generation=gen.text,
                    reference=ref,
                    rewards=dict(rewards[i - 1]) if rewards else {},
                    prompt_id=m.key(pid),
                    metrics=self.metrics.score(prompt, gen.text, ref),
                    sample=m.sample,
                    greedy=m.greedy,
                    tags=list(m.tags),
                )
            )
        event = SampleEvent(step=step, stage=stage, prefix=prefix, style=style, samples=records)
        metrics = {
            f"{prefix}/generation_time_s": generation_time_s,
            f"{prefix}/samples_generated": float(len(records)),
            f"{prefix}/mean_generation_tokens": sum(g.num_tokens for g in generations) / max(1, len(generations)),
        }
        sampled = [r for r in records if not r.greedy]
        matches = [m for m in (exact_match(r.generation, r.reference) for r in sampled) if m is not None]
        if matches:
            metrics[f"{prefix}/exact_match"] = sum(matches) / len(matches)
        if rewards:
            for name in dict.fromkeys(name for r in rewards for name in r):  # a sample may lack one (a failed scorer)
                values = [r.rewards[name] for r in sampled if name in r.rewards]
                if values:
                    metrics[f"{prefix}/reward/{name}"] = sum(values) / len(values)
        metrics.update(metric_summary(prefix, records, self.metrics.names, [m.prompt_id or r.prompt_id for m, r in zip(meta, records)]))
        if self.history is not None:
            per_sample = [m.settings or settings for m in meta]
            metrics.update(self.history.record(event, generations, per_sample, seeds))
        tqdm.write(format_samples(event, self.max_print_chars))  # stdout, whatever the trackers
        self.tracking.log_samples(event)
        self.tracking.log_metrics(metrics, step)
        if self.report is not None and (seconds := self.report.update()) is not None:
            metrics[f"{prefix}/report_time_s"] = seconds
            self.tracking.log_metrics({f"{prefix}/report_time_s": seconds}, step)
        return metrics


def metric_summary(prefix: str, records: Sequence[SampleRecord], names: Sequence[str], pids: Sequence[str]) -> dict[str, float]:
    """The event's task metrics: the mean over sampled answers, the greedy answers' mean, with
    k > 1 answers per prompt mean@k and pass@k, and each tag's mean."""
    out: dict[str, float] = {}
    k = 1 + max((r.sample for r in records), default=0)
    for name in names:
        sampled = [(r, pid) for r, pid in zip(records, pids) if not r.greedy and name in r.metrics]
        if (value := mean([r.metrics[name] for r, _ in sampled])) is not None:
            out[f"{prefix}/metric/{name}"] = value
        if (value := mean([r.metrics[name] for r in records if r.greedy and name in r.metrics])) is not None:
            out[f"{prefix}/metric/{name}/greedy"] = value
        if k > 1:
            per_prompt: dict[str, list[float]] = defaultdict(list)
            for r, pid in sampled:
                per_prompt[pid].append(r.metrics[name])
            out.update({f"{prefix}/metric/{name}/{key}": v for key, v in at_k(list(per_prompt.values()), k).items()})
        by_tag: dict[str, list[float]] = defaultdict(list)
        for r, _ in sampled:
            for tag in r.tags:
                by_tag[tag].append(r.metrics[name])
        for tag, values in sorted(by_tag.items()):
            out[f"{prefix}/tag/{tag}/metric/{name}"] = sum(values) / len(values)
    return out
