"""TensorBoard backend: scalars and sample texts in `<run_dir>/tensorboard/`.

`tensorboard --logdir <run_dir>/tensorboard` shows it. Layout (TensorBoard's text plugin renders
markdown; PyTorch's `add_text` stores each text under the tag `<tag>/text_summary`):

    scalars  <metric name>                          every metric, at its step
    text     config                                 the config as JSON in a code block (step 0)
    text     <prefix>/sample_<i>_prompt             the exact text of sample i, at the event's step
    text     <prefix>/sample_<i>_generation
    text     <prefix>/sample_<i>_reference          only when the sample has a reference
    text     <prefix>/samples                       one markdown table per event (stage, prompt,
                                                    reference, generation, rewards)
    text     artifacts                              a note with the path of each logged file
                                                    (TensorBoard cannot show HTML reports)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tensorboard  # noqa: F401 - first, so a missing package is reported as 'tensorboard'
from torch.utils.tensorboard import SummaryWriter

from trainer.tracking.base import SampleEvent, Tracker, TrackerContext, register_tracker

LOG_SUBDIR = "tensorboard"


def md_cell(value: Any) -> str:
    """One markdown table cell: `|` escaped, line breaks as <br> (TensorBoard allows that tag)."""
    text = "" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")


def samples_markdown(event: SampleEvent) -> str:
    rows = event.table_rows()
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns and k not in ("step", "stage"))
    lines = [f"**{md_cell(event.stage)}** (step {event.step}, {len(rows)} samples)", ""]
    if rows:
        lines.append("| " + " | ".join(md_cell(c) for c in columns) + " |")
        lines.append("|" + "---|" * len(columns))
        lines.extend("| " + " | ".join(md_cell(row.get(c)) for c in columns) + " |" for row in rows)
    for alert in event.alerts:
        lines.append(f"\n> {md_cell(alert)}")
    return "\n".join(lines)


@register_tracker("tensorboard")
class TensorboardTracker(Tracker):
    def __init__(self, ctx: TrackerContext):
        super().__init__(ctx)
        self.log_dir = Path(ctx.run_dir) / LOG_SUBDIR
        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        self._last_step = 0
        self._closed = False

    def log_config(self, config: dict) -> None:
        text = json.dumps(config, indent=2, default=str)
        self._writer.add_text("config", f"```json\n{text}\n```", global_step=0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, float(value), global_step=step)
        self._last_step = max(self._last_step, step)

    def log_samples(self, event: SampleEvent) -> None:
        step = event.step
        for s in event.samples:
            self._writer.add_text(f"{event.prefix}/sample_{s.index}_prompt", s.prompt, global_step=step)
            self._writer.add_text(f"{event.prefix}/sample_{s.index}_generation", s.generation, global_step=step)
            if s.reference is not None:
                self._writer.add_text(f"{event.prefix}/sample_{s.index}_reference", s.reference, global_step=step)
        self._writer.add_text(f"{event.prefix}/samples", samples_markdown(event), global_step=step)
        self._writer.flush()  # samples are rare and people look for them right away
        self._last_step = max(self._last_step, step)

    def log_artifact(self, path: Path) -> None:
        path = Path(path).resolve()
        kind = "HTML report (TensorBoard cannot render HTML; open it in a browser)" if path.suffix.lower() in (
            ".html",
            ".htm",
        ) else "file"
        self._writer.add_text("artifacts", f"{kind}: `{path}`", global_step=self._last_step)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.flush()
        self._writer.close()
