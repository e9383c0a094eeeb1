"""SFT examples: rows tokenized with the loss on response tokens only (single-turn prompt/response
columns, or multi-turn conversations through the chat template), through the token cache.

Files are read as a stream and tokenized a chunk of rows at a time into the token cache
(trainer/token_cache.py: written once, memory-mapped by every rank), so a bad row (missing
column, wrong type, too long with `truncation=error`) stops the run at its chunk, naming file,
row and column, before any model is built; and lengths are known for token-balanced batching
without holding the examples in memory. An example's texts are read again from its source file
only when a sample needs them (`SourceTexts`).

Loss convention: `labels[i]` is the token id when token i is a training target and -100
otherwise; the model's logits at i-1 predict token i.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from functools import partial
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase

from config.schema import DataConfig
from trainer import token_cache
from trainer.data.cached import load_cached
from trainer.data.rows import DataError, Row, _jsonl_row, iter_row_chunks, text_field

IGNORE = -100


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


def _checked_messages(row: Row, column: str) -> list[dict]:
    messages = row.values[column]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{row.file}: row {row.index}: column {column!r} must be a non-empty list of messages")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{row.file}: row {row.index}: column {column!r} message {j} needs text 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def row_messages(row: Row, cfg: DataConfig) -> tuple[list[dict], int]:
    """A row's conversation and the index of its first message that may be trained on: 0, or
    with `multiturn.completion_key` (TRL's conversational prompt-completion) the completion's first."""
    m = cfg.multiturn
    msgs = _checked_messages(row, m.messages_key)
    if not m.completion_key:
        trained_from, learn_from = 0, m.messages_key
    else:
        trained_from, learn_from = len(msgs), m.completion_key
        msgs += _checked_messages(row, m.completion_key)
    if not any(msg["role"] == "assistant" for msg in msgs[trained_from:]):
        raise DataError(f"{row.file}: row {row.index}: column {learn_from!r} has no assistant message to learn from")
    return msgs, trained_from


def tokenize_multi_turn(rows: list[Row], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> list[Example]:
    """Loss on every assistant turn's tokens (content and end-of-turn), none elsewhere; with
    `multiturn.completion_key`, on the completion's assistant turns only.

    Each message's span is the text its rendering adds to the rendering of the messages before
    it, so the template must render conversations prefix by prefix (all common templates do).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data.multiturn.enable=true needs a tokenizer with a chat_template")
    examples = []
    for row in rows:
        msgs, trained_from = row_messages(row, cfg)
        template_kwargs = _template_kwargs(row, cfg)
        ids: list[int] = []
        labels: list[int] = []
        rendered = ""
        last_assistant = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")
        prompt_text_so_far = ""
        for j, m in enumerate(msgs):
            pieces: list[tuple[str, bool]] = []
            if m["role"] == "assistant" and j >= trained_from:
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
    m = cfg.multiturn
    if m.enable:
        return [m.messages_key, *([m.completion_key] if m.completion_key else [])], [m.tools_key, m.enable_thinking_key]
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
            return conversation_texts(row_messages(row, self.cfg)[0])
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
