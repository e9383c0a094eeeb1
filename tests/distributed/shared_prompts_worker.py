"""torchrun x2 worker for test_shared_prompts_sharded.py: the shared-prompt forward of a model
sharded over 2 gloo ranks (a real shard per rank: two forwards all-gather, one backward
reduce-scatters) against the plain forward of the whole model. Rank 0 writes the comparison.

    torchrun --nproc_per_node=2 -m shared_prompts_worker MODEL_DIR OUT_JSON
"""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.actor import build_rollout_batch, response_log_probs
from workers.fsdp import ShardingSpec, device_mesh, shard_model
from workers.generation import GenerationSettings, encode_prompts, generate


def main(model_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = encode_prompts(tok, ["1+2=", "33+44=", "hello there"])
    group = 3
    generated = generate(plain, tok, [p for p in prompts for _ in range(group)],
                         GenerationSettings(max_new_tokens=5, temperature=1.5, top_k=0), seeds=list(range(len(prompts) * group)))
    batch = build_rollout_batch(generated, [i for i in range(len(prompts)) for _ in range(group)], tok.pad_token_id)
    sharded = shard_model(copy.deepcopy(plain), device_mesh(torch.device("cpu"), dist.get_world_size()),
                          ShardingSpec(torch.float32, torch.float32, False, True, -1))
    shard_rows = {n: p.to_local().shape[0] for n, p in sharded.named_parameters()}
    grads, log_probs = [], []
    for model, shared in ((plain, False), (sharded, True)):
        model.train()
        weights = torch.linspace(-1.0, 2.0, batch.response_mask.numel()).view_as(batch.response_mask)
        lp = response_log_probs(model, batch, shared_prompts=shared)
        (lp * weights).sum().backward()
        log_probs.append(lp.detach())
        # Both ranks run the same batch: FSDP's averaged gradient equals the one-rank gradient.
        grads.append({n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) for n, p in model.named_parameters()})
    if dist.get_rank() == 0:
        diffs = {n: float((grads[1][n] - g).abs().max()) for n, g in grads[0].items()}
        full_rows = {n: p.shape[0] for n, p in plain.named_parameters()}
        Path(out).write_text(json.dumps({
            "world_size": dist.get_world_size(),
            "sharded_params": sum(shard_rows[n] < full_rows[n] for n in shard_rows),
            "params": len(diffs),
            "max_grad_diff": max(diffs.values()),
            "max_grad": max(float(g.abs().max()) for g in grads[0].values()),
            "max_log_prob_diff": float((log_probs[1] - log_probs[0]).abs().max()),
        }))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
