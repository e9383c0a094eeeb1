"""Data at scale: the token cache against the code before it, on 2 ranks (torchrun, gloo).

    python scripts/bench_data.py [--rows 1000000] [--baseline-rows 25000] [--steps 50] [--out DIR]
    python scripts/bench_data.py --quick     # a small version (the test suite runs it)

What it does, in one invocation:

1. Builds a synthetic JSONL data set (prompt/response pairs, lognormal lengths: median 250
   tokens, sigma 0.6, mean ~300 tokens, at most `--max-length`), a byte-level BPE tokenizer
   trained on part of it (`--vocab` tokens) and a tiny Llama model (hidden 64, 2 layers). Two
   files: `--rows` rows and its first `--baseline-rows` rows; and a copy of each whose row 5
   is too long (with `data.truncation=error`: a bad row).
2. Trains `--steps` steps on 2 ranks, each run launched from a fresh process that reports the
   peak RSS of its largest descendant (a rank; RSS counts the mapped cache pages a rank has
   touched):
   - the code before the token cache (`--baseline-ref`, default the parent of the commit that
     added trainer/token_cache.py, unpacked with `git archive` into a temporary folder), on the
     small file: every rank reads and tokenizes every row into Python lists. On the big file it
     would need ~`rows / baseline-rows` times its memory (about 117 GB per rank at 1M rows of
     this data): it is not run there.
   - the token cache on the small file and on the big file: a first run (empty cache: local
     rank 0 tokenizes, rank 1 waits) and a second run (the cache is used).
   - each code on its bad file: the time until the run has stopped with the row's error.
3. Prints the table (markdown) and writes it, with the raw numbers, to `--out`
   (bench_data.md, bench_data.json).

Time to first step is from the launch of torchrun to the wall-clock time of step 1's record in
the run's metrics.jsonl (process start, imports, data, model build and one step). Tokens/s is
the median of `train/tokens_per_second` over steps 2..N (real tokens of the global batch per
second of step). The machine is shared: timings are of one run each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
SEED = 0
BAD_ROW = 5


def say(msg: str) -> None:
    print(f"[bench_data {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data, tokenizer, model
def lexicon(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    syllables = ["ka", "lo", "mi", "ren", "tu", "sa", "vo", "dex", "ni", "pra", "gol", "shi", "em", "ur", "bel",
                 "tor", "qua", "zi", "fen", "ma", "do", "ril", "yo", "nak", "the", "an", "is", "of"]
    words: dict[str, None] = {}
    while len(words) < n:
        words["".join(rng.choice(syllables, size=int(rng.integers(1, 5))))] = None
    # Zipf-like frequencies, so that BPE learns whole common words and splits rare ones, as on real text.
    weights = 1.0 / np.arange(1, n + 1)
    return np.array(list(words), dtype=object), np.cumsum(weights) / weights.sum()


def write_rows(path: Path, rows: int, median_tokens: float, sigma: float, max_tokens: int) -> None:
    """`rows` prompt/response pairs as JSONL, written in blocks (bounded memory)."""
    rng = np.random.default_rng(SEED)
    words, cum = lexicon(rng, 3000)
    block = 10_000
    with open(path, "w") as out:
        for start in range(0, rows, block):
            n = min(block, rows - start)
            totals = np.clip(rng.lognormal(math.log(median_tokens), sigma, n), 8, max_tokens - 8).astype(int)
            prompts = np.minimum(rng.integers(3, 48, n), totals // 3)
            counts = np.maximum(1, totals)  # this BPE spends ~1.0 token per word
            picks = words[np.searchsorted(cum, rng.random(int(counts.sum())))]
            lines, at = [], 0
            for total_words, prompt_tokens in zip(counts, prompts):
                chosen = picks[at : at + total_words]
                at += total_words
                split = max(1, int(prompt_tokens))
                lines.append(json.dumps({"prompt": " ".join(chosen[:split]) + "?\n", "response": " ".join(chosen[split:]) + "."}))
            out.write("\n".join(lines) + "\n")


def copy_head(src: Path, dst: Path, rows: int) -> None:
    with open(src, "rb") as inp, open(dst, "wb") as out:
        for i, line in enumerate(inp):
            if i == rows:
                break
            out.write(line)


def copy_with_bad_row(src: Path, dst: Path, max_tokens: int) -> None:
    """The file with row BAD_ROW's response longer than max_length tokens; other rows as they are."""
    with open(src, "rb") as inp, open(dst, "wb") as out:
        for i, line in enumerate(inp):
            if i == BAD_ROW:
                line = (json.dumps({"prompt": "too long?\n", "response": " ".join(["kalo"] * 2 * max_tokens)}) + "\n").encode()
            out.write(line)


def build_tokenizer_and_model(data: Path, out: Path, vocab: int, max_length: int, train_rows: int) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    def texts():
        with open(data) as f:
            for i, line in enumerate(f):
                if i == train_rows:
                    return
                row = json.loads(line)
                yield row["prompt"] + row["response"]

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts(), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "</s>"], show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", model_max_length=max_length)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_length,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(SEED)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------- runs
@dataclass
class Run:
    code: str
    rows: int
    kind: str  # first | second | bad
    ok: bool
    wall_s: float
    first_step_s: Optional[float]
    peak_rss_gib: float
    tokens_per_s: Optional[float]
    error: str


def child_env(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_")}
    env.update({"PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "true"})
    return env


def launch(cmd: list[str], env: dict, timeout: int) -> tuple[int, str, float]:
    """Run `cmd` (torchrun) from a fresh process that reports its descendants' peak RSS (KiB)."""
    wrapper = [sys.executable, str(THIS), "--_launch", *cmd]
    try:
        proc = subprocess.run(wrapper, cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout}s", 0.0
    peak = next((float(l.split()[1]) for l in proc.stderr.splitlines() if l.startswith("BENCH_PEAK_RSS_KIB ")), 0.0)
    return proc.returncode, proc.stderr + proc.stdout, peak


def run(code: str, tree: Path, model: Path, data: Path, rows: int, kind: str, work: Path, args, cache: Optional[Path]) -> Run:
    run_dir = work / "runs" / f"{code}-{rows}-{kind}-{time.time_ns()}"
    overrides = [
        f"model.partial_pretrain={model}", f"data.train_files={data}", "data.val_files=null",
        "data.prompt_key=prompt", "data.response_key=response", f"data.max_length={args.max_length}",
        f"data.truncation={'error' if kind == 'bad' else 'right'}",
        f"data.train_batch_size={args.batch}", "data.micro_batch_size_per_gpu=4",
        f"trainer.default_local_dir={run_dir}", "trainer.logger=[file]", "trainer.log_freq=1",
        "trainer.max_val_samples=0", "trainer.export_hf_model=false", "trainer.save_freq=-1",
        "trainer.resume_mode=disable", f"trainer.total_training_steps={args.steps}", "trainer.device=cpu",
        f"trainer.seed={SEED}", "samples.report=false", "samples.history=false", "optim.lr=1e-4",
        "model.enable_gradient_checkpointing=false",
    ]
    if cache is not None:
        overrides.append(f"data.cache_dir={cache}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer.fsdp_sft_trainer", *overrides]
    say(f"{code}, {rows:,} rows, {kind} run")
    start_wall = time.time()
    rc, output, peak_kib = launch(cmd, child_env(tree), args.timeout)
    wall = time.time() - start_wall
    records = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        records = [r for r in map(json.loads, metrics.read_text().splitlines()) if "train/loss" in r]
    first = min((r for r in records), key=lambda r: r["step"], default=None)
    speeds = [r["train/tokens_per_second"] for r in records if r["step"] >= 2]
    error = ""
    if rc != 0:
        lines = [l for l in output.splitlines() if "Error" in l or "error" in l or "row" in l]
        error = next((l for l in lines if f"row {BAD_ROW}" in l), lines[-1] if lines else f"exit {rc}")
    shutil.rmtree(run_dir, ignore_errors=True)
    result = Run(code, rows, kind, rc == 0, wall, (first["time"] - start_wall) if first else None, peak_kib / 2**20,
                 statistics.median(speeds) if speeds else None, error.strip()[:300])
    say(f"  -> {'ok' if result.ok else 'failed'} in {wall:.1f}s, peak RSS {result.peak_rss_gib:.2f} GiB"
        + (f", first step at {result.first_step_s:.1f}s" if result.first_step_s else "") + (f": {result.error}" if error else ""))
    return result


def baseline_tree(ref: Optional[str], work: Path) -> tuple[Path, str]:
    if ref is None:
        added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "trainer/token_cache.py"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
        ref = f"{added[-1]}^" if added else "HEAD"
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    tree = work / f"baseline-{sha}"
    if not tree.is_dir():
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree, sha


# ----------------------------------------------------------------------------- table
def fmt(value: Optional[float], digits: int = 1, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{unit}"


def table(runs: list[Run], args, sha: str) -> str:
    def get(code: str, rows: int, kind: str) -> Optional[Run]:
        return next((r for r in runs if (r.code, r.rows, r.kind) == (code, rows, kind)), None)

    lines = [
        f"## Data at scale: token cache vs. before ({sha}), 2 ranks (torchrun, gloo), {args.steps} steps",
        "",
        "| code | rows | time to first step, first run | time to first step, second run | peak RSS per rank, GiB | "
        "tokens/s (median, steps 2+) | bad row 5 reported after |",
        "|---|---|---|---|---|---|---|",
    ]
    for code, rows in dict.fromkeys((("before", args.baseline_rows), ("token cache", args.baseline_rows), ("token cache", args.rows))):
        first, second, bad = get(code, rows, "first"), get(code, rows, "second"), get(code, rows, "bad")
        if first is None:
            continue
        peak = max(r.peak_rss_gib for r in (first, second) if r is not None)
        bad_cell = "n/a" if bad is None else (f"{bad.wall_s:.1f} s" if f"row {BAD_ROW}" in bad.error else f"not reported ({bad.error or 'ran'})")
        second_cell = "(no cache)" if code == "before" else fmt(second.first_step_s if second else None, 1, " s")
        lines.append(f"| {code} | {rows:,} | {fmt(first.first_step_s, 1, ' s')} | {second_cell} | {peak:.2f} | "
                     f"{fmt(first.tokens_per_s, 0)} | {bad_cell} |")
    before, new_small, new_big = get("before", args.baseline_rows, "first"), get("token cache", args.baseline_rows, "first"), get("token cache", args.rows, "first")
    lines += ["", "| ratio | value | goal | met |", "|---|---|---|---|"]

    def ratio_row(name: str, value: Optional[float], goal: str, met: Optional[bool]) -> None:
        lines.append(f"| {name} | {fmt(value, 3)} | {goal} | {'n/a' if met is None else ('yes' if met else 'NO')} |")

    if before and new_small:
        rss = new_small.peak_rss_gib / before.peak_rss_gib if before.peak_rss_gib else None
        ratio_row(f"peak RSS per rank, token cache / before ({args.baseline_rows:,} rows)", rss, "<= 0.1", None if rss is None else rss <= 0.1)
        if before.tokens_per_s and new_small.tokens_per_s:
            speed = new_small.tokens_per_s / before.tokens_per_s
            ratio_row(f"tokens/s, token cache / before ({args.baseline_rows:,} rows)", speed, "~1 (noise)", 0.8 <= speed <= 1.25)
    if before and new_small and new_big and args.rows != args.baseline_rows:
        # Before holds every row in Python lists: its peak minus the token cache's at the same rows
        # (model, optimizer, activations: the same in both) grows with the rows.
        floor = new_small.peak_rss_gib
        extrapolated = floor + (before.peak_rss_gib - floor) * args.rows / args.baseline_rows
        ratio_row(f"peak RSS per rank at {args.rows:,} rows, token cache / before extrapolated ({extrapolated:,.1f} GiB)",
                  new_big.peak_rss_gib / extrapolated, "<= 0.1", new_big.peak_rss_gib / extrapolated <= 0.1)
    big_second = get("token cache", args.rows, "second")
    if new_big and big_second and new_big.first_step_s and big_second.first_step_s:
        r = big_second.first_step_s / new_big.first_step_s
        ratio_row(f"time to first step at {args.rows:,} rows, second run / first", r, "<= 0.1", r <= 0.1)
    bad_big = get("token cache", args.rows, "bad")
    if bad_big and new_big and new_big.first_step_s:
        r = bad_big.wall_s / new_big.first_step_s
        ratio_row(f"bad row at {args.rows:,} rows: time to the error / first run's time to first step", r, "seconds, not the whole set",
                  f"row {BAD_ROW}" in bad_big.error and r < 0.5)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--baseline-rows", type=int, default=25_000,
                   help="rows for the code before the cache (it holds every row in Python lists on every rank)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--median-tokens", type=float, default=250.0, help="median of the lognormal lengths (sigma 0.6)")
    p.add_argument("--baseline-ref", default=None, help="git ref of the code before the token cache")
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--quick", action="store_true",
                   help="400 rows, 4 steps, vocab 1,000, shorter rows, no big file, not the code before (the test suite)")
    p.add_argument("--out", type=Path, default=ROOT / "bench_out")
    p.add_argument("--work", type=Path, default=None, help="keep data, model and cache here (default: a temporary folder)")
    p.add_argument("--table-from", type=Path, default=None, help="print the table of a saved bench_data.json, run nothing")
    args = p.parse_args(argv)
    if args.table_from is not None:
        saved = json.loads(args.table_from.read_text())
        for key in ("rows", "baseline_rows", "steps"):
            setattr(args, key, int(saved["args"][key]))
        sha = saved.get("baseline", "before")
        print(table([Run(**r) for r in saved["runs"]], args, sha), end="")
        return
    if args.quick:
        args.rows, args.baseline_rows, args.steps, args.vocab, args.max_length, args.batch, args.timeout = 400, 400, 4, 1000, 512, 8, 600
        args.median_tokens = 40.0  # every row but the bad one fits max_length with this small vocabulary
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_data-"))
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        big, small = work / f"rows{args.rows}.jsonl", work / f"rows{args.baseline_rows}.jsonl"
        if not big.is_file():
            say(f"writing {args.rows:,} rows")
            write_rows(big, args.rows, args.median_tokens, 0.6, args.max_length)
        bad_big, bad_small = work / f"bad{args.rows}.jsonl", work / f"bad{args.baseline_rows}.jsonl"
        if small != big:
            copy_head(big, small, args.baseline_rows)
            copy_with_bad_row(big, bad_big, args.max_length)
        copy_with_bad_row(small, bad_small, args.max_length)
        model = work / "model"
        if not model.is_dir():
            say("training the tokenizer, saving the model")
            build_tokenizer_and_model(small, model, args.vocab, args.max_length, min(args.baseline_rows, 20_000))
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        runs: list[Run] = []
        sha = "not run"
        # The code before needs the project's git history (a tarball or a shallow clone has
        # none): the test suite's quick run measures the token cache alone.
        if not args.quick:
            tree, sha = baseline_tree(args.baseline_ref, work)
            runs += [run("before", tree, model, data, args.baseline_rows, kind, work, args, None)
                     for data, kind in ((small, "first"), (bad_small, "bad"))]
        for rows, good, bad in ((args.baseline_rows, small, bad_small), (args.rows, big, bad_big)):
            runs += [run("token cache", ROOT, model, good, rows, kind, work, args, cache) for kind in ("first", "second")]
            runs.append(run("token cache", ROOT, model, bad, rows, "bad", work, args, cache))
            if args.rows == args.baseline_rows:
                break
        text = table(runs, args, sha)
        print(text, end="")
        (args.out / "bench_data.md").write_text(text)
        (args.out / "bench_data.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "baseline": sha,
                                                               "runs": [asdict(r) for r in runs]}, indent=1))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def launch_main(cmd: list[str]) -> None:
    """Run `cmd`; print the peak RSS of its largest descendant (the reaped children's maximum)."""
    code = subprocess.run(cmd).returncode
    print(f"BENCH_PEAK_RSS_KIB {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", file=sys.stderr, flush=True)
    sys.exit(code)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_launch":
        launch_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
