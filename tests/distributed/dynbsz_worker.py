"""torchrun x2 worker for test_rl_dynamic_batches.py: token-budget micro-batches on a model
sharded over 2 gloo ranks whose sequences differ in length (rank 0 long, rank 1 short), so that
alone they would run different numbers of forwards. The log-prob forward and one policy update
run with the budget and with fixed micro-batches of 2; rank 0 writes the comparison.

    torchrun --nproc_per_node=2 -m dynbsz_worker MODEL_DIR OUT_JSON
"""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from helpers import skewed_rollout
from workers import core_algos
from workers.actor import MicroBatching, UpdateSettings, forward_in_micro_batches, micro_batch_rows, response_log_probs, update_policy
from workers.fsdp import ShardingSpec, device_mesh, shard_model
from workers.micro_batches import token_budget_groups

BUDGET = 160  # tokens per forward: a long row (up to 70 tokens) fits twice, the short rank's 8 rows at once


def main(model_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_pretrained(model_dir)
    lengths = ((20, 30), (20, 40)) if rank == 0 else ((2, 4), (1, 3))
    batch = skewed_rollout(4, 2, *lengths, plain.config.vocab_size, plain.config.pad_token_id, seed=rank)
    batch.advantages = torch.randn(len(batch), 1, generator=torch.Generator().manual_seed(rank)) * batch.response_mask
    prompts, responses = batch.lengths()
    own = len(token_budget_groups(range(len(batch)), (prompts, responses), BUDGET))
    fixed, budget = MicroBatching(2), MicroBatching(2, BUDGET, "actor.ppo_max_token_len_per_gpu")
    mesh = device_mesh(torch.device("cpu"), world)
    report = {"own_count": own, "common_count": len(micro_batch_rows(batch, budget))}
    deltas, log_probs = [], []
    for how in (fixed, budget):
        model = shard_model(copy.deepcopy(plain), mesh, ShardingSpec())
        before = [p.full_tensor().detach().clone() for p in model.parameters()]
        log_probs.append(forward_in_micro_batches(response_log_probs, model, batch, how))
        batch.old_log_prob = log_probs[0] + 0.05 * batch.response_mask  # the same off-policy ratios both times
        settings = UpdateSettings(how.size, ppo_epochs=1, mini_batches=2, clip_grad=1.0, world_size=world, seed=0,
                                  max_tokens=how.max_tokens)
        metrics = update_policy(model, torch.optim.SGD(model.parameters(), lr=0.5), None, batch,
                                core_algos.get_policy_loss("vanilla"), core_algos.PolicyLossConfig(), 0.0, "k3", settings,
                                step=0, temperature=1.0)
        deltas.append([p.full_tensor().detach() - b for p, b in zip(model.parameters(), before)])
        report[f"pg_loss_{'budget' if how.max_tokens else 'fixed'}"] = metrics["actor/pg_loss"]
    report["max_log_prob_diff"] = float((log_probs[1] - log_probs[0]).abs().max())
    report["max_delta"] = max(float(d.abs().max()) for d in deltas[0])
    report["max_delta_diff"] = max(float((a - b).abs().max()) for a, b in zip(deltas[0], deltas[1]))
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        Path(out).write_text(json.dumps(reports))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
