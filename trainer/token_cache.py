"""The token cache: a tokenized data set (SFT examples, RL prompts) as flat NumPy arrays on
disk, written once per (files' content, tokenizer, settings that change tokens) and
memory-mapped by every rank.
(Over 400 lines: the cache's key, writer, reader and pruning share its file format.)

One entry, `<cache_dir>/<key>/` (key: a hash of the files' bytes, the tokenizer and the settings):

    input_ids.npy       int32 [tokens]         every example's tokens, end to end
    loss_mask.npy       uint8 [tokens]         1 where the token is a training target
    offsets.npy         int64 [n + 1]          example i is tokens offsets[i]:offsets[i + 1]
    lengths.npy         int32 [n]
    prompt_ids.npy      int32 [prompt tokens]  what generation starts from
    prompt_offsets.npy  int64 [n + 1]
    sources.npy         int64 [n, 2]           (file number, JSONL byte offset or parquet row)
    records.npy         uint8 [bytes]          per example, bytes the reader needs beside its tokens
    record_offsets.npy  int64 [n + 1]          (RL prompts: their text and answer, as JSON); empty for SFT
    meta.json           counts and settings, written last

The arrays are `.npy` files that grow as chunks are tokenized (the header, a fixed 128 bytes, is
written when the count is known), so memory stays bounded whatever the data set's size. An entry
is built in `<key>.tmp-<host>-<pid>` and renamed into place: readers see a complete entry or none.
One process per node writes (local rank 0, as HF datasets' `main_process_first`); the others wait
and then map the same files, so the page cache holds one copy per node.

The key also holds this project's version and tokenizing code and the tokenizers/transformers
versions (`code_fingerprint`): an upgrade or a fix tokenizes again instead of reusing old ids.
Nothing is evicted during a run; `python -m trainer.token_cache prune [--max-gb N] [--dir DIR]`
deletes the least recently used entries down to N GB (docs/token-cache.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch.distributed as dist

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: records
HEADER_BYTES = 128  # a .npy v1.0 header of a 1-D or [n, 2] array, padded to 64-byte alignment
_HASH_CHUNK_BYTES = 8 << 20


# ----------------------------------------------------------------------------- keys
def file_digest(path: str) -> str:
    """The file's content hash (blake2b, ~1 GB/s): renaming or touching a file keeps its entry."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_CHUNK_BYTES):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Everything of a tokenizer that changes token ids: its vocabulary, merges and
    normalisation (the fast tokenizer's JSON), special tokens and chat template."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = [tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id, list(tokenizer.all_special_tokens)]
    h.update(json.dumps(special, default=str).encode())
    h.update(str(getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()


# The code that turns rows into tokens: a fix in it must not reuse entries written before it.
_TOKENIZING_MODULES = ("trainer/data/rows.py", "trainer/data/cached.py", "trainer/data/sft_examples.py",
                       "trainer/data/rl_prompts.py", "trainer/token_cache.py")


def code_fingerprint() -> dict[str, str]:
    """What else decides the tokens: this project's version and tokenizing code (by content, so
    a fix without a version bump counts too), and the tokenizers / transformers versions (a
    library fix to normalisation or chat templates changes ids for the same tokenizer files)."""
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"

    root = Path(__file__).resolve().parent.parent
    code = hashlib.blake2b(digest_size=16)
    for relative in _TOKENIZING_MODULES:
        code.update((root / relative).read_bytes())
    return {"project": version("sample-aware-trainer"), "code": code.hexdigest(),
            "tokenizers": version("tokenizers"), "transformers": version("transformers")}


def entry_key(paths: Sequence[str], tokenizer: Any, settings: dict) -> str:
    described = {
        "format": FORMAT_VERSION,
        "files": [file_digest(p) for p in paths],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": settings,
        "code": code_fingerprint(),
    }
    return hashlib.blake2b(json.dumps(described, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


# ----------------------------------------------------------------------------- writing
class _GrowingNpy:
    """A 1-D (or [n, width]) .npy file appended to chunk by chunk; the header is written last."""

    def __init__(self, path: Path, dtype: np.dtype, width: int = 0):
        self.path, self.dtype, self.width, self.count = path, np.dtype(dtype), width, 0
        self.handle = open(path, "wb")
        self.handle.write(b"\0" * HEADER_BYTES)

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        self.handle.write(values.tobytes())
        self.count += len(values)

    def close(self) -> None:
        import io

        header = io.BytesIO()
        shape = (self.count, self.width) if self.width else (self.count,)
        np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape})
        if len(header.getvalue()) != HEADER_BYTES:
            raise RuntimeError(f"unexpected .npy header size {len(header.getvalue())} for {self.path}")
        self.handle.seek(0)
        self.handle.write(header.getvalue())
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()


@dataclass
class Chunk:
    """Tokenized examples of a chunk of rows, ready to append."""

    input_ids: Sequence[Sequence[int]]
    loss_masks: Sequence[Sequence[int]]
    prompt_ids: Sequence[Sequence[int]]
    sources: Sequence[tuple[int, int]]
    records: Optional[Sequence[bytes]] = None  # None: no record per example


class EntryWriter:
    def __init__(self, folder: Path):
        folder.mkdir(parents=True)
        self.folder = folder
        self.input_ids = _GrowingNpy(folder / "input_ids.npy", np.int32)
        self.loss_mask = _GrowingNpy(folder / "loss_mask.npy", np.uint8)
        self.lengths = _GrowingNpy(folder / "lengths.npy", np.int32)
        self.prompt_ids = _GrowingNpy(folder / "prompt_ids.npy", np.int32)
        self.prompt_lengths = _GrowingNpy(folder / "prompt_lengths.npy", np.int32)
        self.sources = _GrowingNpy(folder / "sources.npy", np.int64, width=2)
        self.records = _GrowingNpy(folder / "records.npy", np.uint8)
        self.record_lengths = _GrowingNpy(folder / "record_lengths.npy", np.int64)

    def append(self, chunk: Chunk) -> None:
        self.input_ids.append(_flat(chunk.input_ids))
        self.loss_mask.append(_flat(chunk.loss_masks))
        self.lengths.append(np.fromiter((len(x) for x in chunk.input_ids), np.int32, len(chunk.input_ids)))
        self.prompt_ids.append(_flat(chunk.prompt_ids))
        self.prompt_lengths.append(np.fromiter((len(x) for x in chunk.prompt_ids), np.int32, len(chunk.prompt_ids)))
        self.sources.append(np.asarray(chunk.sources, dtype=np.int64).reshape(-1, 2))
        records = chunk.records if chunk.records is not None else [b""] * len(chunk.input_ids)
        self.records.append(np.frombuffer(b"".join(records), dtype=np.uint8))
        self.record_lengths.append(np.fromiter((len(r) for r in records), np.int64, len(records)))

    def close(self, meta: dict) -> int:
        for part in (self.input_ids, self.loss_mask, self.lengths, self.prompt_ids, self.prompt_lengths, self.sources,
                     self.records, self.record_lengths):
            part.close()
        for name, lengths in (("offsets.npy", "lengths.npy"), ("prompt_offsets.npy", "prompt_lengths.npy"),
                              ("record_offsets.npy", "record_lengths.npy")):
            counts = np.load(self.folder / lengths, mmap_mode="r")
            offsets = np.zeros(len(counts) + 1, dtype=np.int64)
            np.cumsum(counts, out=offsets[1:])
            np.save(self.folder / name, offsets)
        (self.folder / "meta.json").write_text(json.dumps({**meta, "examples": self.lengths.count, "tokens": self.input_ids.count}, indent=1))
        return self.lengths.count


def _flat(lists: Sequence[Sequence[int]]) -> np.ndarray:
    total = sum(len(x) for x in lists)
    return np.fromiter((t for x in lists for t in x), dtype=np.int64, count=total)


def write_entry(final: Path, chunks: Callable[[], Any], meta: dict) -> int:
    """Tokenize into a temporary folder and rename it to `final`; returns the example count.

    Two writers of the same entry (nodes sharing a cache folder) race harmlessly: the entries
    are equal, the first rename wins and the other folder is dropped."""
    remove_dead_writers(final.parent)
    tmp = final.with_name(f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        writer = EntryWriter(tmp)
        for chunk in chunks():
            writer.append(chunk)
        count = writer.close(meta)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return count


def remove_dead_writers(folder: Path) -> None:
    """Delete the temporary folders of writers on this host whose process is gone (killed
    mid-write: SIGKILL, the OOM killer), which nothing else would ever remove. Other hosts'
    folders are left alone: their processes cannot be checked from here."""
    for tmp in folder.glob(f"*.tmp-{socket.gethostname()}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# ----------------------------------------------------------------------------- reading
class TokenArrays:
    """One entry's arrays, memory-mapped read-only: pages are loaded when touched and shared by
    every process of the node that maps the same files."""

    def __init__(self, folder: Path):
        def load(name: str) -> np.ndarray:
            return np.load(folder / name, mmap_mode="r")

        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.input_ids = load("input_ids.npy")
        self.loss_mask = load("loss_mask.npy")
        self.offsets = load("offsets.npy")
        self.lengths = load("lengths.npy")
        self.prompt_ids = load("prompt_ids.npy")
        self.prompt_offsets = load("prompt_offsets.npy")
        self.sources = load("sources.npy")
        self.records = load("records.npy")
        self.record_offsets = load("record_offsets.npy")

    def __len__(self) -> int:
        return len(self.lengths)

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[start:end], self.loss_mask[start:end]

    def prompt(self, i: int) -> np.ndarray:
        return self.prompt_ids[int(self.prompt_offsets[i]) : int(self.prompt_offsets[i + 1])]

    def record(self, i: int) -> bytes:
        return self.records[int(self.record_offsets[i]) : int(self.record_offsets[i + 1])].tobytes()


def rows_fingerprint(rows: Any) -> str:
    """What a rank read for a data key, comparable across nodes: the token-cache entry (a hash of
    the files' contents, the tokenizer, the settings and the tokenizing code) and the row count."""
    folder = getattr(rows, "folder", None)
    return f"{folder.name if folder is not None else '-'}:{len(rows)}"


class MappedRows(SequenceABC):
    """An entry's rows as a sequence built on demand from the mapped arrays: it stands where a
    list stood (len, indexing, slicing, iteration); subclasses build row `i` in `_row`."""

    item_name = "row"

    def __init__(self, arrays: TokenArrays):
        self.arrays = arrays

    @property
    def folder(self) -> Path:
        return self.arrays.folder

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, index):  # int -> one row, slice -> a list of rows
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.item_name} {index} of {len(self)}")
        return self._row(i)

    def _row(self, i: int) -> Any:
        raise NotImplementedError


# ----------------------------------------------------------------------------- one writer per node
@dataclass(frozen=True)
class Ranks:
    """Who writes: local rank 0 of each node; everyone else waits for it."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def writes(self) -> bool:
        return self.local_rank == 0


# The ranks that wait may wait for a long tokenization: their own gloo group, without the
# training collectives' timeout (a writer that dies ends the job through torchrun).
_WAIT_TIMEOUT = timedelta(days=7)


def build_once(locate: Callable[[], Path], write: Callable[[Path], int], ranks: Ranks, error_type: type[Exception]) -> tuple[Path, bool]:
    """Make sure this node's entry exists; returns (entry, whether it already existed on this
    node's writer). Only the writers read the files to find the entry's key (`locate`); the
    others get the path from their node's writer. A writer's error (a bad row) reaches every
    rank, raised as `error_type` with the writer's message, so no rank waits for a writer that
    has given up."""
    entry: Optional[Path] = None
    hit = False
    failure: Optional[BaseException] = None
    if ranks.writes:
        try:
            entry = locate()
            hit = (entry / "meta.json").is_file()
            if hit:
                mark_used(entry)
            else:
                write(entry)
        except Exception as err:  # noqa: BLE001 - sent to the other ranks, then raised here
            failure = err
    if ranks.world_size > 1 and dist.is_available() and dist.is_initialized():
        group = dist.new_group(backend="gloo", timeout=_WAIT_TIMEOUT)
        try:
            found: list[Optional[tuple[Optional[str], Optional[str]]]] = [None] * ranks.world_size
            sent = (None if entry is None else str(entry), None if failure is None else _describe(failure))
            dist.all_gather_object(found, sent, group=group)
        finally:
            dist.destroy_process_group(group)
        if failure is None:
            if (first := next((error for _, error in found if error), None)) is not None:
                raise error_type(first)
            if entry is None:  # torchrun numbers a node's ranks consecutively: its local rank 0 is rank - local_rank
                entry = Path(found[ranks.rank - ranks.local_rank][0])
    if failure is not None:
        raise failure
    return entry, hit


def _describe(err: BaseException) -> str:
    text = str(err)
    return text if isinstance(err, ValueError) and text else f"token cache: the writing rank failed: {type(err).__name__}: {text}"


# ----------------------------------------------------------------------------- eviction
USED_MARK = "last_used"  # touched on every hit: what `prune` evicts by (atime is often off: noatime)


def mark_used(entry: Path) -> None:
    try:
        (entry / USED_MARK).touch()
    except OSError:  # a read-only cache still serves; it is just never pruned by use
        pass


def _last_used(entry: Path) -> float:
    mark = entry / USED_MARK
    return (mark if mark.exists() else entry / "meta.json").stat().st_mtime


def _size_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def prune(root: Path, max_bytes: int) -> list[Path]:
    """Delete the least recently used entries until the cache holds at most `max_bytes`, and the
    folders of this host's writers that died mid-write. Returns what was deleted. A run that has
    an entry mapped keeps reading it (deleted files stay readable while mapped); the next run
    tokenizes again."""
    if not root.is_dir():
        return []
    remove_dead_writers(root)
    entries = [p for p in root.iterdir() if p.is_dir() and (p / "meta.json").is_file() and ".tmp-" not in p.name]
    sizes = {p: _size_bytes(p) for p in entries}
    total = sum(sizes.values())
    removed = []
    for entry in sorted(entries, key=_last_used):
        if total <= max_bytes:
            break
        shutil.rmtree(entry, ignore_errors=True)
        total -= sizes[entry]
        removed.append(entry)
    return removed


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    import sys

    from config import env as env_config

    parser = argparse.ArgumentParser(prog="python -m trainer.token_cache",
                                     description="The token cache (data.cache_dir): evict entries.")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("prune", help="delete the least recently used entries down to a size")
    cmd.add_argument("--max-gb", type=float, default=10.0, help="size to keep, in GB (10^9 bytes; default 10; 0 empties it)")
    cmd.add_argument("--dir", type=Path, default=None,
                     help="the cache folder (default: data.cache_dir's default, $XDG_CACHE_HOME/sample-aware-trainer/tokens)")
    args = parser.parse_args(argv)
    if args.max_gb < 0:
        print(f"error: --max-gb={args.max_gb}: expected a size >= 0", file=sys.stderr)
        return 2
    root = (args.dir or Path(env_config.token_cache_dir(env_config.environ()))).expanduser()
    if not root.is_dir():
        print(f"error: --dir={root}: no such folder", file=sys.stderr)
        return 2
    removed = prune(root, int(args.max_gb * 1e9))
    left = sum(_size_bytes(p) for p in root.iterdir() if p.is_dir())
    print(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} from {root}; {left / 1e9:.2f} GB left")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
