"""What a real cluster does to a run, handled in one place for both trainers:

- a run directory that is not shared by every node (node-local disks): checked before training;
- decisions that must be the same on every rank (what to resume) made by rank 0 and broadcast;
- SIGTERM, which Slurm and cloud schedulers send before a kill (and torchrun forwards to its
  workers, giving them 30 s before SIGKILL): the current step finishes, a checkpoint is written,
  and the process exits with `PREEMPTED_EXIT_CODE`; the same command resumes.

Every function here that talks to other ranks is a collective, called at the same point on all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, TypeVar

import torch
import torch.distributed as dist

from config.loading import flatten, redact, to_dict
from config.schema import ConfigError
from trainer.distributed import broadcast_object

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: what a shell reports for a run ended by SIGTERM
PROBE_PREFIX = ".shared_dir_probe_"
T = TypeVar("T")


class RunDirNotShared(ConfigError):
    """The run directory is not the same directory on every rank. Every rank reports it (each
    node's log gets the line), as every rank reports any setup error (`trainer.cli.user_errors_exit`)."""


class Preempted(Exception):
    """The run stopped early on SIGTERM after writing a checkpoint."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"stopped by SIGTERM after step {step}; checkpoint {checkpoint}; the same command resumes from it")
        self.step, self.checkpoint = step, checkpoint


# ---------------------------------------------------------------------- the run directory
def check_shared_run_dir(run_dir: Path, key: str = "trainer.default_local_dir") -> None:
    """Collective. Rank 0 writes a probe file into `run_dir`; every rank reads it back. Where any
    rank cannot, every rank raises the same one-line error, before anything is built or loaded.

    Checkpoints are written by all ranks into one directory and renamed by rank 0, and a resume
    reads what every rank wrote: on node-local disks neither works, and nothing else would say so.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    rank = dist.get_rank()
    token = uuid.uuid4().hex if rank == 0 else None
    probe = None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f"{PROBE_PREFIX}{token}"
        probe.write_text(token)
    token = broadcast_object(token)
    mine = run_dir / f"{PROBE_PREFIX}{token}"
    try:
        seen = mine.read_text() == token
    except OSError:
        seen = False
    # One flag per rank, gathered by summing one-hot rows: every rank learns which ranks failed.
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32)
    flags[rank] = 0 if seen else 1
    dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    if rank == 0 and probe is not None:
        probe.unlink(missing_ok=True)
    blind = [r for r, f in enumerate(flags.tolist()) if f]
    if blind:
        raise RunDirNotShared(
            f"{key}={str(run_dir)!r} is not shared by all ranks: rank(s) {', '.join(map(str, blind))} cannot see the file "
            f"rank 0 wrote there (rank {rank} runs on host {socket.gethostname()} in {os.getcwd()}); multi-node runs need the run "
            f"directory on a filesystem every node mounts (NFS, Lustre, ...), given as the same absolute path"
        )


# ---------------------------------------------------------------------- inputs every rank must share
def same_on_every_rank(values: dict[str, Any], why: str) -> None:
    """Collective. `values` (key -> a JSON-able value) must be the same on every rank, or every rank
    raises the same one-line error naming the keys that differ, and `why` they must not.

    Each node resolves its own config and reads its own files: `VERL_*` variables, a node-local
    YAML or data file, a relative path. Ranks that disagree on what sets a step or forward count
    enter different collectives and wait for each other, silently, until the collective timeout.
    One hash per rank is compared (one all-reduce); the values travel only when they differ."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    text = json.dumps(values, sort_keys=True, default=str)
    digests = torch.zeros(world, dtype=torch.int64)  # one row per rank, filled by summing one-hot rows
    digests[rank] = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")
    dist.all_reduce(digests, op=dist.ReduceOp.SUM)
    differ = [r for r, d in enumerate(digests.tolist()) if d != digests[0]]
    if not differ:
        return
    first = json.loads(broadcast_object(text, src=0))
    theirs = json.loads(broadcast_object(text, src=differ[0]))
    keys = sorted(k for k in set(first) | set(theirs) if first.get(k) != theirs.get(k))
    shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
    raise ConfigError(f"{shown}: differ between rank 0 and rank {differ[0]} "
                      f"({len(differ)} of {world} ranks differ from rank 0); {why}")


# Paths a node may spell its own way (`~` under another HOME, another mount point): what they hold
# is compared instead (the data and the model: `same_inputs_on_every_rank`; the run directory:
# `check_shared_run_dir`; the token cache is each node's own).
PATHS_COMPARED_BY_CONTENT = ("data.train_files", "data.val_files", "model.partial_pretrain", "trainer.default_local_dir",
                             "data.cache_dir")


def same_config_on_every_rank(config: Any) -> None:
    """Collective. The resolved config (secrets redacted) alike on every rank: a `VERL_*` variable
    set on one node only (`VERL_MAX_VAL_SAMPLES=0` skips the sample event's collectives there) or
    a node-local YAML stops every rank at start instead of hanging them later."""
    flat = {k: v for k, v in flatten(redact(to_dict(config))).items() if k not in PATHS_COMPARED_BY_CONTENT}
    same_on_every_rank(flat, "each node resolves the config itself: give every node the same command line, YAML files and "
                             "VERL_* environment variables")


def same_inputs_on_every_rank(data: dict[str, Any], model_config: Any, stop_ids: Any) -> None:
    """Collective. The data (`data`: key -> `token_cache.rows_fingerprint`) and the model's config
    and stop tokens alike on every rank. Each node reads its own copy: one that differs sets
    another step or forward count on that node's ranks, and every rank hangs in a collective."""
    config = {k: v for k, v in model_config.to_dict().items() if k not in ("transformers_version", "_name_or_path")}
    model = hashlib.sha256(json.dumps([config, list(stop_ids)], sort_keys=True, default=str).encode()).hexdigest()[:16]
    same_on_every_rank({**data, "model.partial_pretrain": model},
                       "every node must read the same data and model, tokenized alike: a node-local copy that differs, a "
                       "relative path that names another file on another node, or another version of this project, "
                       "transformers or tokenizers on one node")


# ---------------------------------------------------------------------- decisions made once
def decided_by_primary(decide: Callable[[], T]) -> T:
    """Collective. Rank 0 runs `decide`; every rank returns its result, or raises the same
    user error (one line) if it raised one. Ranks that decide alone (reading a directory each)
    can disagree, and then enter different collectives: a hang until the timeout."""
    outcome: tuple[str, object] = ("ok", None)
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            outcome = ("ok", decide())
        except (ConfigError, FileNotFoundError) as err:
            outcome = (type(err).__name__, str(err))
    if dist.is_initialized() and dist.get_world_size() > 1:
        outcome = broadcast_object(outcome)
    kind, value = outcome
    if kind == "ok":
        return value  # type: ignore[return-value]
    raise (FileNotFoundError if kind == "FileNotFoundError" else ConfigError)(value)


# ---------------------------------------------------------------------- SIGTERM
class PreemptionWatch:
    """Records SIGTERM in a flag; `requested()` (collective, once per step) tells every rank
    whether any rank got one, so all stop after the same step even when only one was signalled.

    The flag is all-reduced as a CPU tensor: over gloo, so no GPU synchronisation per step (the
    process group is `cpu:gloo,cuda:nccl` on GPUs, as in torchtitan)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signalled: Optional[int] = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be installed from the main thread (an API call in a thread)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:  # noqa: ARG002 - the signal module's signature
        self.signalled = signum

    def requested(self) -> bool:
        flag = torch.tensor([1 if self.signalled is not None else 0], dtype=torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def checkpoint_and_stop(self, step: int, checkpointer: Any, save_checkpoint: Callable[[], Path], tracking: Any) -> NoReturn:
        """After `requested()`: checkpoint this step (whatever save_freq says, unless it was just
        saved), close the trackers, hand SIGTERM back and stop with `Preempted`."""
        path = checkpointer.step_dir(step) if checkpointer.last_saved_step == step else save_checkpoint()
        tracking.close()
        self.restore()
        raise Preempted(step, path)
