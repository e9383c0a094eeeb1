"""RL prompts: verl's RL layout (a `prompt` column of chat messages, `reward_model.ground_truth`,
`data_source`), plain text columns chosen with `data.prompt_key` / `data.answer_key`, or
preference data as TRL reads it (`PREFERENCE_COLUMNS`):
- explicit prompt: `prompt`, `chosen`, `rejected` columns; the prompt is read as above;
- implicit prompt: only `chosen` and `rejected`, each a whole conversation, as text in
  Anthropic hh-rlhf's layout (`\\n\\nHuman: ...\\n\\nAssistant: ...`) or as a list of
  {role, content} messages; the prompt is the conversation up to its last assistant turn.
hh-rlhf's text turns become chat messages (Human: user, Assistant: assistant), so the policy's
chat template applies. A preference file needs no answer column (its ground truth is None):
such prompts are scored by a reward model (`reward.model`) or reward functions that need none.

Prompts go through the token cache as SFT data does (`trainer.token_cache`): read as a stream,
tokenized once per (files' content, tokenizer, settings) by one rank per node, memory-mapped by
every rank. Each prompt's text, answer and conversation (what the rewards read) are stored beside its tokens,
so a step's prompts come from the mapped arrays, not from the source files.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from config.rl_schema import RLDataConfig
from trainer import token_cache
from trainer.data.batching import epoch_order
from trainer.data.cached import load_cached
from trainer.data.rows import DataError, Row, dig, file_columns, iter_row_chunks

log = logging.getLogger(__name__)


PREFERENCE_COLUMNS = ("chosen", "rejected")  # TRL's preference format (implicit prompt without `prompt`)
# hh-rlhf's turns: "\n\nHuman: ..." and "\n\nAssistant: ..." (the first may start the text).
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class RLPrompt:
    prompt_ids: list[int]  # templated model input, ends with the assistant prefix
    text: str  # what a person reads as the prompt (the last user message)
    ground_truth: Optional[str]
    messages: Optional[list[dict]] = None  # the whole prompt conversation (what a reward model reads); None: [user: text]

    @property
    def conversation(self) -> list[dict]:
        return self.messages or [{"role": "user", "content": self.text}]


def _split_key(key: str) -> tuple[str, list[str]]:
    column, *path = key.split(".")
    return column, path


def hh_turns(text: str) -> Optional[list[dict]]:
    """The chat messages of a text in hh-rlhf's layout (None when it has no `Human:` turn)."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or "Human" not in parts[1::2]:
        return None
    # parts: [text before the first turn, role, content, role, content, ...]
    return [{"role": _HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _messages(row: Row, column: str) -> list[dict]:
    value = row.values[column]
    if isinstance(value, str):
        # A text prompt in hh-rlhf's layout ends with an empty "Assistant:" turn: the generation's place.
        turns = hh_turns(value)
        if turns is not None:
            return turns[:-1] if turns[-1]["role"] == "assistant" and not turns[-1]["content"] else turns
        return [{"role": "user", "content": value}]
    if _is_messages(value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"{row.file}: row {row.index}: column {column!r} must be text or a list of {{role, content}} messages")


def implicit_prompt(row: Row, column: str = "chosen") -> list[dict]:
    """TRL's implicit prompt: the conversation in `column` up to its last assistant turn."""
    value = row.values[column]
    turns = hh_turns(value) if isinstance(value, str) else (
        [{"role": m["role"], "content": m["content"]} for m in value] if _is_messages(value) else None)
    if turns is None:
        raise DataError(f"{row.file}: row {row.index}: column {column!r} must be a conversation: text with "
                        "'\\n\\nHuman:' / '\\n\\nAssistant:' turns (hh-rlhf) or a list of {role, content} messages")
    last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=None)
    if last is None or last == 0:
        raise DataError(f"{row.file}: row {row.index}: column {column!r} has no assistant turn after a prompt "
                        "(the prompt is the conversation up to the last assistant turn)")
    return turns[:last]


def encode_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict], template_kwargs: Optional[dict] = None) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **(template_kwargs or {}))
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer("\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"]


def _settings(cfg: RLDataConfig) -> dict:
    """The settings that change a prompt's tokens or whether it is kept: part of the cache key."""
    return {"kind": "rl_prompts", "record": "text,answer,messages", "prompt_key": cfg.prompt_key, "answer_key": cfg.answer_key,
            "max_prompt_length": cfg.max_prompt_length, "truncation": cfg.truncation,
            "filter_overlong_prompts": cfg.filter_overlong_prompts, "apply_chat_template_kwargs": cfg.apply_chat_template_kwargs}


def _prompt(row: Row, tokenizer: PreTrainedTokenizerBase, cfg: RLDataConfig) -> Optional[RLPrompt]:
    """The row's prompt, or None when data.filter_overlong_prompts leaves it out. A preference row
    without a prompt column takes its prompt from `chosen`; without the answer column its ground
    truth is None (a preference file needs none)."""
    answer_column, answer_path = _split_key(cfg.answer_key)
    messages = _messages(row, cfg.prompt_key) if cfg.prompt_key in row.values else implicit_prompt(row)
    answer = dig(row, answer_column, answer_path) if answer_column in row.values else None
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise DataError(f"{row.file}: row {row.index}: column {cfg.answer_key!r} is {type(answer).__name__}, expected text")
    ids = encode_messages(tokenizer, messages, cfg.apply_chat_template_kwargs)
    if len(ids) > cfg.max_prompt_length:
        if cfg.filter_overlong_prompts:  # verl's filter: the prompt is left out
            return None
        if cfg.truncation == "error":
            raise DataError(f"{row.file}: row {row.index}: prompt has {len(ids)} tokens, more than "
                            f"data.max_prompt_length={cfg.max_prompt_length}")
        ids = ids[-cfg.max_prompt_length:] if cfg.truncation == "left" else ids[: cfg.max_prompt_length]
    user = [m["content"] for m in messages if m["role"] == "user"]
    return RLPrompt(ids, user[-1] if user else messages[-1]["content"], None if answer is None else str(answer), messages)


def _file_columns(path: str, key: str, cfg: RLDataConfig) -> tuple[list[str], list[str]]:
    """(required, optional) columns of one file, by its layout: prompt (and answer) columns, or
    TRL's preference columns; neither: one line naming the file, its columns and those expected."""
    found = file_columns(path, key)
    answer = _split_key(cfg.answer_key)[0]
    preference = all(c in found for c in PREFERENCE_COLUMNS)
    if cfg.prompt_key in found:
        return ([cfg.prompt_key], [answer]) if preference else ([cfg.prompt_key, answer], [])
    if preference:
        return ["chosen"], [answer]
    raise DataError(f"{path}: neither a prompt column ({cfg.prompt_key!r}, data.prompt_key) nor preference columns "
                    f"({', '.join(map(repr, PREFERENCE_COLUMNS))}) found (columns: {', '.join(found) or 'none'})")


def _chunks(paths: list[str], key: str, tokenizer: PreTrainedTokenizerBase, cfg: RLDataConfig, stats: dict) -> Iterator[token_cache.Chunk]:
    """Read and tokenize the files a chunk of rows at a time; a bad row stops it at its chunk.
    `stats["left_out"]` counts the prompts data.filter_overlong_prompts left out."""
    kept = stats["left_out"] = 0
    for file_no, path in enumerate(paths):
        empty = True
        columns, optional = _file_columns(path, key, cfg)
        for rows in iter_row_chunks(path, list(dict.fromkeys(columns)), key, optional):
            empty = False
            pairs = [(row, _prompt(row, tokenizer, cfg)) for row in rows]
            pairs = [(row, p) for row, p in pairs if p is not None]
            stats["left_out"] += len(rows) - len(pairs)
            kept += len(pairs)
            yield token_cache.Chunk(
                [[] for _ in pairs], [[] for _ in pairs], [p.prompt_ids for _, p in pairs],
                [(file_no, row.locator) for row, _ in pairs],
                [json.dumps([p.text, p.ground_truth, p.messages]).encode() for _, p in pairs],
            )
        if empty:
            raise DataError(f"{path}: no rows ({key})")
    if not kept:
        raise DataError(f"{key}: no prompts" + (" left after data.filter_overlong_prompts" if stats["left_out"] else ""))


class PromptSet(token_cache.MappedRows):
    """The prompts of a token-cache entry, built on demand from the memory-mapped arrays: it
    stands where a `list[RLPrompt]` stood."""

    item_name = "prompt"

    def _row(self, i: int) -> RLPrompt:
        text, answer, messages = json.loads(self.arrays.record(i))
        return RLPrompt(self.arrays.prompt(i).tolist(), text, answer, messages)


def load_rl_prompts(files: Any, key: str, tokenizer: PreTrainedTokenizerBase, cfg: RLDataConfig,
                    cache_dir: Optional[str] = None, ranks: token_cache.Ranks = token_cache.Ranks()) -> PromptSet:
    """Every prompt of `files`, through the token cache (`trainer.data.cached.load_cached`)."""
    prompts = load_cached(files, key, tokenizer, _settings(cfg),
                          lambda paths, stats: _chunks(paths, key, tokenizer, cfg, stats),
                          lambda arrays, paths: PromptSet(arrays), cache_dir, ranks)
    left_out = prompts.arrays.meta["stats"].get("left_out", 0)
    if left_out and ranks.rank == 0:
        log.info("%s: %d prompt(s) longer than data.max_prompt_length=%d left out (data.filter_overlong_prompts)",
                 key, left_out, cfg.max_prompt_length)
    return prompts


class PromptBatches:
    """Each step's prompts: `prompts_per_step` over all ranks, a contiguous share per rank.

    A pure function of (seed, epoch, index), so resume needs no iteration over the data.
    """

    def __init__(self, prompts: Sequence[RLPrompt], prompts_per_step: int, seed: int, shuffle: bool, rank: int, world_size: int):
        self.prompts = prompts
        self.prompts_per_step = prompts_per_step
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.steps_per_epoch = len(prompts) // prompts_per_step
        self._epoch_order: tuple[Optional[tuple[int, int]], list[int]] = (None, [])
        if self.steps_per_epoch == 0:
            raise DataError(f"data.prompts_per_step={prompts_per_step} is larger than the training set ({len(prompts)} prompts)")

    def rank_prompts(self, epoch: int, index: int) -> tuple[list[int], list[RLPrompt]]:
        """(global indices, prompts) of this rank's share of step `index` of `epoch`."""
        order = self._order(epoch)
        step = order[index * self.prompts_per_step : (index + 1) * self.prompts_per_step]
        per_rank = self.prompts_per_step // self.world_size
        mine = step[self.rank * per_rank : (self.rank + 1) * per_rank]
        return mine, [self.prompts[i] for i in mine]

    def _order(self, epoch: int) -> list[int]:
        """The epoch's permutation of every prompt, computed once per epoch, not per step."""
        if self._epoch_order[0] != (self.seed, epoch):  # the seed moves when a rollback reshuffles
            self._epoch_order = ((self.seed, epoch), epoch_order(len(self.prompts), self.seed, epoch, self.shuffle))
        return self._epoch_order[1]


def rollout_seed(seed: int, step: int, prompt_index: int, response: int) -> int:
    """Each response's own sampling seed: rollouts replay exactly on resume, on any rank."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_000_033 + prompt_index) * 131 + response)
    return int(torch.randint(0, 2**31 - 1, (1,), generator=g))
