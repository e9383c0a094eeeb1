"""Command-line glue shared by the trainers' entry points: config paths, logging set-up,
one-line user errors, and the end of a run (report, trackers)."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

from transformers.utils import logging as transformers_logging

from config.loading import Resolved, format_config, redact_log_credentials
from config.schema import ALERT_RULES, ConfigError
from trainer.actions import ALERT_STOP_EXIT_CODE, AlertStopped
from trainer.checkpoint import CheckpointError
from trainer.data import DataError
from trainer.distributed import teardown
from trainer.faults import PREEMPTED_EXIT_CODE, Preempted
from trainer.progress import line_buffered_stdout
from trainer.tracking import TrackerUnavailable, Tracking
from workers.model import ModelLoadError
from workers.rewards import RewardError

if TYPE_CHECKING:
    from trainer.report import LiveReport

log = logging.getLogger("trainer")

# Mistakes in what the user gave us: reported as one line, exit code 2, no traceback.
USER_ERRORS = (ConfigError, DataError, ModelLoadError, TrackerUnavailable, RewardError, FileNotFoundError, CheckpointError)

BUNDLED = "pkg://config"


def normalize_config_path(argv: Sequence[str], cwd: Path) -> list[str]:
    """Make `--config-path DIR` mean DIR relative to the current directory.

    Hydra resolves a relative path against the script's own folder, which surprises users of an
    installed package. A relative DIR that exists under the current directory becomes absolute;
    `config` (as in verl's documented commands) means the configs bundled with this project.
    """
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--config-path", "-cp") and i + 1 < len(out):
            out[i + 1] = _resolve(out[i + 1], cwd)
        elif arg.startswith("--config-path="):
            out[i] = "--config-path=" + _resolve(arg.split("=", 1)[1], cwd)
    return appends_as_overrides(out)


def appends_as_overrides(argv: Sequence[str]) -> list[str]:
    """verl's `+key=value` on a key this project's config already has is a plain override.

    verl's scripts append keys its config lacks (`+actor_rollout_ref.actor.fsdp_config.model_dtype=bf16`);
    here the config carries them (ours, and verl's in config/verl.py), and Hydra refuses to append
    what exists ("Could not append to config. An item is already at ..."). The key then means what
    it means without the `+`; `++` and appends of keys we do not define are left to Hydra. The other
    way round, a key of an open section (`_open_key`) is set without a `+` and read as `++`.
    """
    known = _defined_keys()
    out = []
    for arg in argv:
        key = arg[1:].split("=", 1)[0] if arg.startswith("+") and not arg.startswith("++") and "=" in arg else None
        if key in known:
            arg = arg[1:]
        elif _open_key(arg):
            arg = "++" + arg
        out.append(arg)
    return out


def _open_key(arg: str) -> bool:
    """`samples.alerts.actions.<metric>_drop=...` without `+`: the drop rule of any `samples.metrics`
    name. The YAML lists the built-in rules only, and Hydra refuses a key its config lacks unless
    appended; `++` adds it, or sets it where a user's YAML already has it."""
    key = arg.split("=", 1)[0] if "=" in arg and not arg.startswith(("+", "~")) else ""
    prefix = "samples.alerts.actions."
    return key.startswith(prefix) and key.endswith("_drop") and key[len(prefix):] not in ALERT_RULES


def _defined_keys() -> set[str]:
    import dataclasses

    from config.rl_schema import RLConfig
    from config.schema import SFTConfig
    from config.verl import PPO_KEYS, SFT_KEYS

    keys = {entry.key for entry in (*PPO_KEYS, *SFT_KEYS)}

    def walk(obj, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            keys.add(prefix + f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")

    walk(RLConfig(), "")
    walk(SFTConfig(), "")
    return keys


def _resolve(path: str, cwd: Path) -> str:
    if "://" in path or Path(path).is_absolute():
        return path
    candidate = cwd / path
    if candidate.is_dir():
        return str(candidate.resolve())
    if Path(path).parts == ("config",):
        return BUNDLED
    return str(candidate)


def setup_logging(level: int, rank: int) -> None:
    prefix = "" if rank == 0 else f"[rank {rank}] "
    logging.basicConfig(
        level=level if rank == 0 else max(level, logging.WARNING),
        format=prefix + "%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    redact_log_credentials(logging.getLogger())
    line_buffered_stdout()
    for noisy in ("httpx", "urllib3", "filelock", "alembic", "git", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    transformers_logging.disable_progress_bar()


@contextlib.contextmanager
def user_errors_exit(rank: int, during_training: bool = False) -> Iterator[None]:
    """Bad input ends the process with one line and exit code 2, on every rank that meets it.

    Rank 0 says `error: ...`; any other rank `[rank R] error: ...`, and before training also its
    host: a data file or model path missing on one node fails only that node's ranks, and
    without their line the job just ends when torchrun tears it down. During training the error
    is the raising rank's alone (a row that no longer reads, a reward function failing): it ends
    its process at once, while the other ranks wait in a collective; torchrun then ends them (and
    on other nodes their collectives fail)."""
    try:
        yield
    except USER_ERRORS as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        elif during_training:
            print(f"[rank {rank}] error: {err}", file=sys.stderr)
        else:
            print(f"[rank {rank}] error: {err} (on {socket.gethostname()})", file=sys.stderr)
        if during_training:
            exit_now(2)  # no teardown: the process group waits on ranks that are still in a collective
        sys.exit(2)


@contextlib.contextmanager
def _stopped_exit(rank: int, stop_type: type[Exception], code: int, level: int, prefix: str = "") -> Iterator[None]:
    """A run that stopped on purpose (its checkpoint written) ends every rank's process with its
    own exit code: rank 0 says why, the process group is torn down, no traceback."""
    try:
        yield
    except stop_type as stop:
        if rank == 0:
            log.log(level, "%s%s", prefix, stop)
        # Every rank is stopping on purpose here, its checkpoint written and trackers closed. The
        # first to exit makes torchrun SIGTERM the rest (to it any nonzero exit is a failure):
        # they end with this code too, not -15.
        signal.signal(signal.SIGTERM, lambda *_: os._exit(code))
        teardown()
        exit_now(code)


def preempted_exit(rank: int) -> contextlib.AbstractContextManager:
    """SIGTERM: exit code 143, as a process killed by SIGTERM would, so scripts and schedulers do
    not take it for a finished run."""
    return _stopped_exit(rank, Preempted, PREEMPTED_EXIT_CODE, logging.WARNING)


def alert_stopped_exit(rank: int) -> contextlib.AbstractContextManager:
    """A sample alert whose action is `stop`: `ALERT_STOP_EXIT_CODE`, so a scheduler script can
    tell it from a finish (0) and a crash (1)."""
    return _stopped_exit(rank, AlertStopped, ALERT_STOP_EXIT_CODE, logging.ERROR, "stopped by ")


def announce_config(resolved: Resolved, rank: int) -> None:
    if rank != 0:
        return
    log.info("resolved config:\n%s", format_config(resolved.config, resolved.from_env))
    for note in resolved.notes:
        log.info("%s", note)
    for key, variable in resolved.from_env.items():
        log.info("%s set from environment variable %s", key, variable)
    for key, variable in resolved.ignored_env.items():
        log.info("%s: environment variable %s ignored, the command line sets it", key, variable)


def finish_run(run_dir: Path, tracking: Tracking, report: Optional["LiveReport"], is_primary: bool,
               stop: Optional[dict] = None) -> None:
    """The final report (primary rank, when the run keeps one), handed to every tracker that can
    show it; then close them. `stop`: why a metric watch ended the run early (run_state.json)."""
    if is_primary and report is not None:
        from trainer.report import write_report

        report.finish(stop)
        try:
            path = write_report(run_dir)
            tracking.log_artifact(path)
            log.info("report: %s", path)
        except Exception as err:  # noqa: BLE001 - the report is optional; the run is done
            log.warning("report failed: %s: %s", type(err).__name__, err)
    tracking.close()


def exit_now(code: int = 0) -> None:
    """End a finished run's process here, after the process group is destroyed and the trackers
    closed: exit hooks run as usual, interpreter finalisation does not.

    Finalisation tears down C++ objects that gloo's worker threads may still reference; a rank
    then occasionally aborts ("terminate called without an active exception", exit -6) after a
    clean run, and torchrun reports the whole job failed (seen in fresh-venv test runs).
    """
    atexit._run_exitfuncs()  # trackers' and callers' exit hooks (also flushes logging)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
