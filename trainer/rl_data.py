"""RL prompts: verl's RL layout (a `prompt` column of chat messages, `reward_model.ground_truth`,
`data_source`) or plain text columns chosen with `data.prompt_key` / `data.answer_key`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers import PreTrainedTokenizerBase

from config.rl_schema import RLDataConfig
from trainer.data import DataError, Row, as_file_list, dig, epoch_order, read_rows

log = logging.getLogger(__name__)


@dataclass
class RLPrompt:
    prompt_ids: list[int]  # templated model input, ends with the assistant prefix
    text: str  # what a person reads as the prompt (the last user message)
    ground_truth: Optional[str]


def _split_key(key: str) -> tuple[str, list[str]]:
    column, *path = key.split(".")
    return column, path


def _messages(row: Row, column: str) -> list[dict]:
    value = row.values[column]
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"{row.file}: row {row.index}: column {column!r} must be text or a list of {{role, content}} messages")


def encode_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict], template_kwargs: Optional[dict] = None) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **(template_kwargs or {}))
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer("\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"]


def load_rl_prompts(files: Any, key: str, tokenizer: PreTrainedTokenizerBase, cfg: RLDataConfig) -> list[RLPrompt]:
    answer_column, answer_path = _split_key(cfg.answer_key)
    prompts: list[RLPrompt] = []
    too_long = 0
    for path in as_file_list(files, key):
        rows = read_rows(path, list(dict.fromkeys([cfg.prompt_key, answer_column])), key)
        if not rows:
            raise DataError(f"{path}: no rows ({key})")
        for row in rows:
            messages = _messages(row, cfg.prompt_key)
            answer = dig(row, answer_column, answer_path)
            if answer is not None and not isinstance(answer, (str, int, float)):
                raise DataError(f"{row.file}: row {row.index}: column {cfg.answer_key!r} is {type(answer).__name__}, expected text")
            ids = encode_messages(tokenizer, messages, cfg.apply_chat_template_kwargs)
            if len(ids) > cfg.max_prompt_length:
                if cfg.filter_overlong_prompts:  # verl's filter: the prompt is left out
                    too_long += 1
                    continue
                if cfg.truncation == "error":
                    raise DataError(f"{row.file}: row {row.index}: prompt has {len(ids)} tokens, more than "
                                    f"data.max_prompt_length={cfg.max_prompt_length}")
                ids = ids[-cfg.max_prompt_length:] if cfg.truncation == "left" else ids[: cfg.max_prompt_length]
            user = [m["content"] for m in messages if m["role"] == "user"]
            prompts.append(RLPrompt(ids, user[-1] if user else messages[-1]["content"], None if answer is None else str(answer)))
    if too_long:
        log.info("%s: %d prompt(s) longer than data.max_prompt_length=%d left out (data.filter_overlong_prompts)",
                 key, too_long, cfg.max_prompt_length)
    if not prompts:
        raise DataError(f"{key}: no prompts" + (" left after data.filter_overlong_prompts" if too_long else ""))
    return prompts


class PromptBatches:
    """Each step's prompts: `prompts_per_step` over all ranks, a contiguous share per rank.

    A pure function of (seed, epoch, index), so resume needs no iteration over the data.
    """

    def __init__(self, prompts: list[RLPrompt], prompts_per_step: int, seed: int, shuffle: bool, rank: int, world_size: int):
        self.prompts = prompts
        self.prompts_per_step = prompts_per_step
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.steps_per_epoch = len(prompts) // prompts_per_step
        if self.steps_per_epoch == 0:
            raise DataError(f"data.prompts_per_step={prompts_per_step} is larger than the training set ({len(prompts)} prompts)")

    def rank_prompts(self, epoch: int, index: int) -> tuple[list[int], list[RLPrompt]]:
        """(global indices, prompts) of this rank's share of step `index` of `epoch`."""
        order = epoch_order(len(self.prompts), self.seed, epoch, self.shuffle)
        step = order[index * self.prompts_per_step : (index + 1) * self.prompts_per_step]
        per_rank = self.prompts_per_step // self.world_size
        mine = step[self.rank * per_rank : (self.rank + 1) * per_rank]
        return mine, [self.prompts[i] for i in mine]


def rollout_seed(seed: int, step: int, prompt_index: int, response: int) -> int:
    """Each response's own sampling seed: rollouts replay exactly on resume, on any rank."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_000_033 + prompt_index) * 131 + response)
    return int(torch.randint(0, 2**31 - 1, (1,), generator=g))
