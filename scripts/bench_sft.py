"""SFT throughput benchmark: our trainer against TRL's SFTTrainer and HF Trainer on uneven data.

    python scripts/bench_sft.py [--size tiny|full] [--steps N] [--out DIR]

What it does, one step after another in one invocation:

1. Builds everything locally (nothing is downloaded): a length-skewed prompt/response data set
   (lognormal lengths: most examples short, a few near `max_length`), a byte-level BPE tokenizer
   trained on that text, and a Llama-style model saved with `save_pretrained`. `--size full` is
   the issue's setting: 2,000 pairs, max length 512, a ~5.2M-parameter model (hidden 256, 4
   layers, 4 heads, vocab 4,000), batch 16, fp32, AdamW, lr 1e-3 constant. `--size tiny` is the
   same pipeline shrunk so that it runs in well under a minute (the test suite runs it).
2. Times fp32 `torch.matmul` (2 threads) on the spot: the peak the achieved FLOP/s are compared to.
3. Trains the same model on the same data, batch and steps with:
   - ours, `python -m trainer.fsdp_sft_trainer`, 1 process x 2 threads, the config defaults;
   - ours again with the length-aware data keys (`data.group_by_length`,
     `data.max_token_len_per_gpu`) all off when a default turns one on, and with each key that
     is off by default turned on, to show what they bring (only keys the trainer's schema has;
     tiny: the first of these runs alone);
   - ours, `torchrun --nproc_per_node=2`, 2 processes x 1 thread (FSDP2 over gloo), defaults;
   - the same with LoRA (`model.lora_rank=16`, all linear layers): adapters only, frozen base;
   - TRL's SFTTrainer (prompt-completion data, loss on the completion, no packing), if installed;
   - HF Trainer on the same data pre-tokenised (labels -100 on the prompt, padded per batch).
4. Per-rank peak memory of ours with 1 and 2 processes for a model large enough (~62M
   parameters) that sharding the parameters, gradients and AdamW state shows; and with 2
   processes, LoRA against full fine-tuning (tokens/s from step 3, memory on that model).
   `--lora-only` runs just that comparison (the two 2-process rows and their memory runs).

Reading the main table (each path runs 5 warm-up steps, left out, then `--steps`, default 60;
tiny: 1 + 3):

- real tok/s: non-pad tokens of the measured steps / their wall time (step end to step end,
  so data collation and the optimizer step are in; set-up and the final checkpoint are not).
  Ours: step times from the timestamps in metrics.jsonl, tokens from replaying the trainer's
  own batching code on the same data (or, if that fails, from `train/tokens_per_second`).
- padding: share of the tokens in the padded batches that are padding (token-weighted).
- s/step: median wall time of one optimizer step.
- peak RSS MB: the largest resident set of any one process of the path over its whole life
  (includes Python, torch and transformers, ~0.4-0.5 GB); for 2 processes, the larger rank.
- vs TRL: real tok/s over TRL's real tok/s.
- GFLOP/s: model FLOPs per real token x real tok/s. Model FLOPs: 6 x (matmul parameters) for the
  forward+backward matmuls of the linear layers and the LM head, plus the causal attention
  score/value matmuls (QK^T, AV) at this data's sequence lengths; FLOPs spent on padding are not
  counted, so this is useful work only. The input embedding table of an untied model is a lookup
  and is not counted. (The issue's table counts 6 x all parameters and no attention; the notes
  give that figure for the default row too.)
- % of peak: that over the 2-thread matmul GFLOP/s measured at the start.
- notes: the path's settings; "busy machine" when other processes used more than a quarter of
  a core meanwhile (the benchmark reads /proc/stat): such timings are low, rerun when idle.

The memory table gives, per rank, the estimate of parameters + gradients + AdamW state (fp32:
16 bytes per parameter, divided by the world size) and the measured peak RSS of that rank (each
rank's process records its own `ru_maxrss` at exit; "trainer peak" is the trainer's own
`train/peak_memory_mb`, rank 0, when it logs it). The runs are made twice: with the default
glibc malloc, which keeps freed memory in its heap (so after a few steps a rank's RSS includes
freed collective and gradient buffers), and with MALLOC_MMAP_THRESHOLD_=65536, which hands every
allocation over 64 KiB back to the system on free, so that RSS follows live memory and the
sharding shows. `--size tiny` reuses the throughput runs for this table. Nothing here asserts a
speed: it reports.

Peers (`trl`, `datasets`) are the optional `bench` extra: pip install 'sample-aware-trainer[bench]'.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata, util
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
PEER_INSTALL = "pip install 'sample-aware-trainer[bench]'"
# The length-aware batching keys: passed only when the trainer's schema has them (older trainers
# reject unknown keys), so the benchmark also runs against a trainer without them.
NEW_DATA_KEYS = {"group_by_length": False, "use_dynamic_bsz": False, "max_token_len_per_gpu": None}  # each with its "off" value


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Size:
    num_pairs: int
    max_length: int
    batch: int
    median_tokens: float  # lognormal length distribution of prompt + response
    sigma: float
    vocab: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    warmup: int
    steps: int
    matmul_n: int
    matmul_reps: int
    # the per-rank memory model and its run (tiny: the throughput model and runs)
    mem_hidden: int
    mem_layers: int
    mem_heads: int
    mem_intermediate: int
    mem_max_length: int
    mem_batch: int
    mem_steps: int
    mem_separate: bool  # False: the memory table reuses the throughput runs (tiny: keeps the test short)
    timeout_s: int
    switch_rows: bool = True  # measure model.compile and activation checkpointing (tiny: skipped, they only add time)
    all_variants: bool = True  # every data-key variant row (tiny: the first alone, which checks the mechanism)


SIZES = {
    "full": Size(
        num_pairs=2000, max_length=512, batch=16, median_tokens=70, sigma=1.0, vocab=4000,
        hidden=256, layers=4, heads=4, intermediate=688, warmup=5, steps=60, matmul_n=2048, matmul_reps=20,
        mem_hidden=768, mem_layers=8, mem_heads=12, mem_intermediate=2048, mem_max_length=128, mem_batch=4, mem_steps=6,
        mem_separate=True, timeout_s=1800,
    ),
    "tiny": Size(
        num_pairs=64, max_length=64, batch=8, median_tokens=14, sigma=0.8, vocab=320,
        hidden=32, layers=2, heads=2, intermediate=64, warmup=1, steps=3, matmul_n=512, matmul_reps=3,
        mem_hidden=32, mem_layers=2, mem_heads=2, mem_intermediate=64, mem_max_length=64, mem_batch=8, mem_steps=4,
        mem_separate=False, timeout_s=300, switch_rows=False, all_variants=False,
    ),
}
LR = 1e-3
DEFAULT_ROW = "ours 1 proc x 2 threads"
FULL_2P_ROW = "ours 2 proc x 1 thread (FSDP2, gloo)"
LORA_RANK = 16
LORA_KEYS = {"model.lora_rank": LORA_RANK, "model.lora_alpha": 2 * LORA_RANK, "model.target_modules": "all-linear"}
LORA_ROW = f"ours 2 proc x 1 thread, LoRA r{LORA_RANK} (FSDP2, gloo)"
SEED = 1
# glibc keeps freed heap memory for reuse, so after a few steps of variable-size collective and
# gradient buffers a rank's RSS drifts up to what one unsharded process holds. Serving every
# allocation over 64 KiB with mmap returns it to the system on free: RSS then follows live memory.
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def log(msg: str) -> None:
    # Progress goes to stderr so that stdout carries only the tables.
    print(f"[bench_sft {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data, tokenizer, model
SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "sa", "vo", "dex", "ni", "pra", "gol", "shi", "em", "ur", "bel",
             "tor", "qua", "zi", "fen", "ma", "do", "ril", "yo", "nak", "the", "an", "is", "of"]


def _lexicon(rng: random.Random, n: int) -> tuple[list[str], list[float]]:
    words: list[str] = []
    seen = set()
    while len(words) < n:
        w = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3, 3, 4))))
        if w not in seen:
            seen.add(w)
            words.append(w)
    # Zipf-like frequencies, so that BPE learns whole common words and splits rare ones, as on real text.
    cum, total = [], 0.0
    for rank in range(n):
        total += 1.0 / (rank + 1)
        cum.append(total)
    return words, cum


def _sentence(rng: random.Random, words: list[str], cum: list[float], n: int, end: str) -> str:
    chosen = rng.choices(words, cum_weights=cum, k=max(1, n))
    out = []
    for i, w in enumerate(chosen):
        out.append(w)
        if i % 11 == 10 and i + 1 < len(chosen):
            out[-1] += ","
    return " ".join(out) + end


def make_texts(size: Size, seed: int = 0) -> list[dict]:
    """Prompt/response pairs whose token lengths follow a lognormal law (words ~ 1.2 tokens)."""
    rng = random.Random(seed)
    words, cum = _lexicon(rng, 3000)
    rows = []
    for _ in range(size.num_pairs):
        total = min(size.max_length, max(6, int(rng.lognormvariate(math.log(size.median_tokens), size.sigma))))
        prompt_tokens = rng.randint(3, max(3, min(48, total // 3)))
        # A prompt ending in "?\n" keeps prompt and response in separate BPE pieces, so every path
        # (ours tokenizes them apart, TRL tokenizes prompt+completion) gets the same token ids.
        rows.append({
            "prompt": _sentence(rng, words, cum, int(prompt_tokens / 1.2), "?\n"),
            "response": _sentence(rng, words, cum, int((total - prompt_tokens) / 1.2), "."),
        })
    return rows


def train_tokenizer(texts: list[str], vocab: int, max_length: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    # No chat template and no BOS: a prompt is its plain tokens in every path.
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", model_max_length=max_length)


def fit_lengths(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Shorten the few responses whose prompt + response + EOS exceed max_length (ours refuses them)."""
    out = []
    for row in rows:
        p = len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
        words = row["response"].split(" ")
        while p + len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) + 1 > max_length and len(words) > 1:
            words = words[: max(1, int(len(words) * 0.9))]
        out.append({"prompt": row["prompt"], "response": " ".join(words)})
    return out


def token_lengths(rows: list[dict], tokenizer) -> list[tuple[int, int]]:
    prompts = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    responses = tokenizer([r["response"] for r in rows], add_special_tokens=False)["input_ids"]
    return [(len(p), len(r) + 1) for p, r in zip(prompts, responses)]  # +1: EOS


def build_model(out: Path, tokenizer, hidden: int, layers: int, heads: int, intermediate: int, max_length: int) -> int:
    """Save an untrained Llama-style model with the tokenizer; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max(max_length, 64),
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


@dataclass
class Assets:
    model_dir: Path
    data_file: Path
    params: int
    matmul_params: int  # parameters that take part in a matmul per token (not the input embedding table)
    flops_per_token: float  # model FLOPs (forward + backward) per real token on this data, attention included
    mem_model_dir: Path
    mem_params: int
    expected_padding: float  # random batches padded to the longest


def make_assets(size: Size, work: Path) -> Assets:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from transformers.utils import logging as hf_logging

    # Saving shows progress bars, and measuring over-long texts before trimming them warns.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    rows = make_texts(size)
    tokenizer = train_tokenizer([r["prompt"] + r["response"] for r in rows], size.vocab, size.max_length)
    rows = fit_lengths(rows, tokenizer, size.max_length)
    data_file = work / "data" / "train.parquet"
    data_file.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), data_file)

    lengths = [p + r for p, r in token_lengths(rows, tokenizer)]
    rng = random.Random(SEED)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = [order[i : i + size.batch] for i in range(0, len(order) - size.batch + 1, size.batch)]
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    log(f"data: {len(rows)} pairs, tokens median {statistics.median(lengths):.0f}, mean {statistics.mean(lengths):.0f}, "
        f"max {max(lengths)}; random batches of {size.batch} would be {1 - real / padded:.0%} padding")

    model_dir = work / "model"
    params = build_model(model_dir, tokenizer, size.hidden, size.layers, size.heads, size.intermediate, size.max_length)
    mem_dir, mem_params = model_dir, params
    if size.mem_separate:
        mem_dir = work / "mem_model"
        mem_params = build_model(mem_dir, tokenizer, size.mem_hidden, size.mem_layers, size.mem_heads,
                                 size.mem_intermediate, size.max_length)
    log(f"models: {params / 1e6:.2f}M parameters (throughput), {mem_params / 1e6:.1f}M (per-rank memory)")
    head_params = len(tokenizer) * size.hidden  # untied: the LM head, and an input table of the same size
    matmul_params = params - head_params  # the input embedding table is a lookup
    # The LM head's work is useful only where there is a target (the response tokens): a trainer
    # that also runs it on the prompt does more FLOPs, not more useful ones.
    pairs = token_lengths(rows, tokenizer)
    target_share = sum(r for _, r in pairs) / sum(p + r for p, r in pairs)
    # Causal attention of a length-S sequence: QK^T and AV over S(S+1)/2 query-key pairs, 2 FLOPs
    # per multiply-add, x3 for forward + backward, per layer and hidden unit (PaLM's MFU, halved
    # because only the causal half is computed).
    attention = 6 * size.layers * size.hidden * sum(s * (s + 1) for s in lengths) / sum(lengths)
    flops_per_token = 6 * (matmul_params - head_params) + 6 * head_params * target_share + attention
    return Assets(model_dir, data_file, params, matmul_params, flops_per_token, mem_dir, mem_params,
                  1 - real / padded)


# ----------------------------------------------------------------------------- matmul peak
def matmul_peak(n: int, reps: int, threads: int) -> dict[str, float]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        for _ in range(3):
            torch.matmul(a, b, out=c)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            torch.matmul(a, b, out=c)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    flop = 2.0 * n**3
    return {"best": flop / min(times) / 1e9, "median": flop / statistics.median(times) / 1e9}


# ----------------------------------------------------------------------------- a shared machine
class OtherLoad:
    """CPU time that processes other than this benchmark used during a run, in cores.

    Other work on the 2 cores slows every path (and 2-thread runs most, since one descheduled
    OpenMP thread stalls the other), so each row says when it ran on a busy machine.
    """

    def __init__(self) -> None:
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / self.ticks  # all but idle and iowait
        own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for f in ("ru_utime", "ru_stime"))
        return busy, own, time.perf_counter()

    def cores(self) -> Optional[float]:
        try:
            busy, own, now = self._sample()
        except (OSError, ValueError, IndexError):
            return None
        return max(0.0, ((busy - self.start[0]) - (own - self.start[1])) / max(now - self.start[2], 1e-6))


def busy_note(cores: Optional[float]) -> str:
    return f"busy machine: others used {cores:.1f} cores" if cores is not None and cores > 0.25 else ""


def join_notes(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


# ----------------------------------------------------------------------------- results
@dataclass
class Row:
    name: str
    tokens_per_s: Optional[float] = None
    padding: Optional[float] = None
    s_per_step: Optional[float] = None
    peak_mb: Optional[float] = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.tokens_per_s is not None


def summarize(name: str, real: list[int], padded: list[int], dts: list[float], warmup: int, peak_mb: Optional[float],
              note: str = "", **extra: Any) -> Row:
    real, padded, dts = real[warmup:], padded[warmup:], dts[warmup:]
    if not dts or len(real) != len(dts):
        return Row(name, note=f"failed: {len(dts)} measured steps, {len(real)} token counts", peak_mb=peak_mb)
    return Row(
        name,
        tokens_per_s=sum(real) / sum(dts),
        padding=(1 - sum(real) / sum(padded)) if padded and all(p is not None for p in padded) else None,
        s_per_step=statistics.median(dts),
        peak_mb=peak_mb,
        note=note,
        extra={"measured_steps": len(dts), **extra},
    )


def tail_errors(text: str, n: int = 6) -> str:
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    errors = [l for l in lines if ("Error" in l or "error:" in l) and "elastic" not in l]
    return " | ".join((errors or lines)[-n:])[-600:]


# ----------------------------------------------------------------------------- ours
def project_path() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def data_key_defaults() -> dict[str, Any]:
    """{key: value} of the length-aware data keys in the trainer's composed base config."""
    project_path()
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="config", version_base="1.3"):
        data = compose("sft_trainer").data
    return {key: data[key] for key in NEW_DATA_KEYS}


def metrics_records(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl records, read by the project's own reader (a torn line is skipped)."""
    project_path()
    from trainer.tracking.file import read_records

    return read_records(run_dir / "metrics.jsonl")


def on_value(key: str, max_length: int) -> Any:
    # A budget of 4 full-length sequences: long examples get micro-batches of their own.
    return 4 * max_length if key == "max_token_len_per_gpu" else True


def ours_micro(batch: int, nproc: int) -> int:
    """The schema's default micro-batch when it divides the batch, else the whole rank share."""
    project_path()
    from config.schema import DataConfig

    default = DataConfig.__dataclass_fields__["micro_batch_size_per_gpu"].default
    return default if batch % (default * nproc) == 0 else batch // nproc


def key_variants(defaults: dict[str, Any], max_length: int) -> list[tuple[str, dict[str, Any]]]:
    """Extra runs that show what the keys bring: all of them off (when a default turns one on),
    each key that is on by default turned off alone, and each key that is off by default
    turned on over the defaults."""
    variants = []
    on_by_default = [k for k, v in defaults.items() if v != NEW_DATA_KEYS[k]]
    if on_by_default:
        variants.append(("keys off", {k: NEW_DATA_KEYS[k] for k in defaults}))
    if len(on_by_default) > 1:
        variants += [(f"{k}={yaml_value(NEW_DATA_KEYS[k])}", {k: NEW_DATA_KEYS[k]}) for k in on_by_default]
    for k, v in defaults.items():
        if v == NEW_DATA_KEYS[k] and not (k == "max_token_len_per_gpu" and defaults.get("use_dynamic_bsz")):
            variants.append((f"+ {k}", {k: on_value(k, max_length)}))
    return variants


def yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={yaml_value(v)}" for k, v in values.items())


def child_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_")}
    env.update({
        "PYTHONPATH": str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "TRANSFORMERS_VERBOSITY": "error", "MLFLOW_DISABLE_TELEMETRY": "true",
    })
    return env


@dataclass
class OursRun:
    ok: bool
    error: str
    wall_s: float
    steps: dict[int, dict[str, float]]  # step -> metrics (+ "_time": when the record was written)
    rank_rss_mb: dict[int, float]
    other_cores: Optional[float]


def run_ours(work: Path, slug: str, model_dir: Path, data_file: Path, nproc: int, batch: int, max_length: int,
             total_steps: int, extra: list[str], timeout: int, micro: Optional[int] = None,
             env: Optional[dict[str, str]] = None) -> OursRun:
    run_dir, rss_dir = work / "runs" / slug, work / "rss" / slug
    rss_dir.mkdir(parents=True)
    overrides = [
        f"model.partial_pretrain={model_dir}", f"data.train_files={data_file}", "data.val_files=null",
        "data.prompt_key=prompt", "data.response_key=response", f"data.max_length={max_length}",
        f"data.train_batch_size={batch}", f"data.micro_batch_size_per_gpu={micro or ours_micro(batch, nproc)}",
        f"trainer.default_local_dir={run_dir}", "trainer.logger=[file]", "trainer.log_freq=1",
        "trainer.max_val_samples=0", "trainer.export_hf_model=false", "trainer.save_freq=-1",
        "trainer.resume_mode=disable", f"trainer.total_training_steps={total_steps}", "trainer.device=cpu",
        f"trainer.seed={SEED}", "samples.report=false", "samples.history=false",
        f"optim.lr={LR}", "optim.lr_scheduler=constant", "optim.lr_warmup_steps_ratio=0.0",
        # verl's default turns activation checkpointing on; it has its own row (the switch rows).
        "model.enable_gradient_checkpointing=false", *extra,
    ]
    # Each rank runs through this file's --_wrap so it can record its own peak RSS at exit.
    inner = [str(THIS), "--_wrap", str(rss_dir), "trainer.fsdp_sft_trainer", *overrides]
    if nproc == 1:
        cmd = [sys.executable, *inner]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *inner]
    start, load = time.perf_counter(), OtherLoad()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env={**child_env(2 if nproc == 1 else 1), **(env or {})},
                              capture_output=True, text=True, timeout=timeout)
        rc, err = proc.returncode, tail_errors(proc.stderr + proc.stdout)
    except subprocess.TimeoutExpired:
        rc, err = -1, f"timed out after {timeout}s"
    wall, other_cores = time.perf_counter() - start, load.cores()
    steps: dict[int, dict[str, float]] = {}
    for record in metrics_records(run_dir):
        if "train/loss" in record:
            step = int(record.pop("step"))
            steps.setdefault(step, {}).update({k: float(v) for k, v in record.items() if k != "time"})
            steps[step]["_time"] = float(record["time"])
    rss = {}
    for f in rss_dir.glob("rank*.json"):
        data = json.loads(f.read_text())
        rss[int(data["rank"])] = data["peak_rss_mb"]
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints of the big model are large
    return OursRun(rc == 0, "" if rc == 0 else f"exit {rc}: {err}", wall, steps, rss, other_cores)


def replay_batches(model_dir: Path, data_file: Path, data_values: dict[str, Any], world_size: int,
                   steps: list[int]) -> tuple[list[int], list[int]]:
    """Real and padded tokens of each step, from the trainer's own batching code on the same data.

    The trainer logs tokens per second but not tokens per step; its batches are a pure function
    of (seed, epoch, index), so rebuilding them here gives the exact counts.
    """
    import yaml

    project_path()
    from config.schema import DataConfig
    from trainer.data import SFTBatches, load_sft_examples
    from workers.model import load_tokenizer

    names = {f.name for f in dataclasses.fields(DataConfig)}
    yaml_data = (yaml.safe_load((ROOT / "config" / "sft_trainer.yaml").read_text()) or {}).get("data") or {}
    values = {k: v for k, v in yaml_data.items()
              if k in names and not isinstance(v, (dict, list)) and not (isinstance(v, str) and "${" in v)}
    values.update(data_values)
    values.update(train_files=str(data_file), val_files=None, prompt_key="prompt", response_key="response")
    cfg = DataConfig(**values)
    tokenizer = load_tokenizer(str(model_dir))
    examples = load_sft_examples(str(data_file), "data.train_files", tokenizer, cfg)
    ranks = [SFTBatches(examples, cfg, SEED, r, world_size, tokenizer.pad_token_id) for r in range(world_size)]
    per_epoch = ranks[0].steps_per_epoch
    real, padded = [], []
    for step in steps:
        epoch, index = divmod(step - 1, per_epoch)
        mbs = [mb for b in ranks for mb in b.micro_batches(epoch, index)]
        real.append(sum(int(mb.attention_mask.sum()) for mb in mbs))
        padded.append(sum(mb.input_ids.numel() for mb in mbs))
    return real, padded


def ours_row(name: str, run: OursRun, assets: Assets, data_values: dict[str, Any], nproc: int, size: Size,
             note: str) -> Row:
    peak = max(run.rank_rss_mb.values()) if run.rank_rss_mb else None
    if not run.ok:
        return Row(name, peak_mb=peak, note=f"failed: {run.error}")
    steps = sorted(run.steps)
    if len(steps) < 2:
        return Row(name, peak_mb=peak, note=f"failed: only {len(steps)} step(s) in metrics.jsonl")
    # Step k's time is from step k-1's record to its own: the first step has no start and is dropped.
    measured = steps[1:]
    dts = [run.steps[s]["_time"] - run.steps[s - 1]["_time"] for s in measured]
    warmup = max(0, size.warmup - 1)
    source = "replayed batches"
    try:
        real, padded = replay_batches(assets.model_dir, assets.data_file,
                                      {"max_length": size.max_length, "train_batch_size": size.batch,
                                       "micro_batch_size_per_gpu": ours_micro(size.batch, nproc), **data_values},
                                      nproc, measured)
    except Exception as err:  # noqa: BLE001 - the trainer's data API may change under us: fall back
        log(f"{name}: could not replay the trainer's batches ({type(err).__name__}: {err}); using its tokens/s")
        source = "trainer tokens/s x step time"
        real = [int(run.steps[s]["train/tokens_per_second"] * dt) for s, dt in zip(measured, dts)]
        padded = [None] * len(real)  # type: ignore[list-item]
    row = summarize(name, real, padded, dts, warmup, peak, join_notes(note, busy_note(run.other_cores)),
                    token_source=source, wall_s=run.wall_s, rank_rss_mb=run.rank_rss_mb, other_cores=run.other_cores)
    logged = [run.steps[s] for s in measured[warmup:]]
    if row.padding is None and logged and all("train/padding_fraction" in m for m in logged):
        row.padding = statistics.mean(m["train/padding_fraction"] for m in logged)
        row.extra["padding_source"] = "train/padding_fraction (mean over steps)"
    if logged:
        row.extra["trainer_tokens_per_second_median"] = statistics.median(m["train/tokens_per_second"] for m in logged)
        row.extra["final_loss"] = run.steps[steps[-1]]["train/loss"]
        if "train/padding_fraction" in logged[0]:
            row.extra["trainer_padding_fraction_mean"] = statistics.mean(m.get("train/padding_fraction", 0.0) for m in logged)
        if any("train/peak_memory_mb" in m for m in run.steps.values()):
            row.extra["trainer_peak_memory_mb"] = max(m.get("train/peak_memory_mb", 0.0) for m in run.steps.values())
    return row


def wrap_main(rss_dir: str, module: str, args: list[str]) -> None:
    """Run `python -m module args` in this process and record this process's peak RSS at exit."""
    import atexit
    import runpy

    def record() -> None:
        rank = int(os.environ.get("RANK", "0"))
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        Path(rss_dir, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss_mb": peak_mb}))

    atexit.register(record)
    if sys.path and Path(sys.path[0]).resolve() == THIS.parent:
        sys.path.pop(0)  # scripts/ is not a package root; the project root comes from PYTHONPATH
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


# ----------------------------------------------------------------------------- peers (TRL, HF Trainer)
def step_clock(ends: list[float]):
    """A `transformers` callback class that appends the clock at the start of training and at
    the end of every step to `ends` (a peer's seconds per step are the differences)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    return StepClock


def peer_main(argv: list[str]) -> None:
    """Child process: train one peer and write per-step token counts and times as JSON."""
    p = argparse.ArgumentParser()
    p.add_argument("--kind", choices=("trl", "hf"), required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--total-steps", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--max-length", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)

    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    model_dir = a.work / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = pq.read_table(a.work / "data" / "train.parquet").to_pylist()
    real: list[int] = []
    padded: list[int] = []
    ends: list[float] = []

    StepClock = step_clock(ends)

    def counting(base):
        # Counted at training_step, not in the collator: the dataloader fetches a batch ahead,
        # so the collator's order is not the steps' order.
        class Counting(base):
            def training_step(self, model, inputs, *args, **kwargs):
                ids = inputs["input_ids"]
                mask = inputs.get("attention_mask")
                real.append(int(mask.sum()) if mask is not None else int((ids != tokenizer.pad_token_id).sum()))
                padded.append(ids.numel())
                return super().training_step(model, inputs, *args, **kwargs)

        return Counting

    common = dict(
        output_dir=str(a.work / f"peer_{a.kind}"), per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
        max_steps=a.total_steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, optim="adamw_torch", logging_strategy="no",
        save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True, seed=SEED,
    )
    if a.kind == "trl":
        import trl
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        version = f"trl {trl.__version__}"
        data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["response"]} for r in rows])
        # SFTConfig defaults bf16=True and gradient_checkpointing=True: both set off above (fp32, like the others).
        args = SFTConfig(**common, max_length=a.max_length, packing=False, padding_free=False,
                         completion_only_loss=True)
        trainer = counting(SFTTrainer)(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                       callbacks=[StepClock()])
    else:
        import transformers
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        version = f"transformers {transformers.__version__}"
        prompts = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
        responses = tokenizer([r["response"] for r in rows], add_special_tokens=False)["input_ids"]
        data = []
        for p_ids, r_ids in zip(prompts, responses):
            ids = list(p_ids) + list(r_ids) + [tokenizer.eos_token_id]
            data.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": [-100] * len(p_ids) + list(r_ids) + [tokenizer.eos_token_id]})
        args = TrainingArguments(**common, remove_unused_columns=False)
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
        trainer = counting(Trainer)(model=model, args=args, train_dataset=data, data_collator=collator,
                                    callbacks=[StepClock()])
    result = trainer.train()
    a.out.write_text(json.dumps({
        "real": real, "padded": padded, "dts": [b - e for e, b in zip(ends, ends[1:])], "version": version,
        "final_loss": float(getattr(result, "training_loss", float("nan"))),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def run_peer(kind: str, name: str, work: Path, size: Size, total_steps: int) -> Row:
    out = work / f"peer_{kind}.json"
    cmd = [sys.executable, str(THIS), "--_peer", "--kind", kind, "--work", str(work), "--total-steps", str(total_steps),
           "--batch", str(size.batch), "--max-length", str(size.max_length), "--out", str(out)]
    start, load = time.perf_counter(), OtherLoad()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(2), capture_output=True, text=True, timeout=size.timeout_s)
        rc, err = proc.returncode, tail_errors(proc.stderr + proc.stdout)
    except subprocess.TimeoutExpired:
        rc, err = -1, f"timed out after {size.timeout_s}s"
    wall, other_cores = time.perf_counter() - start, load.cores()
    if rc != 0 or not out.exists():
        return Row(name, note=f"failed: exit {rc}: {err}")
    data = json.loads(out.read_text())
    return summarize(name, data["real"], data["padded"], data["dts"], size.warmup, data["peak_rss_mb"],
                     join_notes(data["version"], busy_note(other_cores)), wall_s=wall, final_loss=data["final_loss"],
                     other_cores=other_cores)


def peer_status() -> dict[str, Optional[str]]:
    status = {}
    for pkg in ("trl", "datasets"):
        try:
            status[pkg] = metadata.version(pkg) if util.find_spec(pkg) is not None else None
        except metadata.PackageNotFoundError:
            status[pkg] = None
    return status


# ----------------------------------------------------------------------------- tables
def fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)])


def main_table(rows: list[Row], flops_per_token: float, peak_gflops: float) -> str:
    trl = next((r for r in rows if r.name.startswith("TRL") and r.ok), None)
    body = []
    for r in rows:
        gflops = flops_per_token * r.tokens_per_s / 1e9 if r.ok else None
        body.append([
            r.name, fmt(r.tokens_per_s, ".0f"), fmt(None if r.padding is None else 100 * r.padding, ".1f", "%"),
            fmt(r.s_per_step, ".3f"), fmt(r.peak_mb, ".0f"),
            fmt(r.tokens_per_s / trl.tokens_per_s if (trl and r.ok) else None, ".2f", "x"),
            fmt(gflops, ".1f"), fmt(100 * gflops / peak_gflops if gflops is not None else None, ".1f", "%"),
            r.note,
        ])
    headers = ["path", "real tok/s", "padding", "s/step", "peak RSS MB", "vs TRL", "GFLOP/s", "% of peak", "notes"]
    return markdown_table(headers, body)


def lora_params(hidden: int, intermediate: int, layers: int, rank: int = LORA_RANK) -> int:
    """Adapter parameters of LoRA on every linear layer of a Llama decoder (q, k, v, o: hidden to
    hidden; gate, up: hidden to intermediate; down: back): rank x (in + out) each."""
    return layers * rank * (4 * 2 * hidden + 3 * (hidden + intermediate))


def lora_table(entries: list[dict]) -> str:
    body = [[e["path"], fmt(e.get("tokens_per_s"), ".0f"), fmt(e.get("s_per_step"), ".3f"), fmt(e["trainable"] / 1e6, ".2f", "M"),
             fmt(e["estimate_mb"], ".1f"), *(fmt(e["rank_rss_mb"].get(r), ".0f") for r in (0, 1)),
             fmt(e.get("trainer_peak_mb"), ".0f"), e.get("note", "")] for e in entries]
    headers = ["path", "real tok/s", "s/step", "trainable", "weights+grads+AdamW MB/rank (est.)", "rank 0 peak RSS MB",
               "rank 1 peak RSS MB", "trainer peak MB", "notes"]
    return markdown_table(headers, body)


def memory_table(entries: list[dict]) -> str:
    body = [[str(e["world_size"]), str(e["rank"]), fmt(e["estimate_mb"], ".0f"), fmt(e.get("peak_rss_mb_default"), ".0f"),
             fmt(e.get("trainer_peak_mb_default"), ".0f"), fmt(e.get("peak_rss_mb_mmap"), ".0f"), e.get("note", "")]
            for e in entries]
    headers = ["world size", "rank", "params+grads+AdamW MB (est.)", "peak RSS MB", "trainer peak MB",
               "peak RSS MB, mmap malloc", "notes"]
    return markdown_table(headers, body)


# ----------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per path, after the warm-up (default: 60 full, 3 tiny)")
    parser.add_argument("--out", type=Path, default=None, help="directory for bench_sft.json and bench_sft.md")
    parser.add_argument("--lora-only", action="store_true", help="only LoRA against full fine-tuning, 2 processes")
    args = parser.parse_args()
    size = SIZES[args.size]
    if args.steps is not None:
        if args.steps < 1:
            parser.error("--steps must be at least 1")
        size = dataclasses.replace(size, steps=args.steps)
    total_steps = size.warmup + size.steps
    started = time.perf_counter()

    import torch

    torch.set_num_threads(2)
    peers = peer_status()
    for pkg, version in peers.items():
        log(f"peer {pkg}: {version or 'NOT INSTALLED (' + PEER_INSTALL + ')'}")
    new_keys = data_key_defaults()

    work = Path(tempfile.mkdtemp(prefix=f"bench_sft_{args.size}_"))
    try:
        assets = make_assets(size, work)
        load = OtherLoad()
        peak = matmul_peak(size.matmul_n, size.matmul_reps, threads=2)
        peak_1t = matmul_peak(size.matmul_n, size.matmul_reps, threads=1)
        matmul_busy = busy_note(load.cores())
        log(f"fp32 matmul {size.matmul_n}^2: {peak['best']:.1f} GFLOP/s with 2 threads, {peak_1t['best']:.1f} with 1"
            + (f" ({matmul_busy})" if matmul_busy else ""))

        rows: list[Row] = []
        ours_runs: dict[str, OursRun] = {}

        def ours(name: str, slug: str, nproc: int, values: dict[str, Any], note: str) -> None:
            # Bare names are data keys; dotted ones (model.compile, ...) are passed as they are.
            log(f"running {name} ...")
            extra = [f"{k if '.' in k else 'data.' + k}={yaml_value(v)}" for k, v in values.items()]
            run = run_ours(work, slug, assets.model_dir, assets.data_file, nproc, size.batch, size.max_length,
                           total_steps, extra, size.timeout_s)
            ours_runs[slug] = run
            effective = {**new_keys, **{k: v for k, v in values.items() if "." not in k}}
            rows.append(ours_row(name, run, assets, effective, nproc, size, note))
            log(f"  done in {run.wall_s:.1f}s" + ("" if run.ok else f": {run.error}"))

        default_desc = describe(new_keys) or "plain path"
        if not args.lora_only:
            ours(DEFAULT_ROW, "ours_1p", 1, {}, f"config defaults ({default_desc})")
            variants = key_variants(new_keys, size.max_length)
            for i, (label, values) in enumerate(variants if size.all_variants else variants[:1]):
                ours(f"ours 1 proc x 2 threads, {label}", f"ours_1p_variant{i}", 1, values,
                     describe(values) + ("" if label == "keys off" else ", other keys at their defaults"))
        # Switches that are measured, not assumed to help.
        if size.switch_rows and not args.lora_only:
            ours("ours 1 proc x 2 threads, + torch.compile", "ours_1p_compile", 1, {"model.compile": True},
                 "model.compile=true, other keys at their defaults")
            ours("ours 1 proc x 2 threads, + activation checkpointing", "ours_1p_ckpt", 1,
                 {"model.enable_gradient_checkpointing": True}, "model.enable_gradient_checkpointing=true")
        ours(FULL_2P_ROW, "ours_2p", 2, {}, "config defaults; peak RSS of the larger rank")
        ours(LORA_ROW, "ours_2p_lora", 2, LORA_KEYS, f"{describe(LORA_KEYS)}: adapters only, same data and batch")

        if args.lora_only:
            pass
        elif peers["trl"] and peers["datasets"]:
            log("running TRL SFTTrainer ...")
            rows.append(run_peer("trl", "TRL SFTTrainer", work, size, total_steps))
        else:
            missing = " and ".join(p for p in ("trl", "datasets") if not peers[p])
            rows.append(Row("TRL SFTTrainer", note=f"{missing} not installed: {PEER_INSTALL}"))
        if not args.lora_only:
            log("running HF Trainer ...")
            rows.append(run_peer("hf", "HF Trainer (pre-tokenised)", work, size, total_steps))

        # LoRA against full fine-tuning, 2 processes: tokens/s from the rows above (same data,
        # batch and steps), per-rank memory on the memory model (mmap malloc: RSS follows live memory).
        lora: list[dict] = []
        m_hidden, m_inter, m_layers = ((size.mem_hidden, size.mem_intermediate, size.mem_layers) if size.mem_separate
                                       else (size.hidden, size.intermediate, size.layers))
        for slug, name, extra_keys in (("ours_2p", FULL_2P_ROW, {}), ("ours_2p_lora", LORA_ROW, LORA_KEYS)):
            if size.mem_separate:
                log(f"running per-rank memory, 2 processes, {name}, mmap malloc ...")
                mem_run = run_ours(work, f"mem_lora_{slug}", assets.mem_model_dir, assets.data_file, 2, size.mem_batch,
                                   size.mem_max_length, size.mem_steps,
                                   ["data.truncation=right", *(f"{k}={yaml_value(v)}" for k, v in extra_keys.items())],
                                   size.timeout_s, micro=size.mem_batch // 2, env=MMAP_ENV)
            else:
                mem_run = ours_runs[slug]
            row = next(r for r in rows if r.name == name)
            adapters = lora_params(m_hidden, m_inter, m_layers) if extra_keys else 0
            trainable = adapters or assets.mem_params
            # fp32 on CPU: weights 4 bytes each; gradients and AdamW's two moments 12 more for what trains.
            estimate = (4 * (assets.mem_params + adapters) + 12 * trainable) / 2 / 2**20
            lora.append({"path": name, "tokens_per_s": row.tokens_per_s, "s_per_step": row.s_per_step,
                         "trainable": trainable, "estimate_mb": estimate, "rank_rss_mb": mem_run.rank_rss_mb,
                         "trainer_peak_mb": max((m.get("train/peak_memory_mb", 0.0) for m in mem_run.steps.values()),
                                                default=0.0) or None,
                         "note": "" if mem_run.ok else f"memory run failed: {mem_run.error}"})

        memory: list[dict] = []
        mem_params = assets.mem_params
        for nproc in (() if args.lora_only else (1, 2)):
            runs: dict[str, Optional[OursRun]] = {}
            if size.mem_separate:
                for allocator, env in (("default", None), ("mmap", MMAP_ENV)):
                    log(f"running per-rank memory, {nproc} process(es), {mem_params / 1e6:.1f}M parameters, "
                        f"{allocator} malloc ...")
                    runs[allocator] = run_ours(
                        work, f"mem_{nproc}p_{allocator}", assets.mem_model_dir, assets.data_file, nproc, size.mem_batch,
                        size.mem_max_length, size.mem_steps, ["data.truncation=right"], size.timeout_s,
                        micro=size.mem_batch // 2, env=env)  # the same micro-batch on every rank: only sharding differs
            else:
                runs = {"default": ours_runs[f"ours_{nproc}p"], "mmap": None}
            for rank in range(nproc):
                entry: dict[str, Any] = {"world_size": nproc, "rank": rank, "estimate_mb": 16 * mem_params / nproc / 2**20}
                failures = []
                for allocator, run in runs.items():
                    if run is None:
                        continue
                    entry[f"peak_rss_mb_{allocator}"] = run.rank_rss_mb.get(rank)
                    if rank == 0:  # the trainer logs rank 0's peak after every step
                        entry[f"trainer_peak_mb_{allocator}"] = max(
                            (m.get("train/peak_memory_mb", 0.0) for m in run.steps.values()), default=0.0) or None
                    if not run.ok:
                        failures.append(f"{allocator} failed: {run.error}")
                entry["note"] = "; ".join(failures)
                memory.append(entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    notes = [
        f"size={args.size}: {size.num_pairs} pairs, max length {size.max_length}, batch {size.batch}, fp32, AdamW "
        f"lr {LR} constant, {size.warmup} warm-up + {size.steps} measured steps per path; model "
        f"{assets.params / 1e6:.2f}M parameters (hidden {size.hidden}, {size.layers} layers, vocab {size.vocab}).",
        f"Random batches of {size.batch} padded to the longest would be {assets.expected_padding:.0%} padding on this data.",
        f"Matmul peak (fp32 {size.matmul_n}x{size.matmul_n}, best of {size.matmul_reps}): {peak['best']:.1f} GFLOP/s "
        f"with 2 threads (median {peak['median']:.1f}); {peak_1t['best']:.1f} GFLOP/s with 1 thread. "
        "% of peak uses the 2-thread figure for every row." + (f" Measured on a {matmul_busy}." if matmul_busy else ""),
        f"GFLOP/s = model FLOPs per real token x real tok/s, {assets.flops_per_token / 1e6:.1f}M per token on this "
        "data: 6 x the decoder's matmul parameters, 6 x the LM head's parameters on the target (response) share "
        "of the tokens, and the causal attention matmuls (QK^T, AV) at this data's lengths; the input embedding "
        "table (a lookup) and padding are not counted, so this is useful work only.",
        "peak RSS: each process records its own ru_maxrss at exit (whole life: imports, load, training, final save).",
    ]
    if size.mem_separate:
        notes.append("Memory: 'peak RSS MB' with the default glibc malloc, which keeps freed buffers in its heap; "
                     "'mmap malloc' with MALLOC_MMAP_THRESHOLD_=65536, which returns allocations over 64 KiB on free, "
                     "so RSS follows live memory. RSS includes ~0.5 GB of Python, torch and transformers.")
    if any(label == "+ max_token_len_per_gpu" for label, _ in key_variants(new_keys, size.max_length)):
        notes.append(f"data.max_token_len_per_gpu={on_value('max_token_len_per_gpu', size.max_length)} is a budget of "
                     "4 full-length sequences per forward.")
    for pkg, version in peers.items():
        if not version:
            notes.append(f"MISSING peer: {pkg} ({PEER_INSTALL}).")
    if peers["trl"]:
        notes.append("TRL: SFTConfig defaults to bf16=True and gradient_checkpointing=True; both are set off here "
                     "(fp32, no recomputation, like the other paths). Its loss runs through TRL's chunked LM head.")
    if any("busy machine" in r.note for r in rows):
        notes.append("Rows marked 'busy machine' ran while other processes used the cores: their timings are low "
                     "and not comparable; rerun on an idle machine.")
    for r in rows:
        if r.ok and r.extra.get("token_source", "").startswith("trainer"):
            notes.append(f"{r.name}: tokens per step estimated from train/tokens_per_second (batch replay failed).")

    default = next((r for r in rows if r.ok and r.name == DEFAULT_ROW), None)
    if default:
        issue_share = 6 * assets.params * default.tokens_per_s / 1e9 / peak["best"]
        notes.append(f"The issue's own accounting (6 x all {assets.params / 1e6:.2f}M parameters per token, embedding "
                     f"table included, no attention) puts '{default.name}' at {issue_share:.1%} of peak.")
    notes.append("LoRA: GFLOP/s counts the full model's 6 x parameters per token, but with a frozen base the "
                 "weight-gradient matmuls of the base are skipped (about 4 x instead of 6 x), so its GFLOP/s overstates "
                 "the work done; compare its real tok/s. Its memory estimate: fp32 weights for all (4 bytes each), "
                 "gradients and AdamW state (12 bytes) only for the adapters.")
    table = main_table(rows, assets.flops_per_token, peak["best"])
    mem = memory_table(memory) if memory else "(not run: --lora-only)"
    wall = time.perf_counter() - started
    text = "\n".join([
        f"## SFT throughput ({args.size})", "", table, "",
        (f"## Per-rank memory ({mem_params / 1e6:.1f}M parameters, batch {size.mem_batch}, "
         f"max length {size.mem_max_length}, {size.mem_steps} steps)" if size.mem_separate else
         f"## Per-rank memory (the throughput runs above, {mem_params / 1e6:.2f}M parameters)"), "", mem, "",
        (f"## LoRA against full fine-tuning (2 processes; memory on the {mem_params / 1e6:.1f}M-parameter model, "
         "mmap malloc)" if size.mem_separate else
         f"## LoRA against full fine-tuning (2 processes, the throughput runs, {mem_params / 1e6:.2f}M parameters)"), "",
        lora_table(lora), "",
        "Notes:", *(f"- {n}" for n in notes), f"- Benchmark wall time: {wall:.0f}s.",
    ])
    print(text, flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_sft.md").write_text(text + "\n")
        (args.out / "bench_sft.json").write_text(json.dumps({
            "size": args.size, "settings": dataclasses.asdict(size), "peers": peers, "new_data_keys": new_keys,
            "matmul_gflops_2_threads": peak, "matmul_gflops_1_thread": peak_1t,
            "params": assets.params, "matmul_params": assets.matmul_params, "memory_model_params": mem_params,
            "flops_per_token": assets.flops_per_token,
            "rows": [{**dataclasses.asdict(r), "gflops": assets.flops_per_token * r.tokens_per_s / 1e9 if r.ok else None}
                     for r in rows],
            "memory": memory, "lora": lora, "notes": notes, "wall_s": wall,
        }, indent=2, default=str))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_wrap":
        wrap_main(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--_peer":
        peer_main(sys.argv[2:])
    else:
        sys.exit(main())
