"""SFT data: read parquet/JSONL, tokenize with the loss on response tokens only, batch.

Files are read as a stream and tokenized a chunk of rows at a time into the token cache
(trainer/token_cache.py: written once, memory-mapped by every rank), so a bad row (missing
column, wrong type, too long with `truncation=error`) stops the run at its chunk, naming file,
row and column, before any model is built; and lengths are known for token-balanced batching
without holding the examples in memory.

Loss convention: `labels[i]` is the token id when token i is a training target and -100
otherwise; the model's logits at i-1 predict token i.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import PreTrainedTokenizerBase

from config.schema import DataConfig
from trainer import token_cache

log = logging.getLogger(__name__)

IGNORE = -100


class DataError(ValueError):
    """Bad input data. The message names the file, the row and the column."""


# ----------------------------------------------------------------------------- reading
def as_file_list(files: Any, key: str) -> list[str]:
    if files is None:
        return []
    if isinstance(files, (str, Path)):
        return [str(Path(files).expanduser())]
    if isinstance(files, Iterable):
        return [str(Path(f).expanduser()) for f in files]
    raise DataError(f"{key}: expected a file path or a list of paths, got {type(files).__name__}")


@dataclass
class Row:
    file: str
    index: int  # 0-based row number within the file
    values: dict
    locator: int = -1  # where to read the row again: its byte offset (JSONL) or its index (parquet)


CHUNK_ROWS = 1024  # rows read and tokenized at a time: memory stays bounded, a bad row stops the run early


def read_rows(path: str, columns: Sequence[str], key: str, optional: Sequence[str] = ()) -> list[Row]:
    """Rows of one parquet or JSONL file, keeping only `columns` (which must all exist) and the
    `optional` columns the file has."""
    return [row for chunk in iter_row_chunks(path, columns, key, optional) for row in chunk]


def iter_row_chunks(
    path: str, columns: Sequence[str], key: str, optional: Sequence[str] = (), chunk_rows: int = CHUNK_ROWS
) -> Iterator[list[Row]]:
    """The rows of one parquet or JSONL file, `chunk_rows` at a time, read as a stream."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{key}: file not found: {path}")
    suffix = file.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_chunks(file, path, columns, optional, chunk_rows)
    elif suffix in (".jsonl", ".json"):
        yield from _jsonl_chunks(file, path, columns, optional, chunk_rows)
    else:
        raise DataError(f"{key}: unsupported file type {suffix!r} for {path} (use .parquet or .jsonl)")


def _parquet_error(path: str, err: Exception) -> DataError:  # not parquet, truncated, a corrupt page
    return DataError(f"{path}: not a readable parquet file ({str(err).splitlines()[0] if str(err) else type(err).__name__})")


def _parquet_chunks(file: Path, path: str, columns: Sequence[str], optional: Sequence[str], chunk_rows: int) -> Iterator[list[Row]]:
    try:
        parquet = pq.ParquetFile(file)
        schema_names = parquet.schema_arrow.names
    except (pa.ArrowException, OSError) as err:
        raise _parquet_error(path, err) from None
    missing = [c for c in columns if c not in schema_names]
    if missing:
        raise DataError(f"{path}: column {missing[0]!r} not found (columns: {', '.join(schema_names)})")
    wanted = list(columns) + [c for c in optional if c in schema_names and c not in columns]
    batches = parquet.iter_batches(batch_size=chunk_rows, columns=wanted)
    start = 0
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as err:
            raise _parquet_error(path, err) from None
        if batch is None:
            return
        values = batch.to_pylist()
        yield [Row(path, start + i, v, start + i) for i, v in enumerate(values)]
        start += len(values)


def _jsonl_chunks(file: Path, path: str, columns: Sequence[str], optional: Sequence[str], chunk_rows: int) -> Iterator[list[Row]]:
    """Rows of a JSONL file (one JSON object per line); the error names the file and row."""
    rows: list[Row] = []
    offset = 0
    with open(file, "rb") as handle:
        for line_no, raw in enumerate(handle):
            row = _jsonl_row(raw, path, line_no, offset, columns, optional)
            offset += len(raw)
            if row is None:
                continue
            rows.append(row)
            if len(rows) == chunk_rows:
                yield rows
                rows = []
    if rows:
        yield rows


def _jsonl_row(raw: bytes, path: str, line_no: int, offset: int, columns: Sequence[str], optional: Sequence[str]) -> Optional[Row]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: row {line_no}: not UTF-8 text (a JSONL file is one JSON object per line)") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: row {line_no}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}: row {line_no}: expected a JSON object, got {type(record).__name__}")
    for c in columns:
        if c not in record:
            raise DataError(f"{path}: row {line_no}: column {c!r} not found")
    return Row(path, line_no, {c: record[c] for c in [*columns, *optional] if c in record}, offset)


def dig(row: Row, column: str, dict_keys: Optional[Sequence[str]]) -> Any:
    value = row.values[column]
    path = column
    for k in dict_keys or ():
        if not isinstance(value, dict):
            raise DataError(f"{row.file}: row {row.index}: column {path!r} is {type(value).__name__}, not a dict with key {k!r}")
        if k not in value:
            raise DataError(f"{row.file}: row {row.index}: column {path!r} has no key {k!r}")
        value = value[k]
        path = f"{path}.{k}"
    return value


def text_field(row: Row, column: str, dict_keys: Optional[Sequence[str]]) -> str:
    value = dig(row, column, dict_keys)
    shown = ".".join([column, *(dict_keys or [])])
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{row.file}: row {row.index}: column {shown!r} is {type(value).__name__}, expected text")
    return value


# ----------------------------------------------------------------------------- tokenizing
class Example:
    """One tokenized example. Its texts (for samples and errors) may be read from the source file
    only when asked for: a data set of millions of rows keeps none of them in memory."""

    __slots__ = ("input_ids", "labels", "prompt_ids", "_texts", "_read_texts")

    def __init__(
        self,
        input_ids: list[int],
        labels: list[int],
        prompt_ids: list[int],  # what generation starts from (templated, ends with the assistant prefix)
        prompt_text: Optional[str] = None,  # what a person reads as the prompt
        reference: Optional[str] = None,  # the response the data set holds for it
        read_texts: Optional[Callable[[], tuple[str, str]]] = None,
    ):
        self.input_ids, self.labels, self.prompt_ids = input_ids, labels, prompt_ids
        self._texts = None if read_texts is not None else (prompt_text or "", reference or "")
        self._read_texts = read_texts

    def _load_texts(self) -> tuple[str, str]:
        if self._texts is None:
            self._texts = self._read_texts()
        return self._texts

    @property
    def prompt_text(self) -> str:
        return self._load_texts()[0]

    @property
    def reference(self) -> str:
        return self._load_texts()[1]

    @property
    def num_loss_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)

    def __repr__(self) -> str:
        return f"Example({len(self.input_ids)} tokens, {self.num_loss_tokens} trained)"


def _truncate(ids: list[int], labels: list[int], cfg: DataConfig, row: Row) -> tuple[list[int], list[int]]:
    if len(ids) <= cfg.max_length:
        return ids, labels
    if cfg.truncation == "error":
        raise DataError(
            f"{row.file}: row {row.index}: {len(ids)} tokens exceed data.max_length={cfg.max_length} "
            "(raise it or set data.truncation=left|right)"
        )
    if cfg.truncation == "left":
        return ids[-cfg.max_length:], labels[-cfg.max_length:]
    return ids[: cfg.max_length], labels[: cfg.max_length]


def _chat_prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str, template_kwargs: dict) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False, **template_kwargs
    )


def tokenize_single_turn(rows: list[Row], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> list[Example]:
    prompts = [text_field(r, cfg.prompt_key, cfg.prompt_dict_keys) for r in rows]
    responses = [text_field(r, cfg.response_key, cfg.response_dict_keys) for r in rows]
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if has_template:
        texts = [_chat_prompt_text(tokenizer, p, cfg.apply_chat_template_kwargs) for p in prompts]
        prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"] if responses else []
    eos = tokenizer.eos_token_id
    examples = []
    for row, prompt, response, p_ids, r_ids in zip(rows, prompts, responses, prompt_ids, response_ids):
        r_ids = list(r_ids) + [eos]  # the model learns to stop
        ids = list(p_ids) + r_ids
        labels = [IGNORE] * len(p_ids) + r_ids
        ids, labels = _truncate(ids, labels, cfg, row)
        prompt_for_generation = list(p_ids)[-cfg.max_length:]
        examples.append(Example(ids, labels, prompt_for_generation, prompt, response))
    return examples


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool, **template_kwargs) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False, **template_kwargs)


def _template_kwargs(row: Row, cfg: DataConfig) -> dict:
    """The chat template's arguments for one conversation: `apply_chat_template_kwargs`, plus the
    row's tools and enable_thinking flag when the data have those columns (as verl's
    MultiTurnSFTDataset)."""
    kwargs = dict(cfg.apply_chat_template_kwargs)
    tools = row.values.get(cfg.multiturn.tools_key)
    if tools is not None:
        if isinstance(tools, str):  # tools stored as a JSON string
            try:
                tools = json.loads(tools)
            except json.JSONDecodeError as err:
                raise DataError(f"{row.file}: row {row.index}: column {cfg.multiturn.tools_key!r} is not valid JSON ({err.msg})") from None
        kwargs["tools"] = tools
    thinking = row.values.get(cfg.multiturn.enable_thinking_key)
    if thinking is not None:
        kwargs["enable_thinking"] = bool(thinking)
    return kwargs


def tokenize_multi_turn(rows: list[Row], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> list[Example]:
    """Loss on every assistant turn's tokens (content and end-of-turn), none elsewhere.

    Each message's span is the text its rendering adds to the rendering of the messages before
    it, so the template must render conversations prefix by prefix (all common templates do).
    """
    key = cfg.multiturn.messages_key
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data.multiturn.enable=true needs a tokenizer with a chat_template")
    examples = []
    for row in rows:
        messages = row.values[key]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{row.file}: row {row.index}: column {key!r} must be a non-empty list of messages")
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{row.file}: row {row.index}: column {key!r} message {j} needs text 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{row.file}: row {row.index}: column {key!r} has no assistant message to learn from")
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        template_kwargs = _template_kwargs(row, cfg)
        ids: list[int] = []
        labels: list[int] = []
        rendered = ""
        last_assistant = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")
        prompt_text_so_far = ""
        for j, m in enumerate(msgs):
            pieces: list[tuple[str, bool]] = []
            if m["role"] == "assistant":
                with_prefix = _render(tokenizer, msgs[:j], True, **template_kwargs)
                pieces.append((with_prefix[len(rendered):], False))
                if j == last_assistant:
                    prompt_text_so_far = with_prefix
                full = _render(tokenizer, msgs[: j + 1], False, **template_kwargs)
                pieces.append((full[len(with_prefix):], True))
                if not full.startswith(with_prefix):
                    raise DataError(f"{row.file}: row {row.index}: the chat template does not render turns as prefixes")
            else:
                full = _render(tokenizer, msgs[: j + 1], False, **template_kwargs)
                pieces.append((full[len(rendered):], False))
            if not full.startswith(rendered):
                raise DataError(f"{row.file}: row {row.index}: the chat template does not render turns as prefixes")
            for text, trained in pieces:
                if not text:
                    continue
                piece_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids.extend(piece_ids)
                labels.extend(piece_ids if trained else [IGNORE] * len(piece_ids))
            rendered = full
        prompt_ids = tokenizer(prompt_text_so_far, add_special_tokens=False)["input_ids"][-cfg.max_length:]
        ids, labels = _truncate(ids, labels, cfg, row)
        examples.append(Example(ids, labels, list(prompt_ids), *conversation_texts(msgs)))
    return examples


def conversation_texts(messages: list[dict]) -> tuple[str, str]:
    """(prompt, reference) a person reads for a conversation: the last user turn before the last
    assistant turn, and that assistant turn."""
    last_assistant = max(j for j, m in enumerate(messages) if m["role"] == "assistant")
    user_turns = [m["content"] for m in messages[:last_assistant] if m["role"] == "user"]
    return (user_turns[-1] if user_turns else ""), messages[last_assistant]["content"]


# ----------------------------------------------------------------------------- the tokenized data set
def _columns(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """Required and optional columns of a row."""
    if cfg.multiturn.enable:
        return [cfg.multiturn.messages_key], [cfg.multiturn.tools_key, cfg.multiturn.enable_thinking_key]
    return list(dict.fromkeys([cfg.prompt_key, cfg.response_key])), []


def token_settings(cfg: DataConfig, max_rows: int) -> dict:
    """The settings that change an example's tokens: part of the token cache's key."""
    shared = {"max_length": cfg.max_length, "truncation": cfg.truncation, "max_rows": max_rows,
              "apply_chat_template_kwargs": cfg.apply_chat_template_kwargs}
    if cfg.multiturn.enable:
        return {**shared, "multiturn": asdict(cfg.multiturn)}
    return {**shared, "prompt_key": cfg.prompt_key, "response_key": cfg.response_key,
            "prompt_dict_keys": cfg.prompt_dict_keys, "response_dict_keys": cfg.response_dict_keys}


def tokenized_chunks(paths: Sequence[str], key: str, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, max_rows: int) -> Iterator[token_cache.Chunk]:
    """Read and tokenize the files a chunk of rows at a time; a bad row stops it at its chunk."""
    columns, optional = _columns(cfg)
    tokenize = tokenize_multi_turn if cfg.multiturn.enable else tokenize_single_turn
    done = 0
    for file_no, path in enumerate(paths):
        if 0 < max_rows <= done:
            break
        empty = True
        for rows in iter_row_chunks(path, columns, key, optional):
            empty = False
            if max_rows > 0:
                rows = rows[: max_rows - done]
            examples = tokenize(rows, tokenizer, cfg)
            yield token_cache.Chunk(
                [e.input_ids for e in examples],
                [[int(label != IGNORE) for label in e.labels] for e in examples],
                [e.prompt_ids for e in examples],
                [(file_no, r.locator) for r in rows],
            )
            done += len(rows)
            if 0 < max_rows <= done:
                break
        if empty:
            raise DataError(f"{path}: no rows ({key})")
    if done == 0:
        raise DataError(f"{key}: no examples")


class SourceTexts:
    """Reads an example's prompt and reference texts again from its source file, by byte offset
    (JSONL) or row number (parquet), for samples: nothing of the texts stays in memory."""

    def __init__(self, paths: Sequence[str], cfg: DataConfig):
        self.paths, self.cfg = list(paths), cfg
        self._row_group: tuple[Any, int, list[dict]] = (None, -1, [])  # (file, first row, rows): samples read neighbours

    def read(self, file_no: int, locator: int) -> tuple[str, str]:
        path = self.paths[file_no]
        columns, optional = _columns(self.cfg)
        if path.lower().endswith(".parquet"):
            row = Row(path, locator, self._parquet_row(path, locator, columns + optional), locator)
        else:
            with open(path, "rb") as handle:
                handle.seek(locator)
                row = _jsonl_row(handle.readline(), path, -1, locator, columns, optional)
        if self.cfg.multiturn.enable:
            messages = row.values[self.cfg.multiturn.messages_key]
            return conversation_texts([{"role": m["role"], "content": m["content"]} for m in messages])
        c = self.cfg
        return text_field(row, c.prompt_key, c.prompt_dict_keys), text_field(row, c.response_key, c.response_dict_keys)

    def _parquet_row(self, path: str, index: int, columns: list[str]) -> dict:
        cached_path, first, rows = self._row_group
        if cached_path != path or not first <= index < first + len(rows):
            parquet = pq.ParquetFile(path)
            first = 0
            for group in range(parquet.num_row_groups):
                size = parquet.metadata.row_group(group).num_rows
                if index < first + size:
                    names = [c for c in columns if c in parquet.schema_arrow.names]
                    self._row_group = (path, first, parquet.read_row_group(group, columns=names).to_pylist())
                    break
                first += size
            _, first, rows = self._row_group
        return rows[index - first]


class TokenizedDataset(token_cache.MappedRows):
    """The examples of a token-cache entry, built on demand from the memory-mapped arrays: it
    stands where a `list[Example]` stood, and `lengths` is the mapped int32 array, so batching
    never walks the examples."""

    item_name = "example"

    def __init__(self, arrays: token_cache.TokenArrays, texts: SourceTexts):
        super().__init__(arrays)
        self.texts = texts

    @property
    def lengths(self) -> np.ndarray:
        return self.arrays.lengths

    def _row(self, i: int) -> Example:
        ids, mask = self.arrays.tokens(i)
        file_no, locator = (int(v) for v in self.arrays.sources[i])
        return Example(
            ids.tolist(), np.where(mask, ids, IGNORE).tolist(), self.arrays.prompt(i).tolist(),
            read_texts=partial(self.texts.read, file_no, locator),
        )


def load_sft_examples(
    files: Any,
    key: str,
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    max_rows: int = -1,
    cache_dir: Optional[str] = None,
    ranks: token_cache.Ranks = token_cache.Ranks(),
) -> TokenizedDataset:
    """Every example of `files`, or the first `max_rows` rows over the files in order (verl's
    `train_max_samples` / `val_max_samples` without data.shuffle), through the token cache
    (`load_cached`)."""
    return load_cached(
        files, key, tokenizer, token_settings(cfg, max_rows),
        lambda paths, stats: tokenized_chunks(paths, key, tokenizer, cfg, max_rows),
        lambda arrays, paths: TokenizedDataset(arrays, SourceTexts(paths, cfg)),
        cache_dir, ranks,
    )


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


# ----------------------------------------------------------------------------- batching
@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, L] right-padded
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], IGNORE on prompt and padding
    examples: list[Example] = field(default_factory=list)

    @property
    def num_loss_tokens(self) -> int:
        return sum(e.num_loss_tokens for e in self.examples)

    @property
    def num_real_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def num_padded_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device) -> "MicroBatch":
        return MicroBatch(
            self.input_ids.to(device, non_blocking=True),
            self.attention_mask.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            self.examples,
        )


def collate(examples: Sequence[Example], pad_id: int, zero_loss: bool = False) -> MicroBatch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        if not zero_loss:
            labels[i, :n] = torch.tensor(e.labels)
    return MicroBatch(ids, mask, labels, [] if zero_loss else list(examples))


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_examples))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=g).tolist()


MEGABATCH_FACTOR = 50  # as HF Trainer's LengthGroupedSampler


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[int]:
    """A shuffled order in which each run of `batch_size` holds examples of similar length.

    The data are shuffled, cut into mega-batches of 50 batches, each sorted by length and cut
    into batches; then the batches are shuffled. Every epoch differs, every run with the same
    seed is the same, and a global batch is almost free of padding.
    """
    order = np.asarray(epoch_order(len(lengths), seed, epoch, True), dtype=np.int64)
    lengths = np.asarray(lengths)
    mega = batch_size * MEGABATCH_FACTOR
    batches = []
    for start in range(0, len(order), mega):
        chunk = order[start : start + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")].tolist()  # longest first, ties in shuffled order
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7)
    return [i for k in torch.randperm(len(full), generator=g).tolist() for i in full[k]]


def balanced_shares(batch: Sequence[int], lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Split a global batch over ranks with equal counts and near-equal token sums.

    Longest first, each to the rank with the fewest tokens that still has room: every rank
    then spends about the same time per step, whatever the length skew.
    """
    per_rank = len(batch) // world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    tokens = [0] * world_size
    for i in sorted(batch, key=lambda i: (-lengths[i], i)):
        open_ranks = [r for r in range(world_size) if len(shares[r]) < per_rank]
        r = min(open_ranks, key=lambda r: (tokens[r], r))
        shares[r].append(i)
        tokens[r] += lengths[i]
    return shares


def token_budget_groups(indices: Sequence[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Length-sorted micro-batches whose padded size (longest × count) stays within `budget`."""
    groups: list[list[int]] = []
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        if groups and lengths[groups[-1][0]] * (len(groups[-1]) + 1) <= budget:
            groups[-1].append(i)  # sorted longest first: the group's first member is its longest
        else:
            groups.append([i])
    return groups


def split_to_count(groups: list[list[int]], count: int) -> list[list[int]]:
    """Split the largest groups until there are `count` (every rank runs as many forwards)."""
    groups = [list(g) for g in groups]
    while len(groups) < count:
        k = max(range(len(groups)), key=lambda k: (len(groups[k]), -k))
        if len(groups[k]) < 2:
            break
        g = groups.pop(k)
        groups[k:k] = [g[: len(g) // 2], g[len(g) // 2 :]]
    return groups


class SFTBatches:
    """The global batches of an epoch, and one rank's micro-batches of each.

    A global batch is `train_batch_size` examples (the last incomplete one is dropped). It is
    split over ranks balanced by tokens, then into micro-batches: `micro_batch_size_per_gpu`
    sequences of similar length, or, with `use_dynamic_bsz` (the default), as many as fit the
    token budget: fewer, fuller forwards (scripts/bench_sft.py measures the gain). Every rank
    computes every rank's plan (no communication) and all run the same number of forwards.
    Batches are a pure function of (seed, epoch, index), so resuming at any batch needs no
    iteration over the data. The loss is normalised by the global count of
    target tokens, so none of this changes what is learned.

    Why not packing (several sequences in one row, positions restarting per sequence): without
    flash-attention's varlen kernels (CPU, and SDPA on GPU) the attention inside a packed row
    needs a block-diagonal mask, and SDPA then computes the whole row's attention and masks most
    of it away. Measured on the benchmark's data and model (scripts/bench_sft.py, full size;
    transformers builds the block mask from the position ids), one packed row per step ran at
    ~2,000 real tokens/s against ~6,000 for these length-grouped micro-batches, with the same
    loss to 1e-7; and with length grouping the padding left to remove is ~3%. Packing is used
    where a varlen kernel makes it pay: `model.use_remove_padding` with flash-attention
    (workers/packing.py).
    """

    def __init__(self, examples: Sequence[Example], cfg: DataConfig, seed: int, rank: int, world_size: int, pad_id: int):
        self.examples = examples
        # A TokenizedDataset's lengths are its mapped int32 array: no walk over the examples.
        lengths = getattr(examples, "lengths", None)
        self.lengths = lengths if lengths is not None else np.array([len(e.input_ids) for e in examples], dtype=np.int32)
        self.cfg = cfg
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pad_id = pad_id
        self.steps_per_epoch = len(examples) // cfg.train_batch_size
        self._order: tuple[int, list[int]] = (-1, [])
        if self.steps_per_epoch == 0:
            raise DataError(
                f"data.train_batch_size={cfg.train_batch_size} is larger than the training set ({len(examples)} examples)"
            )

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order[0] != epoch:
            if self.cfg.group_by_length and self.cfg.shuffle:
                order = length_grouped_order(self.lengths, self.cfg.train_batch_size, self.seed, epoch)
            else:
                order = epoch_order(len(self.examples), self.seed, epoch, self.cfg.shuffle)
            self._order = (epoch, order)
        return self._order[1]

    def global_batch(self, epoch: int, index: int) -> list[int]:
        size = self.cfg.train_batch_size
        return self._epoch_order(epoch)[index * size : (index + 1) * size]

    def rank_share(self, batch: list[int]) -> list[int]:
        return balanced_shares(batch, self.lengths, self.world_size)[self.rank]

    def plan(self, epoch: int, index: int) -> list[list[int]]:
        """This rank's micro-batches of step `index` of `epoch`, as example indices."""
        shares = balanced_shares(self.global_batch(epoch, index), self.lengths, self.world_size)
        budget = self.cfg.token_budget()
        if budget is None:
            size = self.cfg.micro_batch_size_per_gpu
            mine = sorted(shares[self.rank], key=lambda i: (-self.lengths[i], i))
            return [mine[i : i + size] for i in range(0, len(mine), size)]
        per_rank = [token_budget_groups(share, self.lengths, budget) for share in shares]
        count = max(len(groups) for groups in per_rank)
        return split_to_count(per_rank[self.rank], count)

    def micro_batches(self, epoch: int, index: int) -> list[MicroBatch]:
        return [collate([self.examples[i] for i in group], self.pad_id) for group in self.plan(epoch, index)]


def validation_micro_batches(examples: list[Example], micro_batch_size: int, rank: int, world_size: int, pad_id: int) -> list[MicroBatch]:
    """This rank's share of the validation set, padded with zero-loss batches so that every rank
    runs the same number of forwards (each is a collective under FSDP)."""
    mine = examples[rank::world_size]
    per_rank_max = math.ceil(len(examples) / world_size)
    count = math.ceil(per_rank_max / micro_batch_size)
    batches = [collate(mine[i : i + micro_batch_size], pad_id) for i in range(0, len(mine), micro_batch_size)]
    while len(batches) < count:
        batches.append(collate(examples[:1], pad_id, zero_loss=True))
    return batches
