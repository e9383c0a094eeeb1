"""Do sample alerts warn before the loss does? Train the offline demo, inject a regression, and
report at which step the first sample alert fired and at which step validation loss first rose
10% above its best.

    python scripts/regression_demo.py [--task mixed|arithmetic] [--regression bad_shard|lr_spike]
                                      [--at STEP] [--steps N] [--test-freq 20] [--val-samples 16]
                                      [--out DIR] [key=value ...] [--seed 1 [2 ...]]

With several seeds, stage 1 is trained once and stage 2 runs once per seed, then one summary line
per seed shows how robust the lead is (config overrides go before --seed).

--task mixed (the default) is the situation sample logging is for. Stage 1 trains the demo as
`python -m trainer.fsdp_sft_trainer --config-name demo` does (two-digit addition, 1,224 steps). Stage 2 fine-tunes
that model on a mix of the additions and open-ended prompts ("Name 3 numbers, #5:"), as real SFT
data mixes tasks with one right answer and tasks with many: the validation loss then sits well
above zero, like a real one, because no model can predict which numbers get named. The
regression is injected in stage 2. --task arithmetic runs it in stage 1 on the additions alone,
where the loss is close to zero (see docs/report.md for why that favours the loss).

Regressions:
- bad_shard (default): from step --at, the addition examples of the training data come from a
  shard whose responses are misaligned by one row (each prompt paired with the next prompt's
  answer), the kind of join bug that slips into a data pipeline. The model unlearns addition
  while the open-ended part of the loss stays where it was.
- lr_spike: from step --at the learning rate ramps up to --spike-factor times its schedule over
  --ramp-steps steps (a mis-set warm restart, say).

The run directory keeps samples.jsonl, metrics.jsonl and report.html of each stage, where the
alerts sit in the timelines beside the answers that changed.
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_module  # noqa: E402

from config.env import DistEnv  # noqa: E402
from config.loading import resolve  # noqa: E402
from config.schema import SFTConfig  # noqa: E402
from trainer.cli import setup_logging  # noqa: E402
from trainer.data import SFTBatches, load_sft_examples  # noqa: E402
from trainer.distributed import init_distributed, teardown  # noqa: E402
from trainer.fsdp_sft_trainer import FSDPSFTTrainer  # noqa: E402
from trainer.history import HISTORY_FILE  # noqa: E402
from trainer.tracking.file import read_metrics, read_records  # noqa: E402

DEMO_DATA = Path(__file__).resolve().parents[1] / "config" / "demo_assets" / "arithmetic"


# ----------------------------------------------------------------------------- data
def open_ended_rows(n: int, rng: random.Random) -> list[dict]:
    """Requests with many right answers: the loss on them cannot fall below ln(100) per number.
    Each is numbered, so the sample prompts are distinct."""
    rows = []
    for i in range(n):
        count = rng.randint(2, 4)
        rows.append({"prompt": f"Name {count} numbers, #{i}:", "response": " ".join(str(rng.randrange(100)) for _ in range(count))})
    return rows


def misaligned(rows: list[dict]) -> list[dict]:
    """Each addition paired with the next addition's answer; other rows untouched."""
    sums = [i for i, r in enumerate(rows) if "+" in r["prompt"]]
    out = [dict(r) for r in rows]
    for i, j in zip(sums, sums[1:] + sums[:1]):
        out[i]["response"] = rows[j]["response"]
    return out


def mixed_task(out: Path, open_per_sum: dict[str, float], seed: int) -> dict[str, Path]:
    """The demo's additions mixed with open-ended prompts. The validation file interleaves the two,
    so the sample prompts (its first rows) hold both kinds."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in ("train", "val"):
        sums = pq.read_table(DEMO_DATA / f"{split}.parquet").to_pylist()
        extra = open_ended_rows(round(len(sums) * open_per_sum[split]), rng)
        if split == "train":
            rows = sums + extra
            rng.shuffle(rows)
        else:
            per = max(1, round(len(extra) / len(sums)))
            rows = [r for i, s in enumerate(sums) for r in [s, *extra[i * per : (i + 1) * per]]] + extra[len(sums) * per :]
        files[split] = out / f"{split}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), files[split])
    return files


# ----------------------------------------------------------------------------- regressions
def inject_lr_spike(trainer: FSDPSFTTrainer, start: int, factor: float, ramp: int) -> None:
    def spiked(base):
        def lr_lambda(step: int) -> float:
            if step < start:
                return base(step)
            return base(step) * (1 + (factor - 1) * min(1.0, (step - start + 1) / max(ramp, 1)))

        return lr_lambda

    trainer.scheduler.lr_lambdas = [spiked(f) for f in trainer.scheduler.lr_lambdas]


class ShardSwitch:
    """The trainer's batches, drawn from `bad` instead of `good` from step `start` on (same rows,
    same order: only the responses of the bad shard differ)."""

    def __init__(self, trainer: FSDPSFTTrainer, bad: SFTBatches, start: int):
        self.trainer, self.good, self.bad, self.start = trainer, trainer.batches, bad, start
        self.steps_per_epoch = self.good.steps_per_epoch

    def micro_batches(self, epoch: int, index: int):
        return (self.bad if self.trainer.run.step >= self.start else self.good).micro_batches(epoch, index)


def inject_bad_shard(trainer: FSDPSFTTrainer, shard: Path, start: int) -> None:
    cfg = trainer.cfg
    examples = load_sft_examples(str(shard), "bad shard", trainer.tokenizer, cfg.data)
    bad = SFTBatches(examples, cfg.data, cfg.trainer.seed, trainer.dist.rank, trainer.dist.world_size,
                     trainer.tokenizer.pad_token_id)
    trainer.batches = ShardSwitch(trainer, bad, start)


# ----------------------------------------------------------------------------- runs
def train(overrides: list[str], regression=None) -> None:
    with initialize_config_module(config_module="config", version_base="1.3"):
        cfg = compose("demo", overrides=overrides)
    typed = resolve(cfg, SFTConfig, overrides, {}).config
    trainer = FSDPSFTTrainer(typed, init_distributed(DistEnv(0, 0, 1, False), "cpu"))
    if regression:
        regression(trainer)
    trainer.fit()


def first_loss_rise(val_loss: dict[int, float], after: int, rise: float = 0.10) -> tuple[int | None, float]:
    best = float("inf")
    for step, loss in sorted(val_loss.items()):
        if step > after and loss > best * (1 + rise):
            return step, best
        best = min(best, loss)
    return None, best


def report(run_dir: Path, at: int, what: str, test_freq: int, samples: int) -> str:
    """Prints what happened in one run; returns it in one line."""
    val_loss = {s: m["val/loss"] for s, m in read_metrics(run_dir).items() if "val/loss" in m}
    alerts = [r for r in read_records(run_dir / HISTORY_FILE) if r["kind"] == "alert"]
    before = [a for a in alerts if a["step"] <= at]
    after = [a for a in alerts if a["step"] > at]
    loss_step, best = first_loss_rise(val_loss, at)
    validation_steps = sorted(val_loss)

    print(f"\nregression: {what}")
    print(f"validations every {test_freq} steps, {samples} samples each; run directory {run_dir}")
    where = sorted({(a["step"], a["rule"]) for a in before})
    print(f"alerts before the regression: {len(before)}"
          + (" (" + ", ".join(f"{rule} at step {step}" for step, rule in where) + ")" if before else ""))
    if after:
        first = after[0]
        print(f"first sample alert:      step {first['step']}  [{first['rule']}] {first['message']}")
    else:
        print("first sample alert:      none")
    print("first val-loss rise 10%: " + (f"step {loss_step}  (val/loss {val_loss[loss_step]:.4f}, best before {best:.4f})" if loss_step else "none"))
    if after and loss_step:
        lead = validation_steps.index(loss_step) - validation_steps.index(after[0]["step"])
        verdict = "samples warned first" if lead > 0 else ("at the same validation" if lead == 0 else "the loss warned first")
        print(f"=> {verdict}: {abs(lead)} validation(s) ({loss_step - after[0]['step']} steps) apart")
        verdict += f" by {abs(lead)} validation(s)" if lead else ""
    elif after:
        print(f"=> samples warned; the validation loss never rose 10% (last {val_loss[validation_steps[-1]]:.4f})")
        verdict = "samples warned, the loss never rose 10%"
    else:
        verdict = "no sample alert"
    earlier = (f"earlier alerts: {', '.join(sorted({a['rule'] for a in before}))}, the last at step {before[-1]['step']}"
               if before else "no earlier alert")
    summary = (f"{verdict} (first alert {'step ' + str(after[0]['step']) + ' [' + after[0]['rule'] + ']' if after else 'none'}, "
               f"loss +10% {'at step ' + str(loss_step) if loss_step else 'never'}; {earlier})")
    print(f"report: {run_dir / 'report.html'}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("mixed", "arithmetic"), default="mixed")
    parser.add_argument("--regression", choices=("bad_shard", "lr_spike"), default="bad_shard")
    parser.add_argument("--at", type=int, default=900, help="step of the regression")
    parser.add_argument("--steps", type=int, default=1200, help="steps of the run with the regression")
    parser.add_argument("--lr", type=float, default=1e-4, help="stage 2's peak learning rate (mixed)")
    parser.add_argument("--spike-factor", type=float, default=30.0)
    parser.add_argument("--ramp-steps", type=int, default=100)
    parser.add_argument("--test-freq", type=int, default=20)
    parser.add_argument("--val-samples", type=int, default=16)
    parser.add_argument("--open-per-sum", type=float, default=1.0, help="open-ended rows per addition, training data (mixed)")
    parser.add_argument("--val-open-per-sum", type=float, default=2.0, help="the same in the validation data (mixed)")
    parser.add_argument("--seed", type=int, nargs="+", default=[1],
                        help="seed of the run with the regression and of the open-ended rows; several: one run each "
                             "(stage 1 is trained once) and a summary")
    parser.add_argument("--init", type=Path, default=None, help="a model to start stage 2 from instead of training stage 1")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="more key=value config overrides for the run with the regression")
    args = parser.parse_args()
    mixed = args.task == "mixed"
    at, steps = args.at, args.steps

    out = args.out or Path(tempfile.mkdtemp(prefix="regression_demo_"))
    setup_logging(30, 0)  # warnings only: the alerts themselves are warnings
    common = ["trainer.resume_mode=disable", "trainer.logger=[file]", "trainer.save_freq=-1",
              f"trainer.test_freq={args.test_freq}", f"trainer.max_val_samples={args.val_samples}"]
    if args.regression == "bad_shard":
        what = f"from step {at}, addition responses misaligned by one row in the training data"
    else:
        what = f"learning rate ramping to x{args.spike_factor:g} from step {at} over {args.ramp_steps} steps"

    summaries = {}
    try:
        init = args.init
        if mixed and init is None:  # stage 1: the demo, as the main command trains it
            print("stage 1: training the demo (two-digit addition)", flush=True)
            train([f"trainer.default_local_dir={out / 'demo'}", *common])
            init = out / "demo" / "hf_model"
        for seed in args.seed:
            name = ("mixed" if mixed else "run") + (f"_seed{seed}" if len(args.seed) > 1 else "")
            data_dir = out / "data" / (f"seed{seed}" if len(args.seed) > 1 else "")
            data = (mixed_task(data_dir, {"train": args.open_per_sum, "val": args.val_open_per_sum}, seed) if mixed
                    else {"train": DEMO_DATA / "train.parquet"})
            if args.regression == "bad_shard":  # the same training rows, in the same order, with misaligned sums
                shard = data_dir / "train_misaligned.parquet"
                shard.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(pa.Table.from_pylist(misaligned(pq.read_table(data["train"]).to_pylist())), shard)
                regression = functools.partial(inject_bad_shard, shard=shard, start=at)
            else:
                regression = functools.partial(inject_lr_spike, start=at, factor=args.spike_factor, ramp=args.ramp_steps)
            run_dir = out / name
            # total_training_steps only stops a run early; enough epochs for `steps` make the LR
            # schedule span about the run (the demo's 64 rows a step).
            epochs = math.ceil(steps / (pq.read_metadata(data["train"]).num_rows // 64))
            run = [f"trainer.default_local_dir={run_dir}", f"trainer.total_training_steps={steps}",
                   f"trainer.total_epochs={epochs}", f"trainer.seed={seed}", "trainer.export_hf_model=false", *common]
            if mixed:
                print(f"stage 2 (seed {seed}): the additions mixed with open-ended prompts, with the regression", flush=True)
                run += [f"model.partial_pretrain={init}", f"data.train_files={data['train']}",
                        f"data.val_files={data['val']}", "data.max_length=40", f"optim.lr={args.lr}"]
            train([*run, *args.overrides], regression)
            summaries[seed] = report(run_dir, at, what, args.test_freq, args.val_samples)
    finally:
        teardown()
    if len(summaries) > 1:
        print("\nsummary")
        for seed, line in summaries.items():
            print(f"seed {seed}: {line}")


if __name__ == "__main__":
    main()
