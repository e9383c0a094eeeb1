"""Validation-generation benchmark: what sample generation costs a demo run, and what batching buys.

    python scripts/bench_generation.py [--quick] [--[no-]evaluate] [--out DIR]

Two measurements, one after the other:

1. The bundled demo (`python -m trainer.fsdp_sft_trainer --config-name demo`) cut to 300 steps, run
   twice: with samples (`trainer.max_val_samples=5`, the default) and without
   (`trainer.max_val_samples=0`). The demo validates at each epoch end (153 steps) and at the
   last step, so 300 steps keep the default's density of one validation per ~150 steps. Both
   runs log every step (`trainer.log_freq=1`) so each validation is bracketed by timestamps in
   metrics.jsonl: a validation runs from the step's train record to the last record of that
   step (validation loss, then gather, generation and sample logging).
2. `workers.generation.generate` on the demo model (config/demo_assets/model) with 8 prompts
   encoded by `workers.generation.encode_prompts`: one batched call against 8 single-prompt
   calls, with the demo's sampling settings and `max_new_tokens=32`, each prompt with its own
   seed; the median of several repeats after a warm-up call.

Reading the table:

- time per validation: mean over the run's validations, with and without samples.
- generation share of run time: `val/generation_time_s` summed over validations over the wall
  time of the run with samples (the target: under 5%).
- sample cost share: (time per validation with - without) x validations over the same wall
  time; this also counts the gather of the full model and logging the samples.
- extra wall time: the whole-run difference; it carries a second or two of noise.
- batched speed-up: 8 single-prompt calls over one batched call (the target: at least 3x).
- live report share: `val/report_time_s` (rewriting report.html after each validation and handing
  it to the trackers that replace it) summed over the run, over its wall time (the target: under 1%).
- evaluation cost share: a third run evaluates at each validation as docs/evaluation.md shows
  (`generation.num_samples_per_prompt=4`, a greedy answer beside, the default task metrics, and
  with the `[eval]` extra installed one small local lm-eval task every 2 validations):
  (time per validation with it - without samples) x validations over its wall time. No target:
  it is what the user chose to spend; `eval/time_s` summed shows lm-eval's part. On by default,
  off with `--quick` unless `--evaluate` is given.

`--quick` (used by the test suite) runs 6 steps (one validation) and 2 repeats of 16 tokens:
it checks that the benchmark works; its shares are not representative. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark, however this is launched
from bench_sft import ROOT, OtherLoad, busy_note, child_env, markdown_table, metrics_records, tail_errors

DEMO_MODEL = ROOT / "config" / "demo_assets" / "model"
DEMO_VAL = ROOT / "config" / "demo_assets" / "arithmetic" / "val.parquet"
SHARE_TARGET = 0.05
REPORT_SHARE_TARGET = 0.01
SPEEDUP_TARGET = 3.0


@dataclass(frozen=True)
class Settings:
    demo_steps: int
    max_new_tokens: int
    repeats: int
    prompts: int = 8


FULL = Settings(demo_steps=300, max_new_tokens=32, repeats=5)
QUICK = Settings(demo_steps=6, max_new_tokens=16, repeats=2)


def log(msg: str) -> None:
    print(f"[bench_generation {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- demo runs
@dataclass
class DemoRun:
    ok: bool
    error: str
    wall_s: float
    validations: list[float]  # seconds per validation
    generation_s: list[float]  # val/generation_time_s per validation
    report_s: list[float]  # val/report_time_s per validation (the live report)
    other_cores: Optional[float]
    eval_s: list[float] = ()  # eval/time_s per lm-eval run


def run_demo(work: Path, max_val_samples: int, steps: int, extra: tuple[str, ...] = (), name: str = "") -> DemoRun:
    run_dir = work / (name or f"demo_samples_{max_val_samples}")
    cmd = [sys.executable, "-m", "trainer.fsdp_sft_trainer", "--config-name", "demo", f"trainer.total_training_steps={steps}",
           f"trainer.default_local_dir={run_dir}", f"trainer.max_val_samples={max_val_samples}", "trainer.log_freq=1", *extra]
    start, load = time.perf_counter(), OtherLoad()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(2), capture_output=True, text=True, timeout=1800)
        rc, err = proc.returncode, tail_errors(proc.stderr + proc.stdout)
    except subprocess.TimeoutExpired:
        rc, err = -1, "timed out after 1800s"
    wall, other = time.perf_counter() - start, load.cores()
    records = metrics_records(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    train_time = {r["step"]: r["time"] for r in records if "train/loss" in r}
    last_time: dict[int, float] = {}
    generation: dict[int, float] = {}
    report: dict[int, float] = {}
    val_steps = []
    for r in records:
        if "val/loss" in r:
            val_steps.append(r["step"])
        if "train/loss" not in r:
            last_time[r["step"]] = r["time"]
        if "val/generation_time_s" in r:
            generation[r["step"]] = r["val/generation_time_s"]
        if "val/report_time_s" in r:
            report[r["step"]] = r["val/report_time_s"]
    validations = [last_time[s] - train_time[s] for s in val_steps if s in train_time and s in last_time]
    return DemoRun(rc == 0, "" if rc == 0 else f"exit {rc}: {err}", wall, validations,
                   [generation[s] for s in val_steps if s in generation], [report[s] for s in val_steps if s in report], other,
                   [r["eval/time_s"] for r in records if "eval/time_s" in r])


def evaluation_args(work: Path, every: int) -> tuple[str, ...]:
    """k=4 answers and a greedy one per sample prompt; with lm-eval installed, one small local
    multiple-choice task (20 sums from the demo's validation set) every `every` validations."""
    import importlib.util

    import pyarrow.parquet as pq

    args = ("generation.num_samples_per_prompt=4", "generation.also_greedy=true")
    if importlib.util.find_spec("lm_eval") is None:
        return args
    tasks = work / "lm_eval_tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    rows = pq.read_table(DEMO_VAL).slice(0, 20).to_pylist()
    with open(tasks / "sums.jsonl", "w") as handle:
        for r in rows:
            answer = int(r["response"])
            handle.write(json.dumps({"question": r["prompt"], "choices": [str(answer), str(answer + 1), str(answer - 10)],
                                     "answer": 0}) + "\n")
    (tasks / "sums.yaml").write_text(
        f"task: bench_sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'sums.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return (*args, "eval.lm_eval.tasks=[bench_sums]", f"eval.lm_eval.include_path={tasks}", f"eval.every_n_validations={every}")


# ----------------------------------------------------------------------------- batched vs per-prompt
def time_generation(settings: Settings) -> dict[str, float]:
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    sys.path.insert(0, str(ROOT))
    from workers.generation import GenerationSettings, encode_prompts, generate
    from workers.model import load_tokenizer

    torch.set_num_threads(2)
    hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(str(DEMO_MODEL))
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    prompts = [r["prompt"] for r in pq.read_table(DEMO_VAL).slice(0, settings.prompts).to_pylist()]
    prompt_ids = encode_prompts(tokenizer, prompts)
    seeds = list(range(1, len(prompt_ids) + 1))
    # The demo's sampling settings (config/generation/default.yaml); only the length is ours.
    gen = GenerationSettings(max_new_tokens=settings.max_new_tokens, do_sample=True, temperature=1.0, top_k=50, top_p=0.7)

    def batched() -> int:
        return sum(g.num_tokens for g in generate(model, tokenizer, prompt_ids, gen, seeds))

    def per_prompt() -> int:
        return sum(generate(model, tokenizer, [p], gen, [s])[0].num_tokens for p, s in zip(prompt_ids, seeds))

    def timed(fn) -> tuple[float, int]:
        start = time.perf_counter()
        tokens = fn()
        return time.perf_counter() - start, tokens

    batched(), per_prompt()  # warm-up: first calls pay for lazy initialisation
    load = OtherLoad()
    batch_runs, single_runs = [], []
    for _ in range(settings.repeats):
        batch_runs.append(timed(batched))
        single_runs.append(timed(per_prompt))
    return {
        "batched_s": statistics.median(t for t, _ in batch_runs),
        "per_prompt_s": statistics.median(t for t, _ in single_runs),
        "batched_tokens": statistics.mean(n for _, n in batch_runs),
        "per_prompt_tokens": statistics.mean(n for _, n in single_runs),
        "other_cores": load.cores(),
    }


# ----------------------------------------------------------------------------- main
def fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def verdict(ok: Optional[bool]) -> str:
    return "n/a" if ok is None else ("yes" if ok else "NO")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast variant that checks the benchmark runs")
    parser.add_argument("--out", type=Path, default=None, help="directory for bench_generation.json and .md")
    parser.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=None,
                        help="also the evaluating run (k=4, metrics, lm-eval); default: on, off with --quick")
    args = parser.parse_args()
    evaluate = (not args.quick) if args.evaluate is None else args.evaluate
    settings = QUICK if args.quick else FULL
    started = time.perf_counter()

    work = Path(tempfile.mkdtemp(prefix="bench_generation_"))
    try:
        runs = {}
        for n in (5, 0):
            log(f"demo run, {settings.demo_steps} steps, trainer.max_val_samples={n} ...")
            runs[n] = run_demo(work, n, settings.demo_steps)
            log(f"  done in {runs[n].wall_s:.1f}s" + ("" if runs[n].ok else f": {runs[n].error}"))
        runs["eval"] = DemoRun(False, "not run (--no-evaluate)", 0.0, [], [], [], None)
        if evaluate:
            extra = evaluation_args(work, every=1 if args.quick else 2)  # quick: its one validation
            log(f"demo run, {settings.demo_steps} steps, evaluating: {' '.join(extra)} ...")
            runs["eval"] = run_demo(work, 5, settings.demo_steps, extra, "demo_eval")
            log(f"  done in {runs['eval'].wall_s:.1f}s" + ("" if runs["eval"].ok else f": {runs['eval'].error}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"generate: {settings.prompts} prompts, batched vs one call each, {settings.repeats} repeats ...")
    gen = time_generation(settings)

    on, off = runs[5], runs[0]
    both = on.ok and off.ok and on.validations and off.validations
    per_val_on = statistics.mean(on.validations) if on.ok and on.validations else None
    per_val_off = statistics.mean(off.validations) if off.ok and off.validations else None
    gen_sum = sum(on.generation_s) if on.ok and on.generation_s else None
    gen_share = gen_sum / on.wall_s if gen_sum is not None else None
    sample_share = (per_val_on - per_val_off) * len(on.validations) / on.wall_s if both else None
    extra_wall = on.wall_s - off.wall_s if (on.ok and off.ok) else None
    report_sum = sum(on.report_s) if on.ok and on.report_s else None
    report_share = report_sum / on.wall_s if report_sum is not None else None
    speedup = gen["per_prompt_s"] / gen["batched_s"]
    ev = runs["eval"]
    per_val_eval = statistics.mean(ev.validations) if ev.ok and ev.validations else None
    eval_share = ((per_val_eval - per_val_off) * len(ev.validations) / ev.wall_s
                  if per_val_eval is not None and per_val_off is not None else None)
    lm_eval_sum = sum(ev.eval_s) if ev.ok and ev.eval_s else None

    def row(measure: str, value: str, target: str = "", met: str = "", note: str = "") -> list[str]:
        return [measure, value, target, met, note]

    failed = lambda r: "" if r.ok else f"failed: {r.error}"  # noqa: E731
    body = [
        row("demo run wall time, samples on (max_val_samples=5)", fmt(on.wall_s, ".1f", " s"),
            note=" ".join(filter(None, [failed(on), busy_note(on.other_cores)]))),
        row("demo run wall time, samples off (max_val_samples=0)", fmt(off.wall_s, ".1f", " s"),
            note=" ".join(filter(None, [failed(off), busy_note(off.other_cores)]))),
        row("validations per run", str(len(on.validations))),
        row("time per validation, samples on", fmt(per_val_on, ".3f", " s")),
        row("time per validation, samples off", fmt(per_val_off, ".3f", " s")),
        row("val/generation_time_s, summed", fmt(gen_sum, ".3f", " s")),
        row("generation share of run time", fmt(None if gen_share is None else 100 * gen_share, ".2f", "%"),
            f"< {100 * SHARE_TARGET:.0f}%", verdict(None if gen_share is None else gen_share < SHARE_TARGET)),
        row("sample cost share (gather + generate + log)", fmt(None if sample_share is None else 100 * sample_share, ".2f", "%"),
            f"< {100 * SHARE_TARGET:.0f}%", verdict(None if sample_share is None else sample_share < SHARE_TARGET)),
        row("live report: val/report_time_s, summed", fmt(report_sum, ".3f", " s"),
            note=f"{len(on.report_s)} rewrites" if on.ok else ""),
        row("live report share of run time", fmt(None if report_share is None else 100 * report_share, ".2f", "%"),
            f"< {100 * REPORT_SHARE_TARGET:.0f}%", verdict(None if report_share is None else report_share < REPORT_SHARE_TARGET)),
        row("extra wall time, samples on vs off",
            "n/a" if extra_wall is None else f"{extra_wall:.1f} s ({100 * extra_wall / off.wall_s:.1f}%)",
            note="whole-run difference, includes noise"),
        row("demo run wall time, evaluating (k=4 + greedy, metrics, lm-eval)",
            fmt(ev.wall_s if evaluate else None, ".1f", " s"),
            note=" ".join(filter(None, [failed(ev), busy_note(ev.other_cores)]))),
        row("time per validation, evaluating", fmt(per_val_eval, ".3f", " s")),
        row("evaluation cost share (samples + metrics + lm-eval)", fmt(None if eval_share is None else 100 * eval_share, ".2f", "%"),
            note="no target: the user's choice"),
        row("lm-eval: eval/time_s, summed", fmt(lm_eval_sum, ".3f", " s"),
            note=f"{len(ev.eval_s)} runs" if ev.eval_s else "lm-eval not installed (the [eval] extra)"),
        row(f"{settings.prompts} prompts, one batched generate", fmt(gen["batched_s"], ".3f", " s"),
            note=f"{gen['batched_tokens']:.0f} tokens"),
        row(f"{settings.prompts} prompts, {settings.prompts} single generate calls", fmt(gen["per_prompt_s"], ".3f", " s"),
            note=f"{gen['per_prompt_tokens']:.0f} tokens"),
        row("batched speed-up", fmt(speedup, ".2f", "x"), f">= {SPEEDUP_TARGET:.0f}x", verdict(speedup >= SPEEDUP_TARGET),
            busy_note(gen["other_cores"])),
    ]
    table = markdown_table(["measure", "value", "target", "met", "notes"], body)
    notes = [
        f"Demo: bundled defaults, trainer.total_training_steps={settings.demo_steps}, trainer.log_freq=1 (for timestamps).",
        f"generate: demo model (untrained), {settings.prompts} prompts from the demo's validation set, sampling "
        f"(temperature 1.0, top_k 50, top_p 0.7), max_new_tokens={settings.max_new_tokens}, 2 threads, median of "
        f"{settings.repeats} after a warm-up.",
    ]
    if args.quick:
        notes.append("--quick: one validation in a 6-step run (lm-eval at it); the shares are not representative.")
    if any("busy machine" in r[4] for r in body):
        notes.append("Rows marked 'busy machine' ran while other processes used the cores: rerun on an idle machine.")
    wall = time.perf_counter() - started
    text = "\n".join([f"## Validation generation ({'quick' if args.quick else 'full'})", "", table, "", "Notes:",
                      *(f"- {n}" for n in notes), f"- Benchmark wall time: {wall:.0f}s."])
    print(text, flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_generation.md").write_text(text + "\n")
        (args.out / "bench_generation.json").write_text(json.dumps({
            "settings": settings.__dict__, "with_samples": on.__dict__, "without_samples": off.__dict__,
            "generate": gen, "generation_share": gen_share, "sample_cost_share": sample_share,
            "batched_speedup": speedup, "report_share": report_share, "wall_s": wall,
            "evaluating": ev.__dict__, "evaluation_share": eval_share, "lm_eval_s": lm_eval_sum,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
