"""How often do sample alerts cry wolf, and how early do they warn? Runs the regression demo
(scripts/regression_demo.py) once per seed and prints one table: per seed, the validations
before the regression (healthy), the alerts raised in them, and the lead of the first alert after
the regression over the first 10% rise of the validation loss, in validations.

    python scripts/alert_precision.py [--seeds 1 2 3 4 5] [--out DIR] [regression_demo options]
    python scripts/alert_precision.py --quick          # a small run of each seed (the test suite's)
    python scripts/alert_precision.py --analyse DIR    # the table of runs already in DIR
    python scripts/alert_precision.py --analyse DIR --replay [--rule drift_share=0.5 ...]
                                                       # ... with the alerts today's rules (or these
                                                       # samples.alerts values) raise on those runs

The goals (issue 25): at most 1 alert per 10 healthy validations summed over the seeds, and the
first alert at least 2 validations before the loss rise on every seed. --quick checks the
plumbing on short runs of the arithmetic task; its numbers say nothing about those goals.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from config.schema import AlertConfig  # noqa: E402
from trainer.history import HISTORY_FILE, replay_alerts  # noqa: E402
from trainer.tracking.file import read_metrics, read_records  # noqa: E402
from regression_demo import first_loss_rise  # noqa: E402  # the loss rise the alerts race, as the demo reports it

FALSE_ALARM_GOAL = 0.1  # alerts per healthy validation, summed over the seeds
LEAD_GOAL = 2  # validations between the first alert and the loss rise, on every seed
# Plumbing only: 12 steps of the arithmetic task, short generations, a small validation set.
QUICK = ["--task", "arithmetic", "--at", "6", "--steps", "12", "--test-freq", "3", "--val-samples", "2",
         "generation.max_new_tokens=8", "data.val_max_samples=16"]


@dataclass
class SeedResult:
    seed: str
    healthy_validations: int
    healthy_alerts: int
    first_alert: Optional[int]  # step of the first alert after the regression
    loss_rise: Optional[int]  # step of the first validation loss 10% above its best, after the regression
    lead: Optional[int]  # validations from the first alert to the loss rise (> 0: the alert came first)


def analyse(run_dir: Path, at: int, seed: str, replay: Optional[AlertConfig] = None) -> SeedResult:
    """One run directory: validations up to step `at` are healthy; a rolled-back run's discarded
    records do not count. `replay`: count the alerts these rules raise on the recorded samples
    instead of the alerts recorded (exact for a warn-only run: trainer.history.replay_alerts)."""
    val_loss = {s: m["val/loss"] for s, m in read_metrics(run_dir).items() if "val/loss" in m}
    records = read_records(run_dir / HISTORY_FILE)
    if replay is not None:
        alerts = replay_alerts(records, replay)
    else:
        alerts = [r for r in records if r.get("kind") == "alert" and not r.get("discarded")]
    healthy = [s for s in sorted(val_loss) if s <= at]
    after = sorted(a["step"] for a in alerts if a["step"] > at)
    rise, _ = first_loss_rise(val_loss, at)
    steps = sorted(val_loss)
    lead = None
    if after and rise is not None and after[0] in steps:
        lead = steps.index(rise) - steps.index(after[0])
    return SeedResult(seed, len(healthy), sum(a["step"] <= at for a in alerts), after[0] if after else None, rise, lead)


def table(results: Sequence[SeedResult]) -> tuple[str, bool]:
    """The printed table and whether both goals are met."""
    lines = ["| seed | healthy validations | alerts in them | first alert after the regression | loss +10% | lead (validations) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.seed} | {r.healthy_validations} | {r.healthy_alerts} | {r.first_alert or 'none'} | "
                     f"{r.loss_rise or 'never'} | {'-' if r.lead is None else r.lead} |")
    validations = sum(r.healthy_validations for r in results)
    alerts = sum(r.healthy_alerts for r in results)
    rate = alerts / validations if validations else 0.0
    # A seed whose loss never rises 10% cannot be late: its lead counts as met when an alert came.
    leads_met = all((r.lead is not None and r.lead >= LEAD_GOAL) or (r.loss_rise is None and r.first_alert is not None)
                    for r in results)
    ok = rate <= FALSE_ALARM_GOAL and leads_met
    lines.append(f"\nfalse alarms: {alerts} in {validations} healthy validations ({rate:.2f} per validation, goal <= "
                 f"{FALSE_ALARM_GOAL}); lead >= {LEAD_GOAL} validations on every seed: {'yes' if leads_met else 'no'}; "
                 f"goals {'met' if ok else 'NOT met'}")
    return "\n".join(lines), ok


def run_dirs(out: Path, seeds: Sequence[int], task: str) -> dict[str, Path]:
    """Where regression_demo.py puts each seed's run (its own naming)."""
    name = "mixed" if task == "mixed" else "run"
    if len(seeds) == 1 and not (out / f"{name}_seed{seeds[0]}").is_dir():
        return {str(seeds[0]): out / name}
    return {str(s): out / f"{name}_seed{s}" for s in seeds}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--quick", action="store_true", help="short runs of the arithmetic task (plumbing only)")
    parser.add_argument("--analyse", type=Path, default=None, help="only read the runs already in this directory")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--replay", action="store_true", help="with --analyse: the alerts of today's rules on the recorded samples")
    parser.add_argument("--rule", action="append", default=[], metavar="KEY=VALUE",
                        help="with --replay: a samples.alerts value to try (e.g. drift_share=0.5); repeatable")
    args, demo_args = parser.parse_known_args(argv)
    demo_args = [*QUICK, *demo_args] if args.quick else demo_args
    known = argparse.ArgumentParser(add_help=False)
    known.add_argument("--task", default="mixed")
    known.add_argument("--at", type=int, default=900)
    demo = known.parse_known_args(demo_args)[0]

    out = args.analyse or args.out or Path(tempfile.mkdtemp(prefix="alert_precision_"))
    if args.analyse is None:
        cmd = [sys.executable, str(ROOT / "scripts" / "regression_demo.py"), *demo_args, "--out", str(out),
               "--seed", *map(str, args.seeds)]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    dirs = run_dirs(out, args.seeds, demo.task)
    missing = [str(d) for d in dirs.values() if not (d / "metrics.jsonl").is_file()]
    if missing:
        print(f"error: no run in {', '.join(missing)} (metrics.jsonl missing)", file=sys.stderr)
        return 2
    rules = None
    if args.replay:
        values = dict(item.split("=", 1) for item in args.rule)
        defaults = AlertConfig()
        rules = AlertConfig(**{k: v if getattr(defaults, k) is None else type(getattr(defaults, k))(v) for k, v in values.items()})
        rules.check()
    text, ok = table([analyse(d, demo.at, seed, rules) for seed, d in dirs.items()])
    print(text)
    return 0 if ok or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
