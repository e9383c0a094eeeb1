"""One process of the rollout-engine tests (torchrun, gloo): the same prompts through the HF engine
and the vLLM engine on the sharded actor, before and after an optimizer step that changes it.

    torchrun --nproc_per_node=2 tests/distributed/engine_worker.py OUT_JSON MODEL_DIR[:lora] ...

One launch runs every case in turn (an actor and its two engines each: a process and its engine
start once). Writes, from rank 0, {case: [rank 0's result, rank 1's result]}, each result
{"before": {"hf": [...], "vllm": [...]}, "after": {...}, "sampled_twice": [...], "stopped": {...}}
(token ids per prompt of that rank).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from config.env import dist_env  # noqa: E402
from trainer.distributed import init_distributed  # noqa: E402
from workers.fsdp import ShardingSpec, build_sharded_model  # noqa: E402
from workers.generation import GenerationSettings, encode_prompts  # noqa: E402
from workers.lora import LoraSpec  # noqa: E402
from workers.model import load_config, load_stop_ids, load_tokenizer  # noqa: E402
from workers.rollout_engine import EngineSettings, build_engine  # noqa: E402

PROMPTS = ["12+34=", "7+8=", "99+1=", "5+55=", "40+2=", "3+3=", "61+29=", "18+18="]


def run_case(case: str, ctx, closing: list) -> dict:
    model_dir, _, flag = case.partition(":")
    lora = LoraSpec(8, 16) if flag == "lora" else None
    tokenizer = load_tokenizer(model_dir)
    stop_ids = load_stop_ids(model_dir, tokenizer)
    spec = ShardingSpec()
    actor = build_sharded_model(model_dir, load_config(model_dir), spec, ctx.device, ctx.world_size, lora=lora)
    settings = EngineSettings(model_path=model_dir, max_model_len=64, dtype=torch.float32, seed=0)
    engines = {name: build_engine(name, actor, spec, tokenizer, stop_ids, settings, lora) for name in ("hf", "vllm")}
    closing.extend(engines.values())
    mine = encode_prompts(tokenizer, PROMPTS)[ctx.rank :: ctx.world_size]
    greedy = GenerationSettings(max_new_tokens=12, do_sample=False)
    sampled = GenerationSettings(max_new_tokens=12, do_sample=True, temperature=1.0)
    seeds = [1000 + i for i in range(len(mine))]

    def run(settings):
        return {name: [g.token_ids for g in engine.generate(mine, settings, seeds)] for name, engine in engines.items()}

    result = {"before": run(greedy), "sampled_twice": [run(sampled)["vllm"], run(sampled)["vllm"]]}
    # A stop id the greedy answer reaches: both engines end there, the stop token kept (HF's rows).
    stop = result["before"]["hf"][0][3]
    for engine in engines.values():
        engine.stop_ids = [stop]
    result["stopped"] = {name: [(g.token_ids, g.stopped_at_eos, g.text) for g in engine.generate(mine, greedy, seeds)]
                         for name, engine in engines.items()}
    for engine in engines.values():
        engine.stop_ids = list(stop_ids)
    # One large step on the trainable weights: the model's greedy answers change.
    optimizer = torch.optim.SGD([p for p in actor.parameters() if p.requires_grad], lr=0.5 if lora else 0.05)
    ids = torch.tensor([mine[0] + [5, 6, 7]])
    actor(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    for engine in engines.values():
        engine.update_weights()
    result["after"] = run(greedy)
    return result


def main() -> None:
    out, cases = Path(sys.argv[1]), sys.argv[2:]
    ctx = init_distributed(dist_env(), "cpu")
    closing: list = []
    results = {}
    for case in cases:
        gathered = [None] * ctx.world_size
        dist.all_gather_object(gathered, run_case(case, ctx, closing))
        results[case] = gathered
    if ctx.rank == 0:
        out.write_text(json.dumps(results))
    for engine in closing:
        engine.close()
    if dist.is_initialized():  # the vLLM engine's shutdown destroys the process group it joined
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
