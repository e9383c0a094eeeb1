"""Sharded, atomic checkpoints with `torch.distributed.checkpoint`, and exact resume.

Layout of a run directory:

    global_step_200/                 a complete checkpoint (the name appears only once complete)
        .metadata, __*.distcp        model and optimizer shards (DCP)
        trainer_state.json           step, data position, scheduler, counters
        rng/rank_<r>.pt              each rank's RNG states (tensors and ints only)
    global_step_300.tmp/             being written; never read; removed on the next start
    latest_checkpointed_iteration.txt   pointer to the newest complete checkpoint

Everything is written under `<name>.tmp` and renamed into place by rank 0 after every rank has
finished, so a crash never leaves a checkpoint that looks complete. All loads are
`weights_only=True`: nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from workers.fsdp import gather_full_state_dict
from workers.model import build_from_config, save_hf

log = logging.getLogger(__name__)

POINTER = "latest_checkpointed_iteration.txt"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^global_step_(\d+)$")


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


@dataclass
class Checkpointer:
    run_dir: Path
    save_freq: int  # -1: only the final save
    max_to_keep: Optional[int]
    rank: int
    world_size: int

    # ------------------------------------------------------------------ when
    def should_save(self, step: int, last_step: bool) -> bool:
        return last_step or (self.save_freq > 0 and step % self.save_freq == 0)

    # ------------------------------------------------------------------ where
    def step_dir(self, step: int) -> Path:
        return self.run_dir / f"global_step_{step}"

    def complete_checkpoints(self) -> list[Path]:
        if not self.run_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.run_dir.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Optional[Path]:
        pointer = self.run_dir / POINTER
        if pointer.exists():
            candidate = self.step_dir(int(pointer.read_text().strip() or -1))
            if (candidate / STATE_FILE).exists():
                return candidate
        complete = [p for p in self.complete_checkpoints() if (p / STATE_FILE).exists()]
        return complete[-1] if complete else None

    def clean_partial(self) -> None:
        """Remove checkpoints a crash left half-written (primary rank, before training starts)."""
        if self.rank != 0 or not self.run_dir.is_dir():
            return
        for partial in self.run_dir.glob("global_step_*.tmp"):
            log.warning("removing incomplete checkpoint %s", partial)
            shutil.rmtree(partial, ignore_errors=True)

    # ------------------------------------------------------------------ save
    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any],
        extra_modules: Optional[dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]] = None,
    ) -> Path:
        """Collective. `extra_modules` holds other sharded models (e.g. an RL critic) by name."""
        final = self.step_dir(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        for name, (m, o) in (extra_modules or {}).items():
            ms, os_ = get_state_dict(m, o)
            state[f"{name}_model"], state[f"{name}_optim"] = ms, os_
        dcp.save(state, checkpoint_id=str(tmp))
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), tmp / "rng" / f"rank_{self.rank}.pt")
        dist.barrier()
        if self.rank == 0:
            (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "world_size": self.world_size}, indent=2))
            if final.exists():  # an older run's checkpoint of the same step (resume disabled)
                shutil.rmtree(final)
            tmp.rename(final)
            _write_atomic(self.run_dir / POINTER, str(step))
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        if not self.max_to_keep:
            return
        complete = self.complete_checkpoints()
        for old in complete[: -self.max_to_keep]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(
        self,
        path: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        extra_modules: Optional[dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]] = None,
    ) -> dict[str, Any]:
        """Collective. Restores model, optimizer and this rank's RNG; returns the trainer state."""
        if not (path / STATE_FILE).exists():
            raise FileNotFoundError(f"trainer.resume_from_path={str(path)!r} is not a complete checkpoint (no {STATE_FILE})")
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        for name, (m, o) in (extra_modules or {}).items():
            ms, os_ = get_state_dict(m, o)
            state[f"{name}_model"], state[f"{name}_optim"] = ms, os_
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        for name, (m, o) in (extra_modules or {}).items():
            set_state_dict(m, o, model_state_dict=state[f"{name}_model"], optim_state_dict=state[f"{name}_optim"])
        trainer_state = json.loads((path / STATE_FILE).read_text())
        rng_file = path / "rng" / f"rank_{self.rank}.pt"
        if rng_file.exists() and trainer_state.get("world_size") == self.world_size:
            _set_rng_state(torch.load(rng_file, weights_only=True))
        else:
            log.warning("no RNG state for rank %d in %s (world size changed?): RNG streams restart", self.rank, path)
        return trainer_state

    def resolve_resume(self, mode: str, resume_from_path: Optional[str]) -> Optional[Path]:
        """verl's rule (`_determine_resume_path`): a `resume_from_path` wins in `auto` and
        `resume_path` modes; `auto` without one takes the run directory's latest checkpoint."""
        if mode == "disable":
            return None
        if resume_from_path:
            path = Path(resume_from_path).expanduser()
            if not (path / STATE_FILE).exists():
                raise FileNotFoundError(f"trainer.resume_from_path={resume_from_path!r} is not a complete checkpoint (no {STATE_FILE})")
            return path
        return self.latest()


def export_hf_model(
    model: torch.nn.Module,
    model_config,
    tokenizer,
    out_dir: Path,
    is_primary: bool,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
) -> Optional[Path]:
    """Collective. The model in Hugging Face format (safetensors + tokenizer), in the dtype the
    original checkpoint declared; written beside `out_dir` and renamed into place."""
    state = gather_full_state_dict(model)
    if not is_primary:
        return None
    dtype = getattr(model_config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    export = build_from_config(model_config, dtype, "cpu", trust_remote_code, attn_implementation)
    export.load_state_dict(state, strict=False)
    export.tie_weights()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(export, tokenizer, tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    log.info("exported the model in Hugging Face format to %s", out_dir)
    return out_dir
