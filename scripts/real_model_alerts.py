"""Alerts that act, on a real model: SmolLM2-135M-Instruct fine-tuned on GSM8K-format word problems
whose training data hold a bad shard, trained three times with the same data and seed: the sample
alerts only warn, stop the run, or roll it back.

    python scripts/real_model_alerts.py [--model DIR] [--out DIR] [--actions warn stop rollback]
                                        [--good-steps 10] [--bad-steps 8] [--after-steps 6]
                                        [--images docs/images] [--reports-only] [KEY=VALUE ...]

The data (scripts/real_model_demo.py's word problems, unshuffled so the shard lands where it is
put): --good-steps batches of worked answers, then --bad-steps batches whose every answer is one
canned refusal ("I'm sorry, but I can't help with that."), the way a distillation job writes a
teacher's refusals or failed calls into its output, then --after-steps batches of worked answers
again. The validation data are clean, worded by a second annotator (as in real_model_demo.py).

Each run validates and checkpoints every 2 steps (`trainer.test_freq`, `trainer.save_freq`) and
differs from the others in `samples.alerts.action` alone (the drop of the watched metric warns in
all three: over 12 sampled answers it is too noisy to act on):
- warn: the run trains through the shard; the alerts are log lines and report entries;
- stop: the first alert ends the run with a checkpoint and exit code 3 (torchrun itself exits 1;
  `run_state.json` says "stopped");
- rollback: the run returns to the last checkpoint before the alert, skips the data up to the
  alert, halves the learning rate and goes on (at most 2 rollbacks, then it stops).

It prints the lines each run logged about its alerts, a table per validation (val loss,
last-number match, refusals among the sampled answers), the first alert against the first 10%
rise of the validation loss, and the compute `stop` saved; writes the reports, the comparison
page (OUT/compare.html) and, with --images, their screenshots. The checkpoints are removed at the
end (each holds 1.6 GB of weights and optimizer state).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

from real_model_demo import (  # noqa: E402
    DEFAULT_MODEL, ROOT, child_env, ensure_model, pages, read_samples, train_command, word_problem,
)
from regression_demo import first_loss_rise  # noqa: E402

from trainer.report.shared import read_metric_branches, read_run_state  # noqa: E402
from trainer.tracking.file import read_records  # noqa: E402

REFUSAL = "I'm sorry, but I can't help with that."
ACTIONS = ("warn", "stop", "rollback")
# The lines a run logs about its alerts and what they did (trainer/history.py, trainer/run_actions.py).
ACTION_LINE = re.compile(r"sample alert|rolled back|stopped by|no checkpoint is written")
LOG_PREFIX = re.compile(r"^(\[rank\d+\]:?\s*)?[\d-]+ [\d:,]+ ")  # torchrun's rank tag, the log's time stamp


# ----------------------------------------------------------------------------- data
def write_data(out: Path, good_steps: int, bad_steps: int, after_steps: int, batch: int, val_rows: int,
               seed: int = 0) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)

    def rows(n: int, annotator: int = 0) -> list[dict]:
        return [word_problem(rng, annotator) for _ in range(n)]

    bad = [{**row, "answer": REFUSAL} for row in rows(bad_steps * batch)]
    files = {"train": out / "train.parquet", "val": out / "val.parquet"}
    pq.write_table(pa.Table.from_pylist([*rows(good_steps * batch), *bad, *rows(after_steps * batch)]), files["train"])
    # The validation answers are worded by a second annotator (scripts/real_model_demo.py): the
    # validation loss keeps a floor, as a real one does, instead of falling to ~0.06 on answers
    # worded as the training ones, where any change of the model shows.
    pq.write_table(pa.Table.from_pylist(rows(val_rows, annotator=1)), files["val"])
    return files


# ----------------------------------------------------------------------------- runs
def run_overrides(action: str, args: argparse.Namespace) -> list[str]:
    return [
        "data.shuffle=false", f"trainer.test_freq={args.every}", f"trainer.save_freq={args.every}",
        "trainer.max_ckpt_to_keep=3", "trainer.checkpoint.save_contents=[model,optimizer,extra]",
        # The final number: right answers in other words count (exact match is printed beside it).
        "samples.alerts.metric=last_number_match", f"samples.alerts.action={action}",
        # A drop of the metric over 12 sampled answers is noise as often as not (it fired at step 8,
        # before the shard, when 4 of 12 right answers became 0 of 12): it warns, the rest act.
        "samples.alerts.actions.last_number_match_drop=warn",
        *args.overrides,
    ]


def train(cmd: list[str], log_file: Path, run_dir: Path) -> tuple[float, int]:
    """Wall seconds and exit code; a run the alerts stopped is not a failure."""
    started = time.perf_counter()
    with open(log_file, "w") as log:
        code = subprocess.run(cmd, cwd=ROOT, env=child_env(1), stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - started
    if code != 0 and read_run_state(run_dir).get("status") != "stopped":
        tail = log_file.read_text(errors="replace").splitlines()[-25:]
        raise SystemExit(f"error: training failed (exit {code}), log {log_file}:\n" + "\n".join(tail))
    return seconds, code


# ----------------------------------------------------------------------------- what happened
def refusal_share(run_dir: Path) -> dict[int, float]:
    """Per validation, the share of sampled answers that are the refusal (kept records only)."""
    per_step: dict[int, list[bool]] = {}
    for s in read_samples(run_dir)[0]:
        if s.get("discarded"):
            continue
        per_step.setdefault(s["step"], []).append("sorry" in str(s.get("generation", "")).lower())
    return {step: sum(v) / len(v) for step, v in per_step.items()}


def kept_validations(run_dir: Path) -> dict[int, dict]:
    """step -> the validation metrics the run kept (a rolled-back run's discarded steps left out,
    as its report does)."""
    return {step: m for step, m in read_metric_branches(run_dir).kept.items() if "val/loss" in m}


def alert_steps(run_dir: Path) -> list[int]:
    steps = []
    for record in read_records(run_dir / "samples.jsonl"):
        if record.get("kind") == "alert" and record["step"] not in steps:
            steps.append(record["step"])
    return steps


def optimizer_steps(run_dir: Path) -> int:
    """Steps the run trained, the discarded ones of a rollback included (one train/loss record each)."""
    return sum("train/loss" in record for record in read_records(run_dir / "metrics.jsonl"))


def fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary(run_dirs: dict[str, Path], seconds: dict[str, float], bad_window: tuple[int, int], every: int = 2) -> str:
    lines, finals = [], []
    for action, run in run_dirs.items():
        state = read_run_state(run)
        logged = [LOG_PREFIX.sub("", line) for line in (run.parent / f"{run.name}.log").read_text(errors="replace").splitlines()
                  if ACTION_LINE.search(line) and "rank1" not in line]
        lines += [f"## {action}", "", "```", *logged[:12], "```", ""]
        lines += ["| step | val/loss | exact_match | last_number_match | refusals among the samples |", "|---|---|---|---|---|"]
        refusals = refusal_share(run)
        validations = kept_validations(run)
        for step, m in sorted(validations.items()):
            lines.append(f"| {step} | {m['val/loss']:.4f} | {fmt(m.get('val/metric/exact_match'), '.3f')} | "
                         f"{fmt(m.get('val/metric/last_number_match'), '.3f')} | {refusals.get(step, 0.0):.0%} |")
        loss_rise, best = first_loss_rise({s: m["val/loss"] for s, m in validations.items()}, after=bad_window[0] - 1)
        alerts = alert_steps(run)
        first = next((s for s in alerts if s >= bad_window[0]), None)
        if first is None:
            lead = "no alert after the shard began"
        elif loss_rise is None:
            lead = f"the validation loss never rose 10% above its best ({best:.4f}) after the shard began"
        else:
            lead = f"the validation loss rose 10% above its best ({best:.4f}) at step {loss_rise}: a lead of {(loss_rise - first) // every} validations"
        lines += ["", f"- bad shard: steps {bad_window[0]}-{bad_window[1]}; alerts at steps {alerts or 'none'}; first from the shard on: "
                  f"{first}; {lead}",
                  f"- {state.get('status')} after {optimizer_steps(run)} optimizer steps, {seconds.get(action, float('nan')):.0f} s"
                  + (f"; {state['reason']}" if state.get("reason") else ""), ""]
        if validations:
            step, m = max(validations.items())
            finals.append(f"| {action} | {state.get('status')} | {step} | {optimizer_steps(run)} | {fmt(seconds.get(action), '.0f')} | "
                          f"{m['val/loss']:.4f} | {fmt(m.get('val/metric/exact_match'), '.3f')} | "
                          f"{fmt(m.get('val/metric/last_number_match'), '.3f')} | {refusals.get(step, 0.0):.0%} |")
    lines += ["## side by side (the last validation of each run)", "",
              "| action | status | step | optimizer steps run | seconds | val/loss | exact_match | last_number_match | refusals |",
              "|---|---|---|---|---|---|---|---|---|", *finals]
    if seconds.get("warn") and seconds.get("stop"):
        lines += ["", f"stop ended {1 - seconds['stop'] / seconds['warn']:.0%} sooner than warn "
                      f"({seconds['stop']:.0f} s against {seconds['warn']:.0f} s)"]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"SmolLM2-135M-Instruct HF directory (default {DEFAULT_MODEL})")
    parser.add_argument("--out", type=Path, default=Path("real_model_alerts"), help="where the data, runs and pages go")
    parser.add_argument("--actions", nargs="+", choices=ACTIONS, default=list(ACTIONS))
    parser.add_argument("--good-steps", type=int, default=10, help="steps of worked answers before the bad shard")
    parser.add_argument("--bad-steps", type=int, default=8, help="steps of the bad shard (every answer the refusal)")
    parser.add_argument("--after-steps", type=int, default=6, help="steps of worked answers after it")
    parser.add_argument("--every", type=int, default=2, help="steps between validations and between checkpoints")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch", type=int, default=4, help="sequences per optimizer step")
    parser.add_argument("--val-samples", type=int, default=12, help="sampled answers per validation (one per prompt)")
    parser.add_argument("--val-rows", type=int, default=16, help="validation rows (the loss is over all of them)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--images", type=Path, default=None, help="save screenshots of the pages here (e.g. docs/images)")
    parser.add_argument("--reports-only", action="store_true", help="only redo the pages and the summary from an earlier call's runs")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more config overrides for every run")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    steps = args.good_steps + args.bad_steps + args.after_steps
    bad_window = (args.good_steps + 1, args.good_steps + args.bad_steps)
    run_dirs = {action: out / action for action in args.actions}
    seconds: dict[str, float] = {}
    times_file = out / "seconds.json"
    if not args.reports_only:
        model = ensure_model(args.model.expanduser().resolve())
        data = write_data(out / "data", args.good_steps, args.bad_steps, args.after_steps, args.batch, args.val_rows)
        for action, run in run_dirs.items():
            shutil.rmtree(run, ignore_errors=True)
            cmd = train_command(model, data, run, args.lr, steps, args.batch, args.val_samples, args.max_new_tokens,
                                0, args.seed, run_overrides(action, args))
            print(f"training {action}: {steps} steps, bad shard at steps {bad_window[0]}-{bad_window[1]} ...", file=sys.stderr)
            seconds[action], code = train(cmd, out / f"{run.name}.log", run)
            print(f"  {seconds[action]:.0f} s, exit code {code}", file=sys.stderr)
            for checkpoint in run.glob("global_step_*"):
                shutil.rmtree(checkpoint, ignore_errors=True)
        times_file.write_text(json.dumps(seconds))
    else:
        run_dirs = {action: run for action, run in run_dirs.items() if run.is_dir()}
        seconds = json.loads(times_file.read_text()) if times_file.is_file() else {}
    made = pages(list(run_dirs.values()), out, args.images, prefix="real-model-alerts")
    text = summary(run_dirs, seconds, bad_window, args.every)
    (out / "summary.md").write_text(text + "\n")
    print(text)
    print(json.dumps({k: str(v) for k, v in made.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
