"""The one sample generator: batched, left-padded `generate` with the KV cache.

Used by SFT validation samples and RL sample logging (and RL rollouts). Each row can carry its
own sampling seed, so two generations for the same prompt differ only when the model changed,
whatever else is in the batch and whatever the global RNG did.

The sampling is exactly `GenerationSettings`, on every rank and for every model object: nothing
comes from the model's `generation_config` (a hub model's generation_config.json may ask for a
repetition penalty, n-gram blocking or its own temperature). Generation stops at any of the stop
ids the caller passes (`workers.model.load_stop_ids`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from workers.model import cache_arguments, cache_keyword, output_cache


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 100
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0

    def describe(self) -> str:
        if not self.do_sample:
            return f"greedy, max_new_tokens={self.max_new_tokens}"
        return (
            f"sampling, temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}, "
            f"max_new_tokens={self.max_new_tokens}"
        )


@dataclass
class Generated:
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens, up to and including the stop id when one came
    text: str
    stopped_at_eos: bool

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class SeededSampler(LogitsProcessor):
    """Samples each row with its own generator and returns a one-hot score row.

    `generate` then runs in greedy mode and picks exactly the sampled token, which keeps the
    library's batching, caching and stopping while making every row reproducible on its own.

    Vectorised, with the samples of `torch.multinomial(probs[i], 1, generator=g_i)` row by row:
    for one sample, multinomial draws q ~ Exp(1) over the vocabulary from the row's generator
    and takes argmax(p / q) (ATen's `multinomial`, the exponential form of the Gumbel-max trick).
    Here each row's exponentials for a block of token steps come in one draw from its generator
    (the same stream, checked bit for bit in tests/unit/test_generation.py), and each token step
    is one `argmax` over the whole batch instead of one `multinomial` launch per row.
    """

    # Noise elements held at once (B x steps x vocabulary): bounds the block of steps drawn ahead.
    NOISE_BUDGET_ELEMENTS = 1 << 24

    def __init__(self, seeds: Sequence[int], device: torch.device, max_steps: int = 1):
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.device = device
        self.max_steps = max(1, max_steps)
        self.noise: Optional[torch.Tensor] = None  # [B, block steps, V]
        self.used = 0

    def _draw(self, vocab: int) -> None:
        block = max(1, min(self.max_steps, self.NOISE_BUDGET_ELEMENTS // max(1, len(self.generators) * vocab)))
        noise = torch.empty((len(self.generators), block, vocab), dtype=torch.float32, device=self.device)
        for row, g in zip(noise, self.generators):
            row.exponential_(generator=g)
        self.noise, self.used = noise, 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1)
        if self.noise is None or self.used == self.noise.shape[1]:
            self._draw(scores.shape[-1])
        picks = (probs / self.noise[:, self.used]).argmax(dim=-1, keepdim=True)
        self.used += 1
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picks, 0.0)


def _processors(settings: GenerationSettings, seeds: Sequence[int], device: torch.device) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if not settings.do_sample:
        return processors
    if settings.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k > 0:
        processors.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        processors.append(TopPLogitsWarper(settings.top_p))
    processors.append(SeededSampler(seeds, device, settings.max_new_tokens))
    return processors


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


@contextmanager
def _only_this_config(model: torch.nn.Module, config: GenerationConfig) -> Iterator[None]:
    """Within the block, the model's own generation config is `config`.

    transformers fills every field the config passed to `generate` leaves unset from
    `model.generation_config` (`_prepare_generation_config`, checked on 5.24). That is the hub
    file's content on a model loaded with `from_pretrained` (rank 0) and nearly nothing on one
    built from its config (the other ranks, rank 0's copy), so rollouts would sample differently
    on different ranks. With `config` in both places, unset fields get the library's neutral
    defaults (repetition penalty 1, no n-gram blocking, no minimum length) on every rank.
    """
    own = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = own


def _first_stop(row: Sequence[int], stop_ids: Sequence[int]) -> Optional[int]:
    return next((i for i, token in enumerate(row) if token in stop_ids), None)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    settings: GenerationSettings,
    seeds: Optional[Sequence[int]] = None,
    synced_gpus: bool = False,
    stop_ids: Optional[Sequence[int]] = None,
    micro_batch_size: Optional[int] = None,
) -> list[Generated]:
    """Batched `generate` calls over the prompts (token ids, already templated).

    `stop_ids`: every token that ends a generation (default: the tokenizer's EOS).
    `micro_batch_size`: prompts per `generate` call (None: all in one). The KV cache grows with
    the rows of a call, so this bounds the rollout's memory; each row samples from its own seed,
    so the samples do not depend on it. With `synced_gpus` every rank must make the same number
    of calls (the same number of prompts and the same micro-batch size).
    """
    if not prompt_ids:
        return []
    seeds = list(seeds) if seeds is not None else list(range(len(prompt_ids)))
    stop_ids = list(stop_ids) if stop_ids else [tokenizer.eos_token_id]
    size = micro_batch_size or len(prompt_ids)
    was_training = model.training
    model.eval()
    try:
        return [g for i in range(0, len(prompt_ids), size)
                for g in _generate_batch(model, tokenizer, prompt_ids[i : i + size], settings, seeds[i : i + size],
                                         synced_gpus, stop_ids)]
    finally:
        model.train(was_training)


def _generate_batch(model, tokenizer, prompt_ids, settings: GenerationSettings, seeds, synced_gpus: bool,
                    stop_ids: list[int]) -> list[Generated]:
    """One `generate` call for a batch of prompts."""
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompt_ids, tokenizer.pad_token_id, device)
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=False,  # sampling happens in SeededSampler, row by row
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_ids,
        use_cache=True,
    )
    cache = None if synced_gpus else _shared_prompt_cache(model, prompt_ids, tokenizer.pad_token_id, device)
    extra = {} if cache is None else {k: v for k, v in cache_arguments(model, cache).items() if k != "use_cache"}
    with _only_this_config(model, config):
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=_processors(settings, seeds, device),
            synced_gpus=synced_gpus,
            **extra,
        )
    new_tokens = out[:, input_ids.shape[1]:].tolist()
    return [as_generated(prompt, row, stop_ids, tokenizer) for prompt, row in zip(prompt_ids, new_tokens)]


def as_generated(prompt: Sequence[int], row: Sequence[int], stop_ids: Sequence[int],
                 tokenizer: PreTrainedTokenizerBase) -> Generated:
    """A generated row (padding after the stop allowed) as `Generated`; every rollout engine's output."""
    stop = _first_stop(row, stop_ids)
    tokens = list(row if stop is None else row[: stop + 1])
    # A chat model's stop id need not be a special token: keep it out of the text either way.
    text = tokenizer.decode(tokens if stop is None else tokens[:-1], skip_special_tokens=True)
    return Generated(list(prompt), tokens, text, stop is not None)


def _shared_prompt_cache(model, prompt_ids, pad_id: int, device: torch.device):
    """The KV cache of every row's prompt but its last token, each distinct prompt computed once
    (None when no prompt repeats, one is too short to split, or the model takes no cache).

    A GRPO rollout asks for n responses to each prompt; `generate` alone would run each prompt n
    times in the prefill. `generate` continues from a cache that covers all but the last input
    token (transformers' prefix-caching recipe), so it runs only that token per row, then decodes
    as usual. Not with `synced_gpus`: there every rank must run the same forwards.
    """
    distinct: dict[tuple[int, ...], int] = {}
    rows = [distinct.setdefault(tuple(p), len(distinct)) for p in prompt_ids]
    if len(distinct) == len(prompt_ids) or min(len(p) for p in prompt_ids) < 2 or cache_keyword(model) is None:
        return None
    ids, mask = left_pad(list(distinct), pad_id, device)  # the batch's width: every prompt ends in the last column
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position_ids[:, :-1],
                **cache_arguments(model))
    cache = output_cache(out)
    cache.reorder_cache(torch.tensor(rows, device=device))
    return cache


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """User prompts as model input: through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
