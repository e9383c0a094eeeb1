"""Sample history: every sample of every event, appended to samples.jsonl in the run directory."""

from __future__ import annotations

import json
from pathlib import Path

from config.schema import AlertConfig
from trainer.tracking import SampleEvent
from workers.generation import Generated, GenerationSettings

HISTORY_FILE = "samples.jsonl"


class SampleHistory:
    def __init__(self, run_dir: Path, alerts: AlertConfig, resume_step: int = 0):
        self.path = Path(run_dir) / HISTORY_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.alerts = alerts

    def record(self, event: SampleEvent, generations: list[Generated], settings: GenerationSettings) -> dict[str, float]:
        with open(self.path, "a", encoding="utf-8") as handle:
            for s, g in zip(event.samples, generations):
                handle.write(json.dumps({"step": event.step, "stage": event.stage, "prompt": s.prompt, "generation": s.generation}) + "\n")
        return {}
