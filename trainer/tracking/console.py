"""Console backend: metric lines in the terminal, and the form of the sample blocks.

The sample blocks themselves are printed by `trainer.samples.SampleLogger` on every run, with
or without this backend: the documented form goes to stdout whatever the trackers are."""

from __future__ import annotations

from tqdm import tqdm

from trainer.tracking.base import SampleEvent, SampleRecord, Tracker, register_tracker

RULE_WIDTH = 80


def clip(text: str, limit: int) -> str:
    """Keep logs readable; the trackers get the full text."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [cut {len(text) - limit} chars]"


def format_metrics(metrics: dict[str, float], step: int) -> str:
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items())]
    return f"step {step}: " + "  ".join(parts)


def _by_prompt(event: SampleEvent) -> list[list[SampleRecord]]:
    """The event's answers grouped by prompt, prompts in order of first appearance. An answer
    beside the first (`sample` > 0, or the greedy one) has the id `<prompt id>#<j>` / `#greedy`."""
    groups: dict[str, list[SampleRecord]] = {}
    for s in event.samples:
        pid = s.prompt_id.rsplit("#", 1)[0] if (s.sample or s.greedy) and "#" in s.prompt_id else s.prompt_id
        groups.setdefault(pid or s.prompt, []).append(s)
    return list(groups.values())


def _which(s: SampleRecord, prompt: int, group: list[SampleRecord]) -> str:
    """Which of its prompt's answers `s` is: "prompt 1, sample 2/4" or "prompt 1, greedy"."""
    k = sum(not x.greedy for x in group)
    return f"prompt {prompt}, greedy" if s.greedy else f"prompt {prompt}, sample {s.sample + 1}/{k}"


def format_samples(event: SampleEvent, limit: int) -> str:
    """The printed block. With one answer per prompt, the seed documents' form exactly; with k
    answers per prompt (`generation.num_samples_per_prompt`) or a greedy one beside them
    (`generation.also_greedy`), each prompt is printed once and each answer says which it is."""
    several = any(s.sample or s.greedy for s in event.samples)
    if event.style == "validation":
        lines = [f"=== Validation Samples (Step {event.step}) ==="]
        if not several:
            for s in event.samples:
                lines.append(f"Prompt {s.index}: {clip(s.prompt, limit)}")
                lines.append(f"Generation {s.index}: {clip(s.generation, limit)}")
                lines.append("-" * 50)
        else:
            for p, group in enumerate(_by_prompt(event), start=1):
                lines.append(f"Prompt {p}: {clip(group[0].prompt, limit)}")
                lines += [f"Generation {s.index} ({_which(s, p, group)}): {clip(s.generation, limit)}" for s in group]
                lines.append("-" * 50)
    else:
        n = len(event.samples)
        groups = _by_prompt(event) if several else [[s] for s in event.samples]
        head = f"Qualitative samples ({event.stage}) - prompts: {len(groups)}" + (f", answers: {n}" if several else "")
        lines = ["=" * RULE_WIDTH, head]
        for p, group in enumerate(groups, start=1):
            if several:
                lines.append(f"[Prompt {p}/{len(groups)}] Prompt: {clip(group[0].prompt, limit)}")
            for s in group:
                if not several:
                    lines.append(f"[Sample {s.index}/{n}] Prompt: {clip(s.prompt, limit)}")
                which = f" ({_which(s, p, group)})" if several else ""
                lines.append(f"[Sample {s.index}/{n}] Response{which}: {clip(s.generation, limit)}")
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
