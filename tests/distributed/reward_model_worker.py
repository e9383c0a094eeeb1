"""Two gloo ranks score with one sharded reward model: rank 0 three responses (two micro-batches),
rank 1 one (one micro-batch, then a spare forward to stay in step); then a sample event's
collective scoring (`Run._score_on_every_rank`): rank 0's samples, scored by both ranks; then
rank 1 alone failing to encode.
Launched by tests/distributed/test_reward_model_ranks.py; writes <out>/rank<N>.json."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from trainer.run import Run, SampleEventSpec, Samples
from workers.fsdp import ShardingSpec
from workers.reward_model import RewardModel

CONVERSATIONS = {
    0: [([{"role": "user", "content": "2+2="}], "4"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "3+3="}], "6 is it"),
        ([{"role": "user", "content": "Name a colour."}], "blue, green and a much longer answer than the others")],
    1: [([{"role": "user", "content": "1+1="}], "2")],
}


def main(rm_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    rm = RewardModel(rm_dir, ShardingSpec(), torch.device("cpu"), dist.get_world_size(), micro_batch_size=2)
    pairs = CONVERSATIONS[rank]
    scores = rm.score([c for c, _ in pairs], [r for _, r in pairs])
    encoded = [rm.encode(c, r) for c, r in pairs]

    # A sample event: rank 0 alone generated; every rank scores its texts with the sharded model.
    samples = None
    if rank == 0:
        samples = Samples(["2+2=", "Name a colour."], [SimpleNamespace(text="4"), SimpleNamespace(text="red")],
                          [None, None], None, [0, 0], rewards=[{"reward_0": 0.5}, {}])
    run = SimpleNamespace(step=3)
    scored = Run._score_on_every_rank(
        run, samples,
        lambda prompts, responses: [{"reward_model": v} for v in rm.score([[{"role": "user", "content": p}] for p in prompts], responses)],
        SampleEventSpec("50%", "samples", "qualitative"))
    sample_ids = [rm.encode([{"role": "user", "content": p}], r) for p, r in (("2+2=", "4"), ("Name a colour.", "red"))]

    # A failure on one rank only, before the forwards (rank 1 cannot encode): both ranks raise
    # ScoringFailed, and the sample event warns and keeps rank 0's samples, in step.
    if rank == 1:
        rm.encode = lambda conversation, response: (_ for _ in ()).throw(UnicodeError("rank 1 only"))
    try:
        rm.score([c for c, _ in pairs], [r for _, r in pairs])
        failed = None
    except Exception as err:  # noqa: BLE001 - recorded for the test
        failed = f"{type(err).__name__}: {err}"
    survived = Run._score_on_every_rank(
        run, samples,
        lambda prompts, responses: [{"reward_model": v} for v in rm.score([[{"role": "user", "content": p}] for p in prompts], responses)],
        SampleEventSpec("50%", "samples", "qualitative"))
    dist.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "scores": scores, "encoded": encoded, "sample_rewards": scored.rewards if scored else None, "sample_ids": sample_ids,
        "failed": failed, "survived": survived.rewards if survived else None}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
