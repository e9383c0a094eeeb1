"""The tracker interface, its registry, and the fan-out every trainer uses.
(Over 400 lines: the fan-out's background senders, queues and time budgets are one mechanism.)

A backend implements `Tracker` and registers itself by name with `@register_tracker`. `Tracking`
creates the configured backends on the primary rank only (other ranks get a fan-out over
nothing). Local backends (file, console, TensorBoard) are called in line; one that raises is
disabled with a warning. A backend that talks to a server (`Tracker.remote`: MLflow, W&B,
SwanLab) runs on a thread of its own behind a bounded queue, so a slow or vanished server never
holds up a training step: its calls are dropped (one warning) while it fails or its queue is
full, and sent again once it answers; `close()` waits a bounded time and says what was dropped.
The run directory keeps everything (`metrics.jsonl`, `samples.jsonl`, `config.json`), and
`python -m trainer.tracking sync RUN_DIR --to NAME` puts what a tracker missed on it afterwards,
on the run recorded in `trackers.json`.
"""

from __future__ import annotations

import collections
import copy
import importlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from config.env import TrackerEnv, apply_client_bounds
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
    # True when a call may wait on a server: the fan-out then runs the backend on a thread of its
    # own, so the backend itself stays plain synchronous code.
    remote = False
    # True when the backend shows the latest copy of a file logged again under the same name: the
    # live report is re-logged at each sample event to these backends; the others get it at the end.
    replaces_artifacts = False
    # The live report file is rewritten at every sample event. A remote backend gets a copy of it
    # as it was at the call (its call runs later), unless it reads the file itself again later
    # (W&B's "live" files follow the path): then True, and it gets the path.
    follows_files = False

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

    def run_record(self) -> dict[str, str]:
        """What identifies this backend's run (its id, where it is), kept in the run directory's
        `trackers.json` so `sync` replays onto the same run. Never a secret."""
        return {}


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


# ----------------------------------------------------------------------------- the fan-out

QUEUE_SIZE = 1000  # calls waiting per remote tracker; beyond that new calls are dropped
CALL_BUDGET_S = 30.0  # a call in flight longer than this is reported (the client's own bounds end it)
START_TIMEOUT_S = 60.0  # the run waits this long for remote trackers to start, then goes on
CLOSE_TIMEOUT_S = 30.0  # close() waits this long for all remote trackers together (a preempted
# job's grace period is often not much longer)
REST_S = (5.0, 60.0)  # after a failed call a tracker rests (its calls are dropped unsent), doubling
RECORD_FILE = "trackers.json"
OUTBOX_DIR = ".tracker-outbox"  # in the run directory: copies of live files waiting in a queue
SYNC_HINT = "python -m trainer.tracking sync {run_dir} --to {name}"

_CLOSE = object()


class _QuietRetries(logging.Filter):
    """urllib3 logs each HTTP retry ("Retrying (Retry(total=1 ...)) after connection broken by
    ...") as a warning; from a tracker's own thread that is the noise of an outage the fan-out
    already reports once, in its own words."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.threadName.startswith("tracker-") and record.getMessage().startswith("Retrying"))


_quiet_retries = _QuietRetries()


def _error_text(err: BaseException) -> str:
    text = redact_credentials(str(err)).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


class _Sender:
    """One remote backend on a thread of its own, fed through a bounded queue, in call order.

    The backend is built in that thread too (its start contacts the server). A call that raises
    is dropped, and the backend then rests (calls that arrive meanwhile are dropped unsent, so a
    dead server costs no time); after the rest the next call is tried, and the first that
    succeeds with the queue back below half ends the outage. One warning per outage.
    """

    def __init__(self, name: str, build: Callable[[], Tracker], cls: type[Tracker], run_dir: Path,
                 on_start: Callable[["_Sender"], None], queue_size: int, call_budget_s: float):
        self.name, self.replaces_artifacts, self.run_dir = name, cls.replaces_artifacts, run_dir
        self._outbox = None if cls.follows_files else Path(run_dir) / OUTBOX_DIR / name
        self._sequence = 0
        self.queue_size, self.call_budget_s = queue_size, call_budget_s
        self.backend: Optional[Tracker] = None
        self.start_error: Optional[BaseException] = None
        self.close_error: Optional[BaseException] = None
        self.started = threading.Event()
        self.dropped: collections.Counter[str] = collections.Counter()  # method -> calls not sent, whole run
        self._build, self._on_start = build, on_start
        self._queue: queue.Queue = queue.Queue()  # bounded by submit() (the close marker always fits)
        self._lock = threading.Lock()
        self._outage = False
        self._outage_drops = 0
        self._in_flight: Optional[tuple[str, float]] = None  # (method, monotonic start)
        self._budget_warned = False
        self._thread = threading.Thread(target=self._run, name=f"tracker-{name}", daemon=True)
        self._thread.start()

    # -------------------------------------------------- the training thread's side
    def submit(self, method: str, args: tuple) -> None:
        self._check_budget()
        if self._queue.qsize() >= self.queue_size:
            self._drop(method, f"its queue of {self.queue_size} calls is full (the server is slow or unreachable)")
            return
        if method == "replace_artifact" and self._outbox is not None:
            args = (self._copy(args[0]),)
        self._queue.put((method, args))

    def _copy(self, path: Path) -> Path:
        self._sequence += 1
        folder = self._outbox / str(self._sequence)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return Path(shutil.copy2(path, folder / Path(path).name))
        except OSError:  # no copy (disk full, file gone): the tracker gets the file as it will be
            return Path(path)

    def _discard_copy(self, method: str, args: tuple) -> None:
        if method == "replace_artifact" and self._outbox is not None and self._outbox in Path(args[0]).parents:
            shutil.rmtree(Path(args[0]).parent, ignore_errors=True)

    def _check_budget(self) -> None:
        in_flight = self._in_flight
        if in_flight is None or self._budget_warned:
            return
        method, since = in_flight
        if time.monotonic() - since > self.call_budget_s:
            self._budget_warned = True
            self._trouble(f"a {method} call has waited on its server for over {self.call_budget_s:g} s; its calls "
                          f"queue up (at most {self.queue_size}) and beyond that are dropped until it answers again")

    def idle(self) -> bool:
        return self.start_error is not None or self._queue.unfinished_tasks == 0

    def request_close(self) -> None:
        self._queue.put(_CLOSE)

    def join(self, timeout_s: float) -> bool:
        self._thread.join(max(0.0, timeout_s))
        return not self._thread.is_alive()

    def unsent(self) -> collections.Counter[str]:
        """Calls still queued or in flight (at a close that timed out)."""
        left: collections.Counter[str] = collections.Counter()
        with self._queue.mutex:
            items = list(self._queue.queue)
        for item in items:
            if item is not _CLOSE:
                left[item[0]] += 1
        if self._in_flight is not None:
            left[self._in_flight[0]] += 1
        return left

    # -------------------------------------------------- both sides
    def _drop(self, method: str, reason: Optional[str]) -> None:
        with self._lock:
            self.dropped[method] += 1
            self._outage_drops += 1
        self._trouble(f"{reason or 'it is failing'}; its calls are dropped until it answers again")

    def _trouble(self, what: str) -> None:
        """The one warning of an outage (until `_answered` ends it)."""
        with self._lock:
            if self._outage:
                return
            self._outage = True
        log.warning("tracker %s: %s; training goes on (the run directory keeps everything: `%s` replays what it "
                    "missed)", self.name, what, SYNC_HINT.format(run_dir=self.run_dir, name=self.name))

    def _answered(self) -> None:
        if not self._outage or self._queue.qsize() > self.queue_size // 2:
            return
        with self._lock:
            self._outage, dropped, self._outage_drops = False, self._outage_drops, 0
        if dropped:
            log.info("tracker %s answers again; %d calls were dropped meanwhile (`%s` replays them)", self.name, dropped,
                     SYNC_HINT.format(run_dir=self.run_dir, name=self.name))
        else:
            log.info("tracker %s answers again; no call was dropped", self.name)

    # -------------------------------------------------- the sender thread
    def _run(self) -> None:
        try:
            self.backend = self._build()
        except Exception as err:  # noqa: BLE001 - reported by the fan-out, which drops this tracker
            self.start_error = err
            self.started.set()
            if self._outbox is not None:
                shutil.rmtree(self._outbox, ignore_errors=True)
            return
        self.started.set()
        self._on_start(self)
        rest_s, rest_until = REST_S[0], 0.0
        while True:
            item = self._queue.get()
            if item is _CLOSE:
                break
            method, args = item
            try:
                if time.monotonic() < rest_until:
                    self._drop(method, None)
                    continue
                self._in_flight = (method, time.monotonic())
                try:
                    getattr(self.backend, method)(*args)
                except Exception as err:  # noqa: BLE001 - one tracker must not stop training
                    self._drop(method, f"{method} failed ({_error_text(err)})")
                    rest_until, rest_s = time.monotonic() + rest_s, min(rest_s * 2, REST_S[1])
                else:
                    rest_s = REST_S[0]
                    self._answered()
                finally:
                    self._in_flight, self._budget_warned = None, False
            finally:
                self._discard_copy(method, args)
                self._queue.task_done()
        try:
            self._in_flight = ("close", time.monotonic())
            self.backend.close()
        except Exception as err:  # noqa: BLE001
            self.close_error = err
        finally:
            self._in_flight = None
            if self._outbox is not None:
                shutil.rmtree(self._outbox, ignore_errors=True)
            self._queue.task_done()


class Tracking:
    """Fans every call out to the active backends: local ones in line (one that raises is
    dropped with a warning), remote ones through a `_Sender` each (never waits on a server).

    `queue_size`, `call_budget_s`, `start_timeout_s`, `close_timeout_s`: see the constants above.
    """

    def __init__(self, names: list[str], ctx: TrackerContext, is_primary: bool, *, queue_size: int = QUEUE_SIZE,
                 call_budget_s: float = CALL_BUDGET_S, start_timeout_s: float = START_TIMEOUT_S,
                 close_timeout_s: float = CLOSE_TIMEOUT_S):
        self._entries: list[Union[Tracker, _Sender]] = []
        self._records_lock = threading.Lock()
        self.run_dir = Path(ctx.run_dir)
        self.close_timeout_s = close_timeout_s
        if not is_primary:
            return
        apply_client_bounds(ctx.env.client_bounds)
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        for name in dict.fromkeys(names):
            cls = tracker_class(name)
            if cls.remote:
                logging.getLogger("urllib3.connectionpool").addFilter(_quiet_retries)
                self._entries.append(_Sender(name, lambda cls=cls: cls(ctx), cls, ctx.run_dir,
                                             self._save_record, queue_size, call_budget_s))
                continue
            try:
                backend = cls(ctx)
            except Exception as err:  # noqa: BLE001 - one tracker must not stop training
                log.warning("tracker %s failed to start and is disabled: %s", name, _error_text(err))
                continue
            self._entries.append(backend)
            self._save_record_of(name, backend)
        deadline = time.monotonic() + start_timeout_s
        for sender in [e for e in self._entries if isinstance(e, _Sender)]:
            if not sender.started.wait(max(0.0, deadline - time.monotonic())):
                log.warning("tracker %s is still starting after %.0f s; training goes on, its calls wait in its queue "
                            "(at most %d)", sender.name, start_timeout_s, sender.queue_size)
            elif sender.start_error is not None:
                log.warning("tracker %s failed to start and is disabled: %s", sender.name, _error_text(sender.start_error))
                self._entries.remove(sender)

    # ---------------------------------------------------------------- trackers.json
    def _save_record(self, sender: _Sender) -> None:
        self._save_record_of(sender.name, sender.backend)

    def _save_record_of(self, name: str, backend: Tracker) -> None:
        try:
            record = backend.run_record()
            if not record:
                return
            with self._records_lock:
                path = self.run_dir / RECORD_FILE
                records = read_run_records(self.run_dir)
                records[name] = {k: redact_credentials(str(v)) for k, v in record.items()}
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(json.dumps(records, indent=2, sort_keys=True))
                os.replace(tmp, path)
        except Exception as err:  # noqa: BLE001 - a missing record only costs `sync` a --run-id
            log.warning("tracker %s: %s not written: %s", name, RECORD_FILE, _error_text(err))

    # ---------------------------------------------------------------- calls
    def _each(self, method: str, *args: Any, replacing_only: bool = False) -> None:
        snapshot: Optional[tuple] = None
        for entry in list(self._entries):
            if replacing_only and not entry.replaces_artifacts:
                continue
            if isinstance(entry, _Sender):
                if entry.start_error is not None:  # it failed after the run stopped waiting for it
                    log.warning("tracker %s failed to start and is disabled: %s", entry.name, _error_text(entry.start_error))
                    self._entries.remove(entry)
                    continue
                # The caller may change a dict after this returns (SampleLogger adds a metric):
                # the queued call keeps the values of now.
                snapshot = snapshot if snapshot is not None else copy.deepcopy(args)
                entry.submit(method, snapshot)
                continue
            try:
                getattr(entry, method)(*args)
            except Exception as err:  # noqa: BLE001
                log.warning("tracker %s failed in %s and is disabled: %s", entry.name, method, _error_text(err))
                self._entries.remove(entry)
                try:
                    entry.close()
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
        self._each("replace_artifact", path, replacing_only=True)

    def flush(self, timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) until every remote tracker has handled every call so far;
        True when they have. Training never needs this; tests and tools do."""
        deadline = time.monotonic() + timeout_s
        senders = [e for e in self._entries if isinstance(e, _Sender)]
        while not all(s.idle() for s in senders):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        """Close every backend: local ones now; remote ones drain their queues, all within
        `close_timeout_s`; one warning per remote tracker that dropped or could not send calls."""
        entries, self._entries = self._entries, []
        senders = [e for e in entries if isinstance(e, _Sender)]
        for sender in senders:
            sender.request_close()
        for entry in entries:
            if not isinstance(entry, _Sender):
                try:
                    entry.close()
                except Exception as err:  # noqa: BLE001
                    log.warning("tracker %s failed in close: %s", entry.name, _error_text(err))
        deadline = time.monotonic() + self.close_timeout_s
        for sender in senders:
            finished = sender.join(deadline - time.monotonic())
            problems = []
            dropped = sender.dropped + (collections.Counter() if finished else sender.unsent())
            if dropped:
                counts = ", ".join(f"{n} {method}" for method, n in dropped.most_common())
                problems.append(f"{sum(dropped.values())} calls were not sent ({counts})")
            if not finished:
                problems.append(f"it did not finish within {self.close_timeout_s:.0f} s and was left behind")
            elif sender.close_error is not None:
                problems.append(f"its close failed ({_error_text(sender.close_error)})")
            if problems:
                log.warning("tracker %s: %s; the run directory has everything: `%s` replays it", sender.name,
                            "; ".join(problems), SYNC_HINT.format(run_dir=self.run_dir, name=sender.name))

    @property
    def backends(self) -> list[Tracker]:
        """The backends that started (a remote one still starting is not listed yet)."""
        out = []
        for entry in self._entries:
            backend = entry.backend if isinstance(entry, _Sender) else entry
            if backend is not None:
                out.append(backend)
        return out

    @property
    def names(self) -> list[str]:
        return [e.name for e in self._entries]


def read_run_records(run_dir: Path) -> dict[str, dict[str, str]]:
    """{tracker name: its run record} from `<run_dir>/trackers.json` ({} when there is none)."""
    path = Path(run_dir) / RECORD_FILE
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}
