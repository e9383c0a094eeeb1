"""Two gloo ranks load the same data through the token cache: local rank 0 writes, both map the
entry; then a file with a bad row: the writer's error reaches the waiting rank (no hang).
Launched by tests/distributed/test_token_cache.py; writes <out>/rank<N>.json."""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from transformers import AutoTokenizer

from config.schema import DataConfig
from trainer import token_cache
from trainer.data import DataError, load_sft_examples


def main(model_dir: str, good: str, bad: str, cache_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ranks = token_cache.Ranks(rank, int(os.environ["LOCAL_RANK"]), world)
    writes = []
    original = token_cache.write_entry
    token_cache.write_entry = lambda final, *a, **k: writes.append(str(final)) or original(final, *a, **k)
    hashed = []
    digest = token_cache.file_digest
    token_cache.file_digest = lambda path: hashed.append(path) or digest(path)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = DataConfig(prompt_key="prompt", response_key="response", max_length=16)
    report = {}
    for attempt in ("first", "second"):
        data = load_sft_examples(good, "data.train_files", tok, cfg, cache_dir=cache_dir, ranks=ranks)
        report[attempt] = {"writes": len(writes), "hashed": len(hashed), "folder": str(data.folder), "lengths": data.lengths.tolist(),
                           "example": data[len(data) // 2].input_ids}
    try:
        load_sft_examples(bad, "data.train_files", tok, cfg, cache_dir=cache_dir, ranks=ranks)
        report["bad"] = None
    except DataError as err:
        report["bad"] = str(err)
    dist.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
