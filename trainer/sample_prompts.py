"""The prompts of a sample event and how they are generated, for SFT validation and RL sample
logging alike: the trainer's default prompts or a prompts file (`samples.prompts_file`), k
sampled answers per prompt and optionally one greedy answer, generated in one batch per distinct
setting (not one `generate` per prompt).

A prompts file is JSONL, one prompt a line:

    {"prompt": "12+34=", "reference": "46", "id": "sum-1", "tags": ["math"], "max_new_tokens": 4, "do_sample": false}
    {"messages": [{"role": "user", "content": "Say hi"}], "temperature": 0.7}

Fields left out take the run's generation settings. It is read and checked before any model is
built (one line naming the file and row).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from trainer.data.rows import DataError
from trainer.run import Samples
from trainer.samples import SampleMeta, prompt_id, sample_seed
from workers.generation import GenerationSettings, encode_prompts, generate

# Per-prompt generation settings a prompts file may set, with their types.
SETTING_TYPES = {"max_new_tokens": int, "temperature": float, "top_p": float, "top_k": int, "do_sample": bool}
FIELDS = {"prompt", "messages", "reference", "id", "tags", *SETTING_TYPES}


@dataclass(frozen=True)
class SamplePrompt:
    text: str  # what the logs show
    prompt_ids: tuple[int, ...]  # model input (templated)
    reference: Optional[str] = None
    id: Optional[str] = None  # a stable id from the file; None: from the tokens
    tags: tuple[str, ...] = ()
    settings: dict = field(default_factory=dict)  # overrides of the run's generation settings

    @property
    def pid(self) -> str:
        return self.id if self.id is not None else prompt_id(self.prompt_ids)


@dataclass(frozen=True)
class SamplingPlan:
    """How many answers per prompt: k sampled (each its own seed) and maybe one greedy."""

    num_samples_per_prompt: int = 1
    also_greedy: bool = False


# ----------------------------------------------------------------------------- the prompts file
def read_prompts_file(path: str | Path) -> list[dict[str, Any]]:
    """Every row checked; a bad one is a DataError naming the file and the row (1-based line)."""
    path = Path(path)
    rows, ids = [], {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: row {line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with `prompt` or `messages`, got {type(row).__name__}")
        unknown = sorted(set(row) - FIELDS)
        if unknown:
            raise DataError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(FIELDS))})")
        if ("prompt" in row) == ("messages" in row):
            raise DataError(f"{where}: needs exactly one of `prompt` (text) or `messages` (chat)")
        if "prompt" in row and not (isinstance(row["prompt"], str) and row["prompt"].strip()):
            raise DataError(f"{where}: `prompt` must be non-empty text")
        if "messages" in row and not _is_chat(row["messages"]):
            raise DataError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
        if row.get("reference") is not None and not isinstance(row["reference"], str):
            raise DataError(f"{where}: `reference` must be text")
        if "tags" in row and not (isinstance(row["tags"], list) and all(isinstance(t, str) and t for t in row["tags"])):
            raise DataError(f"{where}: `tags` must be a list of non-empty strings")
        for key, kind in SETTING_TYPES.items():
            if key in row and not _has_type(row[key], kind):
                raise DataError(f"{where}: `{key}` must be {kind.__name__}, got {row[key]!r}")
        _check_setting_values(row, where)
        if "id" in row:
            row["id"] = str(row["id"])
            if row["id"] in ids:
                raise DataError(f"{where}: id {row['id']!r} repeats row {ids[row['id']]}")
            ids[row["id"]] = line_no
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no prompts (one JSON object per line)")
    return rows


def _is_chat(messages: Any) -> bool:
    return (isinstance(messages, list) and bool(messages)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages))


def _has_type(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_setting_values(row: dict, where: str) -> None:
    for key, ok, rule in (("max_new_tokens", lambda v: v > 0, "> 0"), ("temperature", lambda v: v > 0, "> 0"),
                          ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"), ("top_k", lambda v: v >= 0, ">= 0")):
        if key in row and not ok(row[key]):
            raise DataError(f"{where}: `{key}` must be {rule}, got {row[key]!r}")


def encode_file_prompts(rows: Sequence[dict], tokenizer: PreTrainedTokenizerBase) -> list[SamplePrompt]:
    """Text prompts go through the chat template as the run's own prompts do; chat rows as they are."""
    prompts = []
    for row in rows:
        if "messages" in row:
            text = "\n".join(f"{m['role']}: {m['content']}" for m in row["messages"])
            if getattr(tokenizer, "chat_template", None):
                ids = tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=False)
                ids = tokenizer(ids, add_special_tokens=False)["input_ids"]
            else:
                ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        else:
            text, ids = row["prompt"], encode_prompts(tokenizer, [row["prompt"]])[0]
        prompts.append(SamplePrompt(
            text, tuple(ids), row.get("reference"), row.get("id"), tuple(row.get("tags", ())),
            {k: SETTING_TYPES[k](row[k]) for k in SETTING_TYPES if k in row},
        ))
    return prompts


# ----------------------------------------------------------------------------- generation
def answer_seed(run_seed: int, pid: str, j: int) -> int:
    """Sample j's seed: sample 0 keeps the prompt's own seed (k=1 repeats earlier runs exactly)."""
    return sample_seed(run_seed, pid if j == 0 else f"{pid}#{j}")


def generate_samples(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[SamplePrompt],
    base: GenerationSettings,
    plan: SamplingPlan,
    run_seed: int,
    stop_ids: Optional[Sequence[int]] = None,
    micro_batch_size: Optional[int] = None,
    generate_fn: Optional[Callable[..., list]] = None,
) -> Samples:
    """Every answer of the event: per prompt k sampled (one greedy when the prompt does not
    sample) and maybe one greedy; one `generate_fn` call per distinct setting (and micro-batch)."""
    rows: list[tuple[SamplePrompt, GenerationSettings, SampleMeta, int]] = []
    for p in prompts:
        settings = replace(base, **p.settings)
        k = plan.num_samples_per_prompt if settings.do_sample else 1
        for j in range(k):
            rows.append((p, settings, SampleMeta(j, False, p.tags, p.pid, settings), answer_seed(run_seed, p.pid, j)))
        if plan.also_greedy and settings.do_sample:
            greedy = replace(settings, do_sample=False)
            rows.append((p, greedy, SampleMeta(0, True, p.tags, p.pid, greedy), answer_seed(run_seed, p.pid, 0)))
    by_settings: dict[GenerationSettings, list[int]] = {}
    for i, (_, settings, _, _) in enumerate(rows):
        by_settings.setdefault(settings, []).append(i)
    generate_fn = generate_fn or generate  # looked up now: tests replace it
    generated: list = [None] * len(rows)
    for settings, indices in by_settings.items():
        out = generate_fn(model, tokenizer, [list(rows[i][0].prompt_ids) for i in indices], settings,
                          [rows[i][3] for i in indices], stop_ids=stop_ids, micro_batch_size=micro_batch_size)
        for i, g in zip(indices, out):
            generated[i] = g
    return Samples([r[0].text for r in rows], generated, [r[0].reference for r in rows], base,
                   [r[3] for r in rows], meta=[r[2] for r in rows])
