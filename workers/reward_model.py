"""A sequence-classification reward model on the FSDP2 workers: verl's `reward_model` (its
RewardModelWorker in verl/workers/fsdp_workers.py). Loaded on rank 0 and sharded over every rank
like the reference policy (`build_sharded_model` with `AutoModelForSequenceClassification`),
frozen; one score per (prompt conversation, response).

The reward model's tokenizer may differ from the policy's, so scoring starts from text: the
response as decoded, appended to the prompt's conversation as an assistant turn, rendered with
the reward model's own chat template and tokenized with its own tokenizer (verl's
`_switch_chat_template` does the same). A tokenizer without a chat template gets the
conversation in hh-rlhf's text layout (`\\n\\nHuman: ...\\n\\nAssistant: ...`), the layout of the
preference data such reward models were trained on.

`score` is a collective: every forward of a sharded model all-gathers its layers. Every rank
calls it at the same point with its own pairs; their counts may differ (validation shares), so
each rank runs as many micro-batch forwards as the rank with the most, spare ones on a one-token
input.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.distributed as dist
from transformers import AutoModelForSequenceClassification, PretrainedConfig

from config.schema import ConfigError
from workers.fsdp import ShardingSpec, build_sharded_model
from workers.model import load_config, load_tokenizer

log = logging.getLogger(__name__)

KEY = "reward.model.path"
_HH_NAMES = {"user": "Human", "assistant": "Assistant"}


def check_reward_model(path: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """Its config, read before any model is built: one output (num_labels=1), or one line."""
    config = load_config(path, trust_remote_code, key=KEY)
    if config.num_labels != 1:
        arch = (config.architectures or [type(config).__name__])[0]
        raise ConfigError(f"{KEY}={path}: {arch} has {config.num_labels} outputs; a reward model is an "
                          "AutoModelForSequenceClassification with one (num_labels=1)")
    return config


def hh_text(messages: Sequence[dict]) -> str:
    """A conversation in hh-rlhf's text layout (other roles, e.g. system, lead as plain text)."""
    return "".join(f"\n\n{_HH_NAMES[m['role']]}: {m['content']}" if m["role"] in _HH_NAMES else m["content"] for m in messages)


class ScoringFailed(Exception):
    """Raised alike on every rank, before any collective forward: a caller may warn and go on."""


class RewardModel:
    """The sharded reward model and its own tokenizer. Collective: built and used on every rank."""

    def __init__(self, path: str, spec: ShardingSpec, device: torch.device, world_size: int, micro_batch_size: int,
                 max_length: int | None = None, trust_remote_code: bool = False, attn_implementation: str = "sdpa"):
        config = check_reward_model(path, trust_remote_code)
        self.tokenizer = load_tokenizer(path, trust_remote_code, key=KEY)
        self.device, self.micro_batch_size, self.max_length = device, micro_batch_size, max_length
        # The classifier reads the last token that is not the pad id; batches are right-padded with
        # that id, so a padded sequence scores as it does alone. Without one (batch size 1 only in
        # transformers) the tokenizer's pad token is used, as TRL's RewardTrainer does.
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else self.tokenizer.pad_token_id
        self.model = build_sharded_model(path, config, spec, device, world_size, trust_remote_code, attn_implementation,
                                         auto_class=AutoModelForSequenceClassification, pad_token_id=self.pad_id)
        self.model.eval().requires_grad_(False)

    def encode(self, conversation: Sequence[dict], response: str) -> list[int]:
        """The reward model's tokens of the conversation followed by the response."""
        messages = [*conversation, {"role": "assistant", "content": response}]
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        else:
            ids = tok(hh_text(messages), add_special_tokens=True)["input_ids"]
        if self.max_length and len(ids) > self.max_length:
            ids = ids[-self.max_length:]  # keep the end: the score is read at the last token
        return list(ids) or [self.pad_id]

    @torch.no_grad()
    def score(self, conversations: Sequence[Sequence[dict]], responses: Sequence[str]) -> list[float]:
        """Collective. One score per (conversation, response) of this rank. Where a rank cannot
        encode its texts, every rank raises `ScoringFailed` before any forward; an error inside
        the forwards (collectives of the sharded model) is not caught: it ends the run."""
        try:
            ids, failure = [self.encode(c, r) for c, r in zip(conversations, responses)], ""
        except Exception as err:  # noqa: BLE001 - agreed below, raised on every rank alike
            ids, failure = [], f"{type(err).__name__}: {err}"
        batches = [ids[i : i + self.micro_batch_size] for i in range(0, len(ids), self.micro_batch_size)]
        # One all-reduce: the forward count every rank runs, and whether any rank could not encode.
        need = torch.tensor([len(batches), 1 if failure else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(need, op=dist.ReduceOp.MAX)
        count, failed = need.tolist()
        if failed:
            raise ScoringFailed(f"the reward model could not encode the texts of {'this' if failure else 'another'} rank"
                                + (f" ({failure})" if failure else ""))
        scores: list[float] = []
        for k in range(count):
            mine = k < len(batches)
            input_ids, mask = self._pad(batches[k] if mine else [[self.pad_id]])
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
            if mine:
                scores += logits[:, 0].float().cpu().tolist()
        return scores

    def _pad(self, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, s in enumerate(batch):
            input_ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return input_ids, mask
