"""Console backend: metric lines in the terminal, and the form of the sample blocks.

The sample blocks themselves are printed by `trainer.samples.SampleLogger` on every run, with
or without this backend: the documented form goes to stdout whatever the trackers are."""

from __future__ import annotations

from tqdm import tqdm

from trainer.tracking.base import SampleEvent, Tracker, register_tracker

RULE_WIDTH = 80


def clip(text: str, limit: int) -> str:
    """Keep logs readable; the trackers get the full text."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [cut {len(text) - limit} chars]"


def format_metrics(metrics: dict[str, float], step: int) -> str:
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items())]
    return f"step {step}: " + "  ".join(parts)


def format_samples(event: SampleEvent, limit: int) -> str:
    if event.style == "validation":
        lines = [f"=== Validation Samples (Step {event.step}) ==="]
        for s in event.samples:
            lines.append(f"Prompt {s.index}: {clip(s.prompt, limit)}")
            lines.append(f"Generation {s.index}: {clip(s.generation, limit)}")
            lines.append("-" * 50)
    else:
        n = len(event.samples)
        lines = ["=" * RULE_WIDTH, f"Qualitative samples ({event.stage}) - prompts: {n}"]
        for s in event.samples:
            lines.append(f"[Sample {s.index}/{n}] Prompt: {clip(s.prompt, limit)}")
            lines.append(f"[Sample {s.index}/{n}] Response: {clip(s.generation, limit)}")
            if s.rewards:
                rewards = {k: round(v, 4) for k, v in s.rewards.items()}
                lines.append(f"[Sample {s.index}/{n}] Rewards: {rewards}")
        lines.append("=" * RULE_WIDTH)
    return "\n".join(lines)


@register_tracker("console")
class ConsoleTracker(Tracker):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        tqdm.write(format_metrics(metrics, step))

    def log_samples(self, event: SampleEvent) -> None:
        """Nothing: `SampleLogger` prints the block to stdout whichever trackers are on."""
