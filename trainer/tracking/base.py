"""The tracker interface, its registry, and the fan-out every trainer uses.

A backend implements `Tracker` and registers itself by name with `@register_tracker`. `Tracking`
creates the configured backends on the primary rank only (other ranks get a fan-out over
nothing), and disables a backend that raises, with a warning, so training and the other
backends go on.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from config.env import TrackerEnv
from config.loading import redact_credentials

log = logging.getLogger(__name__)


@dataclass
class SampleRecord:
    index: int  # 1-based position in the event
    prompt: str
    generation: str
    reference: Optional[str] = None
    rewards: dict[str, float] = field(default_factory=dict)
    signals: dict[str, Any] = field(default_factory=dict)
    prompt_id: str = ""  # the prompt's id; with several answers per prompt, `<id>#<j>` / `<id>#greedy`
    metrics: dict[str, float] = field(default_factory=dict)  # task metrics (samples.metrics) that applied
    sample: int = 0  # which of the prompt's k sampled answers (0-based)
    greedy: bool = False  # the greedy answer beside the sampled ones (generation.also_greedy)
    tags: list[str] = field(default_factory=list)


@dataclass
class SampleEvent:
    """One batch of samples logged together (a validation, or an RL sample-logging trigger)."""

    step: int
    stage: str  # "validation", "step_200", "50%", "post-train", ...
    prefix: str  # tracker key prefix: "val" for SFT validation, "samples" for RL
    style: str  # console layout: "validation" or "qualitative"
    samples: list[SampleRecord]
    alerts: list[str] = field(default_factory=list)

    def table_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "step": self.step,
                "stage": self.stage,
                "sample": s.index,
                "prompt": s.prompt,
                "reference": s.reference or "",
                "generation": s.generation,
                **{f"reward/{k}": v for k, v in s.rewards.items()},
                **{f"metric/{k}": v for k, v in s.metrics.items()},
            }
            for s in self.samples
        ]


@dataclass(frozen=True)
class TrackerContext:
    run_dir: Path
    project_name: str
    experiment_name: str
    env: TrackerEnv


class Tracker:
    """One backend. Methods that a backend cannot show may stay no-ops."""

    name = "tracker"
    # True when the backend shows the latest copy of a file logged again under the same name: the
    # live report is re-logged at each sample event to these backends; the others get it at the end.
    replaces_artifacts = False

    def __init__(self, ctx: TrackerContext):
        self.ctx = ctx

    def log_config(self, config: dict) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_samples(self, event: SampleEvent) -> None: ...

    def log_artifact(self, path: Path) -> None: ...

    def replace_artifact(self, path: Path) -> None:
        """Log `path` again, replacing the copy logged before (only called when `replaces_artifacts`)."""
        self.log_artifact(path)

    def close(self) -> None: ...


@dataclass(frozen=True)
class _Entry:
    module: str  # imported only when the backend is configured
    extra: Optional[str]  # pip extra that provides its package


_REGISTRY: dict[str, _Entry] = {
    "console": _Entry("trainer.tracking.console", None),
    "file": _Entry("trainer.tracking.file", None),
    "mlflow": _Entry("trainer.tracking.mlflow_tracker", "mlflow"),
    "swanlab": _Entry("trainer.tracking.swanlab_tracker", "swanlab"),
    "wandb": _Entry("trainer.tracking.wandb_tracker", "wandb"),
    "tensorboard": _Entry("trainer.tracking.tensorboard_tracker", "tensorboard"),
}
_CLASSES: dict[str, type[Tracker]] = {}


def register_tracker(name: str) -> Callable[[type[Tracker]], type[Tracker]]:
    def wrap(cls: type[Tracker]) -> type[Tracker]:
        cls.name = name
        _CLASSES[name] = cls
        return cls

    return wrap


class TrackerUnavailable(RuntimeError):
    """A configured backend's package is missing; the message says which extra to install."""


def tracker_class(name: str) -> type[Tracker]:
    if name not in _REGISTRY and name not in _CLASSES:
        raise TrackerUnavailable(f"trainer.logger: unknown tracker {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    if name not in _CLASSES:
        entry = _REGISTRY[name]
        try:
            importlib.import_module(entry.module)
        except ModuleNotFoundError as err:
            hint = f"pip install 'sample-aware-trainer[{entry.extra}]'" if entry.extra else "reinstall the project"
            raise TrackerUnavailable(f"trainer.logger: {name} needs the '{err.name}' package: {hint}") from None
    return _CLASSES[name]


def check_available(names: list[str]) -> None:
    """Fail fast, before any model is built, when a configured backend cannot be imported."""
    for name in names:
        tracker_class(name)


class Tracking:
    """Fans every call out to the active backends; a backend that raises is dropped with a warning."""

    def __init__(self, names: list[str], ctx: TrackerContext, is_primary: bool):
        self.backends: list[Tracker] = []
        if not is_primary:
            return
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        for name in dict.fromkeys(names):
            cls = tracker_class(name)
            try:
                self.backends.append(cls(ctx))
            except Exception as err:  # noqa: BLE001 - one tracker must not stop training
                log.warning("tracker %s failed to start and is disabled: %s: %s", name, type(err).__name__, redact_credentials(str(err)))

    def _each(self, method: str, *args: Any, only: Callable[[Tracker], bool] = lambda backend: True) -> None:
        for backend in [b for b in self.backends if only(b)]:
            try:
                getattr(backend, method)(*args)
            except Exception as err:  # noqa: BLE001
                log.warning("tracker %s failed in %s and is disabled: %s: %s", backend.name, method, type(err).__name__,
                            redact_credentials(str(err)))
                self.backends.remove(backend)
                try:
                    backend.close()
                except Exception:  # noqa: BLE001
                    pass

    def log_config(self, config: dict) -> None:
        self._each("log_config", config)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._each("log_metrics", metrics, step)

    def log_samples(self, event: SampleEvent) -> None:
        self._each("log_samples", event)

    def log_artifact(self, path: Path) -> None:
        self._each("log_artifact", path)

    def replace_artifact(self, path: Path) -> None:
        self._each("replace_artifact", path, only=lambda backend: backend.replaces_artifacts)

    def close(self) -> None:
        self._each("close")
        self.backends = []

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.backends]
