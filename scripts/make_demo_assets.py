"""Regenerate the bundled offline demo: a character tokenizer with a chat template, a tiny
Llama-style model built from a config, and a checkable arithmetic task (SFT and RL layouts).

    python scripts/make_demo_assets.py [--out config/demo_assets]

Deterministic: the same command writes the same files.
"""

from __future__ import annotations

import argparse
import random
import string
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}<|system|>{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}<|user|>{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
MAX_OPERAND = 99  # two-digit additions: 10,000 problems
NUM_VAL = 200
NUM_RL_TRAIN = 2000


def build_tokenizer() -> PreTrainedTokenizerFast:
    # One token per printable character, so any English prompt tokenizes (the demo's answers are digits).
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=256,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def problems(seed: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    random.Random(seed).shuffle(pairs)
    return pairs[NUM_VAL:], pairs[:NUM_VAL]


def sft_table(pairs: list[tuple[int, int]]) -> pa.Table:
    return pa.table({"prompt": [f"{a}+{b}=" for a, b in pairs], "response": [str(a + b) for a, b in pairs]})


def rl_table(pairs: list[tuple[int, int]], split: str) -> pa.Table:
    # verl's RL layout (as its GSM8K preprocessing writes it).
    return pa.table(
        {
            "data_source": ["arithmetic"] * len(pairs),
            "prompt": [[{"role": "user", "content": f"{a}+{b}="}] for a, b in pairs],
            "ability": ["math"] * len(pairs),
            "reward_model": [{"style": "rule", "ground_truth": str(a + b)} for a, b in pairs],
            "extra_info": [{"split": split, "index": i} for i in range(len(pairs))],
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "config" / "demo_assets")
    args = parser.parse_args()

    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    model_dir = args.out / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)

    train, val = problems()
    data_dir = args.out / "arithmetic"
    data_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(sft_table(train), data_dir / "train.parquet")
    pq.write_table(sft_table(val), data_dir / "val.parquet")
    pq.write_table(rl_table(train[:NUM_RL_TRAIN], "train"), data_dir / "rl_train.parquet")
    pq.write_table(rl_table(val, "test"), data_dir / "rl_val.parquet")
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {model_dir} ({params / 1e6:.2f}M parameters, vocab {len(tokenizer)}) and {data_dir}")


if __name__ == "__main__":
    main()
