"""Per-GPU memory of a model sharded as this trainer shards it, measured without GPUs: the model
is built on the meta device and sharded by `workers.fsdp.shard_model` over PyTorch's fake
process group (one process stands in for any number of ranks; torchtitan plans at scale the
same way), then one AdamW step on meta gradients creates the optimizer state. What is counted is
what the shards really hold, rank 0's (the largest when a dimension does not divide evenly).

    python scripts/memory_plan.py --rows 8   # the rows of the docs' memory table for 8 GPUs (scripts/memory_table.py writes it)

Runs in a process of its own: the fake group is the default process group of that process.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config

from workers.fsdp import ShardingSpec, device_mesh, shard_model


@dataclass(frozen=True)
class RankBytes:
    params: int  # fp32 master weights of rank 0's shards
    grads: int  # fp32 gradients (sharded like the parameters)
    optimizer: int  # AdamW state (exp_avg, exp_avg_sq; step counters excluded)
    total_params: int  # parameters of the whole model (tied weights once)


def measure(config: PretrainedConfig, world_size: int, fsdp_size: int = -1) -> RankBytes:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    if dist.get_world_size() != world_size:
        raise RuntimeError(f"this process's fake group has {dist.get_world_size()} ranks, not {world_size}: one size per process")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    total = sum(p.numel() for p in model.parameters())
    shard_model(model, device_mesh(torch.device("cpu"), world_size, fsdp_size), ShardingSpec())
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=False)
    optimizer.step()  # on meta tensors: allocates the state, computes nothing

    def local_bytes(t: torch.Tensor) -> int:
        local = t.to_local() if hasattr(t, "to_local") else t
        return local.numel() * local.element_size()

    state = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    return RankBytes(sum(map(local_bytes, params)), sum(local_bytes(p.grad) for p in params), sum(map(local_bytes, state)), total)


# The shapes of three public models (their config.json), built on meta: nothing is downloaded.
MODELS = {
    "0.5B (Qwen2.5-0.5B)": lambda: Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                              num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7B (Llama-2-7B)": lambda: LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                                           num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "32B (Qwen2.5-32B)": lambda: Qwen2Config(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                                             num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
}
LAYOUTS = {8: [("FSDP over 8", -1)], 64: [("FSDP over 64", -1), ("HSDP 8 nodes × 8 (`fsdp_size=8`)", 8)]}


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f}"


def table_rows(world_size: int) -> list[str]:
    """Rows for one world size (one fake group per process: the script runs one per size)."""
    out = []
    for name, make in MODELS.items():
        for layout, fsdp_size in LAYOUTS[world_size]:
            out.append(table_row(name, world_size, layout, measure(make(), world_size, fsdp_size)))
    return out


def table_row(name: str, world_size: int, layout: str, b: RankBytes) -> str:
    return (f"| {name} | {world_size} | {layout} | {_gb(b.params)} | {_gb(b.grads)} | {_gb(b.optimizer)} | "
            f"{_gb(b.params + b.grads + b.optimizer)} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rows"]:
        print("\n".join(table_rows(int(sys.argv[2]))))
    else:  # one measurement as JSON: MODEL_NAME WORLD FSDP_SIZE
        name, world, fsdp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        print(json.dumps(asdict(measure(MODELS[name](), world, fsdp))))
