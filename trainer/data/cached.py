"""The glue between the data readers and the token cache (trainer/token_cache.py): the rows of a
set of files, tokenized once by the caller's `chunks` into a cache entry and memory-mapped. SFT
examples (trainer/data/sft_examples.py) and RL prompts (trainer/data/rl_prompts.py) both load
through it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from transformers import PreTrainedTokenizerBase

from trainer import token_cache
from trainer.data.rows import DataError, as_file_list

log = logging.getLogger(__name__)


def load_cached(
    files: Any,
    key: str,
    tokenizer: PreTrainedTokenizerBase,
    settings: dict,
    chunks: Callable[[list[str], dict], Iterable[token_cache.Chunk]],
    rows: Callable[[token_cache.TokenArrays, list[str]], token_cache.MappedRows],
    cache_dir: Optional[str] = None,
    ranks: token_cache.Ranks = token_cache.Ranks(),
) -> token_cache.MappedRows:
    """The rows of `files`, tokenized once (`chunks(paths, stats)`, which may count things in
    `stats`: kept in the entry's meta.json) into the token cache under `cache_dir` (None: a
    temporary folder of this process, removed with the rows) and memory-mapped. `settings`: all
    that changes the tokens, part of the entry's key. `ranks` says who writes (local rank 0 of
    each node) and who waits; a bad row stops every rank."""
    paths = as_file_list(files, key)
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"{key}: file not found: {path}")
    root = Path(cache_dir).expanduser() if cache_dir else Path(tempfile.mkdtemp(prefix="tokens-"))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"data.cache_dir: cannot create {root} ({err.strerror or err})") from None
    meta = {"key": key, "files": paths, "settings": settings, "stats": {}}  # stats filled while writing
    start = time.perf_counter()
    entry, hit = token_cache.build_once(
        lambda: root / token_cache.entry_key(paths, tokenizer, settings),
        lambda entry: token_cache.write_entry(entry, lambda: chunks(paths, meta["stats"]), meta),
        ranks if cache_dir else token_cache.Ranks(),
        DataError,
    )
    mapped = rows(token_cache.TokenArrays(entry), paths)
    what = f"{len(mapped)} {mapped.item_name}s"
    if not cache_dir:
        weakref.finalize(mapped, shutil.rmtree, root, True)
    elif ranks.rank == 0:
        if hit:
            log.info("%s: %s from the token cache %s (tokenization skipped)", key, what, entry)
        else:
            log.info("%s: %s tokenized in %.1fs into the token cache %s", key, what, time.perf_counter() - start, entry)
    return mapped
