"""Sharded, atomic checkpoints with `torch.distributed.checkpoint`, exact resume, and the
Hugging Face model directories made from a model or a checkpoint.
(Over 400 lines: saving, loading, pruning and damage checks of one on-disk format belong together.)

Layout of a run directory:

    global_step_200/                 a complete checkpoint (the name appears only once complete)
        .metadata, __*.distcp        model shards; optimizer state with `optimizer` (DCP)
        trainer_state.json           step, data position, counters, what was saved; the scheduler with `extra`
        rng/rank_<r>.pt              each rank's RNG states, with `extra` (tensors and ints only)
        huggingface/                 config.json, tokenizer, the original generation_config.json;
                                     with `hf_model` also the full model (safetensors); with LoRA
                                     adapter_config.json, and with `hf_model` the adapter's weights
    global_step_300.tmp/             being written; never read; removed on the next start
    latest_checkpointed_iteration.txt   pointer to the newest complete checkpoint

What is saved and what a resume restores are `trainer.checkpoint.save_contents` and
`load_contents` (verl's keys and part names). `trainer_state.json` is always written: it holds
the step and marks the checkpoint complete.

Everything is written under `<name>.tmp` and renamed into place by rank 0 after every rank has
finished, so a crash never leaves a checkpoint that looks complete. The files, `trainer_state.json`,
the pointer and the directories holding them are fsynced before the rename (and the pointer
after it): after a power cut a checkpoint is complete or absent, never a zero-byte state file. A
checkpoint damaged all the same (a state file or pointer that does not parse) is skipped, in one
line, for the previous complete one. The RNG files are read with
`weights_only=True`, but DCP reads each checkpoint's `.metadata` with pickle: load only
checkpoints you trust.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from config.schema import CheckpointConfig, ConfigError
from trainer.faults import decided_by_primary
from workers.fsdp import gather_full_state_dict, iter_full_tensors, saved_tensor_names
from workers.lora import ADAPTER_CONFIG, LoraSpec, peft_model_on_meta, write_adapter_config
from workers.model import build_from_config, generation_config_file, save_hf, save_hf_files

log = logging.getLogger(__name__)

POINTER = "latest_checkpointed_iteration.txt"
STATE_FILE = "trainer_state.json"
HF_DIR = "huggingface"
MODEL = "model"  # the DCP key of the trained model (the actor in RL); others are "<name>_model"
# Checkpoints written before save_contents existed hold these parts.
LEGACY_CONTENTS = ["model", "optimizer", "extra"]
_STEP_DIR = re.compile(r"^global_step_(\d+)$")


class CheckpointError(ValueError):
    """A path is not a usable checkpoint; the message is one line naming it."""


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


# ---------------------------------------------------------------------- durable writes
# A rename is atomic but not durable: after a power cut the new name can point at a file whose
# data never reached the disk (zero bytes). fsync the data, then the directory holding the name.
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`. DCP's FileSystemWriter has synced its own
    shards already (syncing them again finds nothing to write); the RNG files and `huggingface/`
    are synced only here."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _write_durable(path: Path, text: str) -> None:
    """`path` holds `text` or its previous content, also after a power cut."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


# ---------------------------------------------------------------------- finding checkpoints
def is_checkpoint(path: Path) -> bool:
    """Complete: its trainer_state.json is written last, inside `.tmp`, before the rename."""
    return path.is_dir() and not path.name.endswith(".tmp") and (path / STATE_FILE).is_file()


def read_trainer_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json; a missing, empty or corrupt one is a one-line
    CheckpointError naming the file."""
    state_file = path / STATE_FILE
    try:
        text = state_file.read_text(encoding="utf-8")
    except OSError as err:
        raise CheckpointError(f"{state_file}: cannot be read ({err.strerror or type(err).__name__})") from None
    if not text.strip():
        raise CheckpointError(f"{state_file} is empty (a write cut short, e.g. by a power cut)")
    try:
        state = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{state_file} is damaged (not JSON: {err.msg} at line {err.lineno})") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise CheckpointError(f"{state_file} is damaged (no integer global_step)")
    return state


def _damage(path: Path) -> Optional[str]:
    try:
        read_trainer_state(path)
    except CheckpointError as err:
        return str(err)
    return None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """`global_step_N` directories of a run, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def _pointed_step(run_dir: Path) -> Optional[int]:
    """The step the pointer names; None (with one warning line) when it is unreadable."""
    pointer = run_dir / POINTER
    if not pointer.exists():
        return None
    text = pointer.read_text(encoding="utf-8", errors="replace").strip()
    if not text.isdigit():
        log.warning("%s is damaged (%s): taking the newest complete checkpoint instead", pointer,
                    "empty" if not text else f"holds {text[:40]!r}, not a step number")
        return None
    return int(text)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint the pointer names, else the newest complete one; a checkpoint whose
    trainer_state.json is damaged is skipped, with one warning line naming the one used."""
    step = _pointed_step(run_dir)
    complete = [p for p in complete_checkpoints(run_dir) if is_checkpoint(p)]
    if step is not None and run_dir / f"global_step_{step}" in complete:
        # The pointer's checkpoint first, then the older ones (never a newer one it does not name).
        pointed = complete.index(run_dir / f"global_step_{step}")
        complete = complete[: pointed + 1]
    skipped: list[str] = []
    for candidate in reversed(complete):
        damage = _damage(candidate)
        if damage is None:
            if skipped:
                log.warning("skipping damaged checkpoint(s): %s; using %s", "; ".join(skipped), candidate)
            return candidate
        skipped.append(damage)
    if skipped:
        log.warning("skipping damaged checkpoint(s): %s; no complete checkpoint left", "; ".join(skipped))
    return None


# ---------------------------------------------------------------------- Hugging Face directories
@dataclass(frozen=True)
class HFAssets:
    """What a Hugging Face directory is made from besides the weights: the model config, the
    tokenizer, and the original model (`model_path`), whose generation config is copied, never
    invented. verl's FSDPCheckpointManager writes the same into `huggingface/`."""

    model_config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    model_path: str
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    lora: Optional[LoraSpec] = None  # the model carries these adapters: its directories hold the adapter
    base_model: Optional[str] = None  # what adapter_config.json names as the base (default: model_path)

    def generation_config(self) -> Optional[Path]:
        return generation_config_file(self.model_path)


def declared_dtype(model_config: PretrainedConfig) -> torch.dtype:
    """The dtype the model's config.json declares (fp32 when it declares none)."""
    dtype = getattr(model_config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def hf_model_from_state(state: dict[str, torch.Tensor], assets: HFAssets, dtype: torch.dtype) -> torch.nn.Module:
    """A plain (unsharded) model holding `state`, built on the meta device so no memory or time
    goes into a random initialisation that is overwritten anyway. With LoRA, a peft `PeftModel`
    (base and adapters in fp32, whatever `dtype`: a merge in low precision would lose the small
    update); its `save_pretrained` writes the adapter, `merge_and_unload` gives the merged model."""
    model = build_from_config(assets.model_config, dtype, "meta", assets.trust_remote_code, assets.attn_implementation)
    if assets.lora is not None:
        dtype = torch.float32
        wrapped = peft_model_on_meta(model, assets.lora, assets.base_model or assets.model_path)
        _fill(wrapped.base_model.model, state, dtype)
        return wrapped
    return _fill(model, state, dtype)


def _fill(model: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.nn.Module:
    try:
        # strict=False: a tied LM head may be absent from the state; tie_weights restores it.
        result = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    except RuntimeError as err:  # shapes that do not fit: another model's config
        raise CheckpointError(f"the checkpoint's weights do not fit this model config ({_first_problem(err)})") from None
    if result.unexpected_keys:
        raise CheckpointError(f"the checkpoint has {len(result.unexpected_keys)} weight(s) this model config lacks, "
                              f"e.g. {result.unexpected_keys[0]!r}")
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} weight(s) of this model config, e.g. {missing[0]!r}")
    return model


def _first_problem(err: RuntimeError) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else lines[0]


def write_hf_model(state: dict[str, torch.Tensor], assets: HFAssets, out_dir: Path, dtype: Optional[torch.dtype] = None,
                   merge: bool = False) -> Path:
    """A Hugging Face model directory from a full state dict, written to `<out_dir>.tmp` and
    renamed into place. `dtype` defaults to the one the model config declares. With LoRA it
    holds the adapter (adapter_config.json, adapter_model.safetensors, in fp32) and the tokenizer,
    or with `merge` the base with the adapters merged in (in `dtype`)."""
    dtype = dtype or declared_dtype(assets.model_config)
    model = hf_model_from_state(state, assets, dtype)
    if assets.lora is not None and merge:
        model = model.merge_and_unload().to(dtype)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # No config.json beside the adapter: `AutoModelForCausalLM.from_pretrained(out_dir)` then follows
    # adapter_config.json to the base and loads the adapter onto it (with one, it looks for weights).
    save_hf(model, assets.tokenizer, tmp, assets.generation_config())
    if assets.lora is not None and not merge:
        (tmp / "README.md").unlink(missing_ok=True)  # peft's empty model card
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


# safetensors' names of the dtypes a model holds.
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}
MAX_SHARD_BYTES = 50 * 10**9  # transformers' save_pretrained default (max_shard_size="50GB")


def stream_hf_weights(model: torch.nn.Module, dtype: torch.dtype, out_dir: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Collective. The sharded model's weights as safetensors in `out_dir` (what `save_pretrained`
    writes: `model.safetensors`, or numbered shards with `model.safetensors.index.json`), gathered
    and written one tensor at a time by rank 0: its host holds one full tensor, never the model.

    The header of a safetensors file needs every tensor's shape and dtype before the data: the
    sharded model knows them (a DTensor's shape is the global one), so it is written first and
    each gathered tensor is appended (cast on its shard first: `iter_full_tensors`). Before, the
    model was gathered in fp32 and cast on rank 0: 1.5x the fp32 model in host memory (~42 GB for 7B)."""
    names = saved_tensor_names(model)
    local = get_model_state_dict(model)
    entries = []
    for name in names:
        tensor_dtype = dtype if local[name].is_floating_point() else local[name].dtype
        entries.append((name, tensor_dtype, list(local[name].shape), local[name].shape.numel() * tensor_dtype.itemsize))
    del local
    shards: list[list[tuple]] = [[]]
    for entry in entries:
        if shards[-1] and sum(e[3] for e in shards[-1]) + entry[3] > max_shard_bytes:
            shards.append([])
        shards[-1].append(entry)
    files = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    is_primary = dist.get_rank() == 0
    if is_primary:
        out_dir.mkdir(parents=True, exist_ok=True)
    gathered = iter_full_tensors(model, dtype, names)
    for file_name, shard in zip(files, shards):
        handle = open(out_dir / file_name, "wb") if is_primary else None
        try:
            if handle is not None:
                handle.write(_safetensors_header(shard))
            for name, _, _, nbytes in shard:
                got, full = next(gathered)
                if handle is not None:
                    data = full.contiguous().reshape(-1).view(torch.uint8).numpy()
                    if got != name or data.nbytes != nbytes:  # the header would lie about the data
                        raise RuntimeError(f"streamed save: {got} ({data.nbytes} bytes) where the header has {name} ({nbytes} bytes)")
                    handle.write(data.data)
                del full
        finally:
            if handle is not None:
                handle.close()
    if is_primary and len(shards) > 1:
        index = {"metadata": {"total_size": sum(e[3] for e in entries)},
                 "weight_map": {e[0]: f for f, shard in zip(files, shards) for e in shard}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _safetensors_header(shard: list[tuple]) -> bytes:
    """The 8-byte length and the JSON header of a safetensors file (padded to 8 bytes, as the format asks)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, nbytes in shard:
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _save_checkpoint_hf(model: torch.nn.Module, assets: HFAssets, out_dir: Path) -> None:
    """A checkpoint's `huggingface/` with the model; with LoRA the adapter and the base's config
    (which `python -m trainer.export` builds the model from)."""
    save_hf(model, assets.tokenizer, out_dir, assets.generation_config())
    if assets.lora is not None:
        assets.model_config.save_pretrained(out_dir)
        (out_dir / "README.md").unlink(missing_ok=True)  # peft's empty model card


def load_model_state(path: Path, part: str = MODEL) -> dict[str, torch.Tensor]:
    """One part's full tensors from a DCP checkpoint, in this process alone: no process group,
    no GPU, the other parts (optimizer, critic) left unread. What verl's model merger does for
    its per-rank shards, done by DCP from the checkpoint's metadata."""
    # Private in torch 2.13, with the same planner as format_utils.dcp_to_torch_save (public),
    # which would read the optimizer and critic too: for a 7B model, three times the memory.
    # `no_dist`: alone even inside a process group (rank 0 exporting the best checkpoint at the
    # end of a run), where `_load_state_dict_from_keys` would wait for the other ranks.
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: no sharded model in it (no .metadata)")
    with warnings.catch_warnings():
        # Older torch warned "torch.distributed is unavailable ... a single process" here: intended.
        warnings.filterwarnings("ignore", message="torch.distributed is unavailable")
        try:
            loaded: dict[str, Any] = {}
            _load_state_dict(loaded, FileSystemReader(str(path)), no_dist=True, planner=_EmptyStateDictLoadPlanner(keys={part}))
        except (CheckpointException, OSError) as err:  # a shard missing or unreadable
            raise CheckpointError(f"{path}: cannot read the sharded model ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if part not in loaded:
        raise CheckpointError(f"{path}: the checkpoint holds no {part!r} part")
    return loaded[part]


# ---------------------------------------------------------------------- save and resume
FRESH_EFFECTS = {
    "optimizer": "the optimizer state starts from zero",
    "extra": "the LR schedule restarts from its first step and the RNG streams from the seed",
}


def _models(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            extra_modules: Optional[dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]]) -> dict[str, tuple]:
    """Each sharded model with its optimizer, by DCP key prefix: "" for the trained model (the
    actor), "<name>_" for the others (an RL critic)."""
    return {"": (model, optimizer), **{f"{name}_": pair for name, pair in (extra_modules or {}).items()}}


def fresh_parts(load_contents: list[str], saved: list[str]) -> dict[str, str]:
    """The resumable parts a resume will not restore, each with the reason."""
    return {part: "not in the checkpoint" if part not in saved else "not in trainer.checkpoint.load_contents"
            for part in FRESH_EFFECTS if part not in load_contents or part not in saved}


@dataclass
class Checkpointer:
    run_dir: Path
    save_freq: int  # -1: only the final save
    max_to_keep: Optional[int]
    rank: int
    world_size: int
    contents: CheckpointConfig
    hf: HFAssets  # what each checkpoint's huggingface/ folder and the final export are made from

    def __post_init__(self) -> None:
        self.save_contents = list(self.contents.save_contents)
        self.load_contents = self.contents.effective_load_contents()
        self.last_saved_step: Optional[int] = None
        self.keep: set[int] = set()  # steps never pruned (trainer.keep_best's checkpoint)

    # ------------------------------------------------------------------ when
    def should_save(self, step: int, last_step: bool) -> bool:
        return last_step or (self.save_freq > 0 and step % self.save_freq == 0)

    # ------------------------------------------------------------------ where
    def step_dir(self, step: int) -> Path:
        return self.run_dir / f"global_step_{step}"

    def complete_checkpoints(self) -> list[Path]:
        return complete_checkpoints(self.run_dir)

    def latest(self) -> Optional[Path]:
        return latest_checkpoint(self.run_dir)

    def clean_partial(self) -> None:
        """Remove checkpoints a crash left half-written (primary rank, before training starts)."""
        if self.rank != 0 or not self.run_dir.is_dir():
            return
        for partial in self.run_dir.glob("global_step_*.tmp"):
            log.warning("removing incomplete checkpoint %s", partial)
            shutil.rmtree(partial, ignore_errors=True)

    # ------------------------------------------------------------------ save
    @staticmethod
    def _sharded_state(models: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]], with_optimizer: bool) -> dict[str, Any]:
        """The DCP state of each model (and its optimizer when wanted, else left untouched), keyed
        `<prefix>model` / `<prefix>optim`."""
        state: dict[str, Any] = {}
        for prefix, (m, o) in models.items():
            if with_optimizer:
                state[f"{prefix}model"], state[f"{prefix}optim"] = get_state_dict(m, o)
            else:
                state[f"{prefix}model"] = get_model_state_dict(m)
        return state

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        trainer_state: dict[str, Any],
        extra_modules: Optional[dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]] = None,
    ) -> Path:
        """Collective. `extra_modules` holds other sharded models (e.g. an RL critic) by name;
        `huggingface/` describes `model` (the actor)."""
        final = self.step_dir(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        dcp.save(self._sharded_state(_models(model, optimizer, extra_modules), "optimizer" in self.save_contents),
                 checkpoint_id=str(tmp))
        if "extra" in self.save_contents:
            (tmp / "rng").mkdir(exist_ok=True)
            torch.save(_rng_state(), tmp / "rng" / f"rank_{self.rank}.pt")
        full_state, streamed = None, False
        if "hf_model" in self.save_contents:
            if self.hf.lora is None:  # the whole model: gathered and written tensor by tensor
                stream_hf_weights(model, declared_dtype(self.hf.model_config), tmp / HF_DIR)
                streamed = True
            else:  # the adapters, in fp32, through peft's save_pretrained
                full_state = gather_full_state_dict(model)
        dist.barrier()
        if self.rank == 0:
            if streamed:
                save_hf_files(self.hf.model_config, self.hf.tokenizer, tmp / HF_DIR, self.hf.generation_config())
            elif full_state is not None:
                _save_checkpoint_hf(hf_model_from_state(full_state, self.hf, declared_dtype(self.hf.model_config)), self.hf,
                                    tmp / HF_DIR)
            else:
                save_hf_files(self.hf.model_config, self.hf.tokenizer, tmp / HF_DIR, self.hf.generation_config())
                if self.hf.lora is not None:  # says the checkpoint's model carries these adapters
                    write_adapter_config(self.hf.lora, self.hf.base_model or self.hf.model_path, tmp / HF_DIR)
            state = {**trainer_state, "world_size": self.world_size, "save_contents": self.save_contents}
            if "extra" in self.save_contents:
                state["scheduler"] = scheduler.state_dict()
            _fsync_tree(tmp)  # every file the state file vouches for is on disk before it
            _write_durable(tmp / STATE_FILE, json.dumps(state, indent=2))
            if final.exists():  # an older run's checkpoint of the same step (resume disabled)
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync_dir(self.run_dir)
            _write_durable(self.run_dir / POINTER, str(step))
            self._prune(final)
        dist.barrier()
        self.last_saved_step = step
        return final

    def _prune(self, just_written: Path) -> None:
        """Keep the newest `max_to_keep` checkpoints by write order (when trainer_state.json was
        written), never the one just written, and besides them the ones in `keep` (the best). By step number, a run resumed from an older step
        in a folder with newer checkpoints would delete its own new checkpoint."""
        if not self.max_to_keep:
            return
        kept = {self.step_dir(step) for step in self.keep}
        complete = [p for p in self.complete_checkpoints() if is_checkpoint(p) and p != just_written and p not in kept]
        by_write = sorted(complete, key=lambda p: ((p / STATE_FILE).stat().st_mtime_ns, int(_STEP_DIR.match(p.name).group(1))))
        for old in by_write[: max(len(by_write) - (self.max_to_keep - 1), 0)]:
            log.info("removing old checkpoint %s (trainer.max_ckpt_to_keep=%d)", old, self.max_to_keep)
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(
        self,
        path: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        extra_modules: Optional[dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]] = None,
    ) -> dict[str, Any]:
        """Collective. Restores the model and, where both load_contents and the checkpoint have
        them, the optimizer, the scheduler and this rank's RNG; returns the trainer state (step,
        data position, counters)."""
        if not is_checkpoint(path):
            raise FileNotFoundError(f"trainer.resume_from_path={str(path)!r} is not a complete checkpoint (no {STATE_FILE})")
        trainer_state = read_trainer_state(path)
        # Every rank reads the same file: a LoRA checkpoint and a full model refuse each other
        # alike on all ranks, in one line, before DCP would fail on the names of the weights.
        saved_lora = (path / HF_DIR / ADAPTER_CONFIG).is_file()
        if saved_lora != (self.hf.lora is not None):
            raise ConfigError(f"model.lora_rank: {path} holds a {'LoRA-adapted' if saved_lora else 'fully fine-tuned'} "
                              f"model; resume it {'with model.lora_rank > 0 (its rank and targets)' if saved_lora else 'without LoRA'}")
        fresh = fresh_parts(self.load_contents, trainer_state.get("save_contents", LEGACY_CONTENTS))
        if fresh and self.rank == 0:
            log.warning("resuming from %s without %s: %s", path, " and ".join(f"{p} ({why})" for p, why in fresh.items()),
                        "; ".join(FRESH_EFFECTS[p] for p in fresh))
        restore = {part: part not in fresh for part in FRESH_EFFECTS}

        models = _models(model, optimizer, extra_modules)
        state = self._sharded_state(models, restore["optimizer"])
        dcp.load(state, checkpoint_id=str(path))
        for prefix, (m, o) in models.items():
            if restore["optimizer"]:
                set_state_dict(m, o, model_state_dict=state[f"{prefix}model"], optim_state_dict=state[f"{prefix}optim"])
            else:
                set_model_state_dict(m, state[f"{prefix}model"])
        if restore["extra"]:
            scheduler.load_state_dict(trainer_state["scheduler"])
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
            if not is_checkpoint(path):
                raise FileNotFoundError(f"trainer.resume_from_path={resume_from_path!r} is not a complete checkpoint (no {STATE_FILE})")
            damage = _damage(path)
            if damage is not None:  # named explicitly: the user chooses another, we do not guess
                raise ConfigError(f"trainer.resume_from_path={resume_from_path!r}: {damage}")
            return path
        return self.latest()

    def agree_on_resume(self, mode: str, resume_from_path: Optional[str]) -> Optional[Path]:
        """Collective. Rank 0 decides what to resume (`resolve_resume`) and every rank gets its
        answer: ranks that looked for themselves could disagree (a checkpoint visible on one node
        only) and then some would enter the load's collectives while others start training."""
        path = decided_by_primary(lambda: self.resolve_resume(mode, resume_from_path))
        if path is not None and self.rank == 0 and self.run_dir.resolve() not in path.resolve().parents:
            log.info("the checkpoint to resume, %s, is outside the run directory %s (a checkpoint's .metadata is "
                     "unpickled on load: resume only from checkpoints you trust)", path, self.run_dir)
        return path

    # ------------------------------------------------------------------ the end of a run
    def export_hf_model(self, model: torch.nn.Module, out_dir: Path, merged_dir: Optional[Path] = None) -> Optional[Path]:
        """Collective. The model in Hugging Face format, in the dtype the original config
        declared; rank 0 writes it beside `out_dir` and renames it into place. With LoRA,
        `out_dir` holds the adapter, and `merged_dir` (when given) the merged model."""
        if self.hf.lora is None:
            tmp = out_dir.with_name(out_dir.name + ".tmp")
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            stream_hf_weights(model, declared_dtype(self.hf.model_config), tmp)
            if self.rank != 0:
                return None
            save_hf_files(self.hf.model_config, self.hf.tokenizer, tmp, self.hf.generation_config())
            if out_dir.exists():
                shutil.rmtree(out_dir)
            tmp.rename(out_dir)
            log.info("exported the model in Hugging Face format to %s", out_dir)
            return out_dir
        state = gather_full_state_dict(model)
        if self.rank != 0:
            return None
        write_hf_model(state, self.hf, out_dir)
        what = "the LoRA adapter" if self.hf.lora is not None else "the model"
        log.info("exported %s in Hugging Face format to %s", what, out_dir)
        if self.hf.lora is not None and merged_dir is not None:
            write_hf_model(state, self.hf, merged_dir, merge=True)
            log.info("exported the base with the adapter merged in to %s", merged_dir)
        return out_dir
