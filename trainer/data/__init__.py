"""Training data: reading rows, tokenized SFT examples, their batches, and RL prompts.

    rows.py          parquet/JSONL rows as a stream; `DataError` names the file, row and column
    cached.py        `load_cached`: the rows of files, tokenized once into the token cache, memory-mapped
    sft_examples.py  SFT examples: tokenizing (single-turn, chat template), texts read back for samples
    batching.py      `collate`/`MicroBatch`, epoch orders, `SFTBatches`, validation micro-batches
    rl_prompts.py    RL prompts and their per-step batches (imported as `trainer.data.rl_prompts`)
    hf_datasets.py   datasets.Dataset / save_to_disk folders / hub ids as parquet files, TRL's formats
                     (imported as `trainer.data.hf_datasets`)

The names the trainers, scripts and tests import are re-exported here.
"""

from trainer.data.batching import (
    MEGABATCH_FACTOR,
    MicroBatch,
    SFTBatches,
    balanced_shares,
    collate,
    epoch_order,
    length_grouped_order,
    split_to_count,
    token_budget_groups,
    validation_micro_batches,
)
from trainer.data.cached import load_cached
from trainer.data.rows import CHUNK_ROWS, DataError, Row, as_file_list, dig, iter_row_chunks, read_rows, text_field
from trainer.data.sft_examples import (
    IGNORE,
    Example,
    SourceTexts,
    TokenizedDataset,
    conversation_texts,
    load_sft_examples,
    token_settings,
    tokenize_multi_turn,
    tokenize_single_turn,
    tokenized_chunks,
)

__all__ = [
    "CHUNK_ROWS", "IGNORE", "MEGABATCH_FACTOR", "DataError", "Example", "MicroBatch", "Row", "SFTBatches", "SourceTexts",
    "TokenizedDataset", "as_file_list", "balanced_shares", "collate", "conversation_texts", "dig", "epoch_order",
    "iter_row_chunks", "length_grouped_order", "load_cached", "load_sft_examples", "read_rows", "split_to_count",
    "text_field", "token_budget_groups", "token_settings", "tokenize_multi_turn", "tokenize_single_turn",
    "tokenized_chunks", "validation_micro_batches",
]
