"""Do sample alerts warn before the loss does? Train the offline demo, inject a regression, and
report at which step the first sample alert fired and at which step validation loss first rose
10% above its best.

    python scripts/regression_demo.py [--spike-step 900] [--spike-factor 30] [--ramp-steps 100]
                                      [--steps 1200] [--test-freq 20] [--val-samples 16] [--out DIR]

The regression is a learning-rate spike: from `--spike-step` the learning rate ramps up to
`--spike-factor` times its schedule over `--ramp-steps` steps (a mis-set warm restart, say).
Everything else is the demo config. The run directory keeps samples.jsonl, metrics.jsonl and
report.html, where the alerts sit in the timelines beside the answers that changed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_module  # noqa: E402

from config.env import DistEnv  # noqa: E402
from config.loading import resolve  # noqa: E402
from config.schema import SFTConfig  # noqa: E402
from trainer.cli import setup_logging  # noqa: E402
from trainer.distributed import init_distributed, teardown  # noqa: E402
from trainer.fsdp_sft_trainer import FSDPSFTTrainer  # noqa: E402
from trainer.history import HISTORY_FILE, read_records  # noqa: E402
from trainer.tracking.file import read_metrics  # noqa: E402


def inject_lr_spike(scheduler, start: int, factor: float, ramp: int) -> None:
    def spiked(base):
        def lr_lambda(step: int) -> float:
            if step < start:
                return base(step)
            return base(step) * (1 + (factor - 1) * min(1.0, (step - start + 1) / max(ramp, 1)))

        return lr_lambda

    scheduler.lr_lambdas = [spiked(f) for f in scheduler.lr_lambdas]


def first_loss_rise(val_loss: dict[int, float], after: int, rise: float = 0.10) -> tuple[int | None, float]:
    best = float("inf")
    for step, loss in sorted(val_loss.items()):
        if step > after and loss > best * (1 + rise):
            return step, best
        best = min(best, loss)
    return None, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spike-step", type=int, default=900)
    parser.add_argument("--spike-factor", type=float, default=30.0)
    parser.add_argument("--ramp-steps", type=int, default=100)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--test-freq", type=int, default=20)
    parser.add_argument("--val-samples", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    run_dir = args.out or Path(tempfile.mkdtemp(prefix="regression_demo_"))
    overrides = [
        f"trainer.default_local_dir={run_dir}", "trainer.resume_mode=disable", f"trainer.total_training_steps={args.steps}",
        f"trainer.test_freq={args.test_freq}", f"trainer.max_val_samples={args.val_samples}", "trainer.save_freq=-1",
        "trainer.logger=[file]", "trainer.export_hf_model=false",
    ]
    with initialize_config_module(config_module="config", version_base="1.3"):
        cfg = compose("sft_trainer", overrides=overrides)
    typed = resolve(cfg, SFTConfig, overrides, {}).config
    setup_logging(30, 0)  # warnings only: the alerts themselves are warnings
    trainer = FSDPSFTTrainer(typed, init_distributed(DistEnv(0, 0, 1, False), "cpu"))
    inject_lr_spike(trainer.scheduler, args.spike_step, args.spike_factor, args.ramp_steps)
    trainer.fit()
    teardown()

    val_loss = {s: m["val/loss"] for s, m in read_metrics(run_dir).items() if "val/loss" in m}
    alerts = [r for r in read_records(run_dir / HISTORY_FILE) if r["kind"] == "alert"]
    before = [a for a in alerts if a["step"] <= args.spike_step]
    after = [a for a in alerts if a["step"] > args.spike_step]
    loss_step, best = first_loss_rise(val_loss, args.spike_step)
    validation_steps = sorted(val_loss)

    print(f"\nregression: learning rate ramping to x{args.spike_factor:g} from step {args.spike_step} over {args.ramp_steps} steps")
    print(f"validations every {args.test_freq} steps, {args.val_samples} samples each; run directory {run_dir}")
    print(f"alerts before the regression (false alarms): {len(before)}" + (f" ({', '.join(sorted({a['rule'] for a in before}))})" if before else ""))
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
    print(f"report: {run_dir / 'report.html'}")


if __name__ == "__main__":
    main()
