"""Sample events: generations from the primary rank, turned into one event, printed to stdout
in the documented form, and sent to every tracker and to the run's sample history.

SFT validation and RL sample logging both come through `SampleLogger.log`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

from tqdm import tqdm

from trainer.history import SampleHistory, exact_match
from trainer.report import LiveReport
from trainer.tracking import SampleEvent, SampleRecord, Tracking
from trainer.tracking.console import format_samples
from workers.generation import Generated, GenerationSettings

log = logging.getLogger(__name__)


def prompt_id(prompt_ids: Sequence[int]) -> str:
    """A stable id for a prompt (its tokens), the same in every event and across resumes."""
    return hashlib.sha1(",".join(map(str, prompt_ids)).encode()).hexdigest()[:12]


def sample_seed(run_seed: int, pid: str) -> int:
    """Each prompt's own sampling seed: two events differ only because the model changed."""
    return int(hashlib.sha1(f"{run_seed}:{pid}".encode()).hexdigest()[:8], 16)


@dataclass
class SampleLogger:
    tracking: Tracking
    history: Optional[SampleHistory] = None
    report: Optional[LiveReport] = None  # rewritten after each event, once its metrics are on file
    max_print_chars: int = 400  # longer texts are cut in the printed block; trackers get them whole

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
    ) -> dict[str, float]:
        """Log one event; returns its numeric metrics (also sent to the trackers)."""
        records = []
        for i, (prompt, gen, ref) in enumerate(zip(prompts, generations, references), start=1):
            records.append(
                SampleRecord(
                    index=i,
                    prompt=prompt,
                    generation=gen.text,
                    reference=ref,
                    rewards=dict(rewards[i - 1]) if rewards else {},
                    prompt_id=prompt_id(gen.prompt_ids),
                )
            )
        event = SampleEvent(step=step, stage=stage, prefix=prefix, style=style, samples=records)
        metrics = {
            f"{prefix}/generation_time_s": generation_time_s,
            f"{prefix}/samples_generated": float(len(records)),
            f"{prefix}/mean_generation_tokens": sum(g.num_tokens for g in generations) / max(1, len(generations)),
        }
        matches = [m for m in (exact_match(g.text, r) for g, r in zip(generations, references)) if m is not None]
        if matches:
            metrics[f"{prefix}/exact_match"] = sum(matches) / len(matches)
        if rewards:
            for name in rewards[0]:
                metrics[f"{prefix}/reward/{name}"] = sum(r[name] for r in rewards) / len(rewards)
        if self.history is not None:
            metrics.update(self.history.record(event, generations, settings, seeds))
        tqdm.write(format_samples(event, self.max_print_chars))  # stdout, whatever the trackers
        self.tracking.log_samples(event)
        self.tracking.log_metrics(metrics, step)
        if self.report is not None and (seconds := self.report.update()) is not None:
            metrics[f"{prefix}/report_time_s"] = seconds
            self.tracking.log_metrics({f"{prefix}/report_time_s": seconds}, step)
        return metrics
