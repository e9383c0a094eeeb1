"""Alerts that act, on 2 gloo ranks (issue 25): rollback, max_rollbacks then stop (exit code 3
on every rank, checkpoint and reason), an exact relaunch after a killed rolled-back run, the best
checkpoint kept through pruning, early stopping and stop_at; a rollback in GRPO. Alerts are injected on chosen sample
events by tests/distributed/alert_entry.py; the real rules are set so that they never fire."""

import json
import re
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, child_env, read_metrics
from trainer.checkpoint import load_model_state

pytestmark = pytest.mark.distributed
ENTRY = str(ROOT / "tests" / "distributed" / "alert_entry.py")
QUIET_RULES = [  # no rule fires by itself on the untrained tiny model: only injected alerts act
    "samples.alerts.repetition_threshold=1.0", "samples.alerts.limit_hit_share=1.0", "samples.alerts.collapse_similarity=1.0",
    "samples.alerts.length_change_ratio=1000", "samples.alerts.drift_share=1.0", "samples.alerts.stable_events=1000",
    "samples.alerts.metric_drop=1.0", "samples.alerts.forgotten_share=1.0",
]


def launch(model, data, run_dir, *extra, env=None):
    """12 steps (3 epochs of 4), validation with 2 samples and a checkpoint every 2 steps."""
    args = [
        f"model.partial_pretrain={model}", f"data.train_files={data['train']}", f"data.val_files={data['val']}",
        f"trainer.default_local_dir={run_dir}", "trainer.logger=[console,file]", "data.max_length=24",
        "data.prompt_key=prompt", "data.response_key=response", "optim.lr=1e-3", "optim.lr_scheduler=constant",
        "data.train_batch_size=16", "data.micro_batch_size_per_gpu=4", "trainer.max_val_samples=2",
        "generation.max_new_tokens=4", "trainer.test_freq=2", "trainer.save_freq=2", "trainer.total_epochs=3",
        "trainer.export_hf_model=false", *QUIET_RULES, *extra,
    ]
    return run_torchrun(args, env)


def run_torchrun(args, env=None):
    # no ALERT_* but the test's own: alert_entry.py injects alerts and delays exits by them
    full_env = {k: v for k, v in child_env().items() if not k.startswith("ALERT_")} | (env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", ENTRY, *args]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=240)


def worker_exit_codes(proc) -> list[int]:
    """torchrun exits 1 when a worker fails and lists each worker's own exit code."""
    return [int(c) for c in re.findall(r"^\s+exitcode\s+:\s*(-?\d+)", proc.stderr, flags=re.MULTILINE)]


def state(checkpoint) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


ROLLBACK = ["samples.alerts.actions.degeneration=rollback", "samples.alerts.rollback.max_rollbacks=1"]


def test_rollback_then_max_rollbacks_stop_and_a_killed_rolled_back_run_relaunches_exactly(tiny_model, tiny_data, tmp_path):
    # Alerts at the 3rd and 5th validations: steps 6 and, after rolling back to step 4, 8 again.
    a = tmp_path / "a"
    # rank 0 ends last: torchrun SIGTERMs it once rank 1 has exited 3, and it must still end with 3
    proc = launch(tiny_model, tiny_data, a, *ROLLBACK, env={"ALERT_INJECT": "degeneration@3,degeneration@5", "ALERT_SLOW_EXIT": "5"})
    out = proc.stdout + proc.stderr
    assert worker_exit_codes(proc) == [3, 3], out[-3000:]  # max_rollbacks reached: stop, on every rank
    assert "rolled back to" in out and "global_step_4" in out, out[-3000:]

    run_state = json.loads((a / "run_state.json").read_text())
    assert run_state["status"] == "stopped" and run_state["exit_code"] == 3
    assert run_state["stop"]["rule"] == "degeneration" and run_state["stop"]["step"] == 8 and run_state["stop"]["prompt"]
    assert "max_rollbacks=1" in run_state["reason"]
    stopped = state(a / "global_step_8")
    # 8 steps trained, the data of steps 5-6 skipped: the data position is that of step 10.
    assert (stopped["global_step"], stopped["epoch"], stopped["batch_in_epoch"]) == (8, 2, 2)
    control = stopped["control"]
    assert control["rollbacks"] == 1 and control["lr_scale"] == 0.5 and control["skipped_windows"] == [[5, 6]]
    assert stopped["scheduler"]["base_lrs"] == [5e-4, 5e-4]

    metrics = read_metrics(a)
    assert metrics[6]["val/rollback"] == 1.0 and metrics[6]["val/rollback_to_step"] == 4.0
    assert metrics[4]["train/lr"] == pytest.approx(1e-3)
    assert metrics[5]["train/lr"] == pytest.approx(5e-4) and metrics[8]["train/lr"] == pytest.approx(5e-4)
    records = [json.loads(line) for line in (a / "samples.jsonl").read_text().splitlines()]
    rollback = [r for r in records if r["kind"] == "rollback"]
    assert len(rollback) == 1 and rollback[0]["to_step"] == 4 and rollback[0]["skipped"] == [5, 6]
    discarded = [r for r in records if r.get("discarded")]
    assert discarded and {r["step"] for r in discarded} == {6}  # the first step 6's samples and alert
    assert sum(r["kind"] == "sample" and r["step"] == 6 and not r.get("discarded") for r in records) == 2
    # The live report, as the run left it: the rollback and the stop marked, the discarded steps apart.
    page = (a / "report.html").read_text(encoding="utf-8")
    assert "rolled back to step 4: degeneration, learning rate ×0.5, data of steps 5–6 skipped" in page
    assert 'id="run-stop"' in page and "stopped: degeneration at step 8" in page
    assert page.count('<tr class="action-row rollback-row" data-step="6" data-to-step="4">') == 2  # one per prompt
    assert len(re.findall(r'<tr class="event[^"]* discarded" id="p\d-e\d" data-step="6">', page)) == 2
    assert '<line class="rollback-marker" data-step="6" data-to-step="4"' in page
    assert '<g class="series discarded" data-series="train/loss"' in page

    # The same run killed right after its rollback (every rank, no clean-up), then relaunched:
    # it resumes the rolled-back run, not the discarded steps, and reaches the same weights.
    b = tmp_path / "b"
    killed = launch(tiny_model, tiny_data, b, *ROLLBACK,
                    env={"ALERT_INJECT": "degeneration@3", "ALERT_CRASH_AFTER_ROLLBACK": "1"})
    assert worker_exit_codes(killed) == [9, 9], (killed.stdout + killed.stderr)[-3000:]
    assert state(b / "global_step_4")["control"]["rollbacks"] == 1
    relaunched = launch(tiny_model, tiny_data, b, *ROLLBACK, env={"ALERT_INJECT": "degeneration@2"})
    assert worker_exit_codes(relaunched) == [3, 3], (relaunched.stdout + relaunched.stderr)[-3000:]
    assert "resumed from" in relaunched.stderr and "global_step_4" in relaunched.stderr
    assert state(b / "global_step_8") == stopped
    kept = [json.loads(line) for line in (b / "samples.jsonl").read_text().splitlines()]
    assert [r["to_step"] for r in kept if r["kind"] == "rollback"] == [4]  # the relaunch kept the run's history
    assert {r["step"] for r in kept if r.get("discarded")} == {6}
    ours, theirs = load_model_state(a / "global_step_8"), load_model_state(b / "global_step_8")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_keep_best_survives_pruning_and_early_stopping_and_stop_at_end_cleanly(tiny_model, tiny_data, tmp_path):
    # val/loss falls as the model learns: "best" by mode max is the first validation's checkpoint,
    # which pruning (max_ckpt_to_keep=1) would remove; no improvement for 2 validations stops at 6.
    run = tmp_path / "best"
    proc = launch(tiny_model, tiny_data, run, "trainer.keep_best.metric=val/loss", "trainer.keep_best.mode=max",
                  "trainer.early_stopping.metric=val/loss", "trainer.early_stopping.mode=max",
                  "trainer.early_stopping.patience=2", "trainer.max_ckpt_to_keep=1", "trainer.export_hf_model=true")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "early stopping at step 6" in proc.stderr
    stop = json.loads((run / "run_state.json").read_text())["stop"]  # for the report
    assert (stop["rule"], stop["step"]) == ("early_stopping", 6) and stop["message"].startswith("early stopping at step 6")
    assert "stopped: early_stopping at step 6" in (run / "report.html").read_text(encoding="utf-8")
    assert max(read_metrics(run)) == 6
    assert sorted(p.name for p in run.glob("global_step_*")) == ["global_step_2", "global_step_6"]
    best = json.loads((run / "best_checkpoint.json").read_text())
    assert best["step"] == 2 and best["metric"] == "val/loss"
    exported = (run / "best_hf_model" / "config.json").is_file() and (run / "hf_model" / "config.json").is_file()
    assert exported

    # stop_at: reached at the first validation; the run ends there, exit 0, with its checkpoint.
    target = tmp_path / "target"
    proc = launch(tiny_model, tiny_data, target, "trainer.stop_at.metric=val/loss", "trainer.stop_at.mode=min",
                  "trainer.stop_at.value=100")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "stop_at reached at step 2" in proc.stderr
    assert (target / "global_step_2" / "trainer_state.json").is_file() and max(read_metrics(target)) == 2


def test_rl_sample_logging_alert_rolls_back_and_the_run_finishes(tiny_model, rl_data, tmp_path):
    # GRPO, sample logging at steps 2 (interval), 3 (50%) and 4, a checkpoint every step: the
    # injected collapse at step 3 rolls back to step 2, step 3 runs again on a reshuffled prompt
    # order (skip_data=false), and the run goes on to its end.
    run = tmp_path / "grpo"
    proc = launch_rl(tiny_model, rl_data, run, "samples.alerts.actions.collapse=rollback", "samples.alerts.rollback.skip_data=false",
                     "trainer.keep_best.metric=val/reward/exact", env={"ALERT_TRAINER": "rl", "ALERT_INJECT": "collapse@2"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "rolled back to" in proc.stderr and "global_step_2" in proc.stderr and "data reshuffled" in proc.stderr
    final = state(run / "global_step_6")
    control = final["control"]
    assert control["rollbacks"] == 1 and control["lr_scale"] == 0.5
    assert control["data_seed_offset"] == 1 and control["skipped_windows"] == []
    assert (final["epoch"], final["batch_in_epoch"]) == (0, 6)  # 32 prompts, 4 a step: no step skipped
    metrics = read_metrics(run)
    assert metrics[3]["samples/rollback"] == 1.0 and metrics[3]["samples/rollback_to_step"] == 2.0
    assert json.loads((run / "best_checkpoint.json").read_text())["metric"] == "val/reward/exact"
    assert (run / "best_hf_model" / "config.json").is_file()


def launch_rl(model, data, run_dir, *extra, env=None):
    args = [
        "--config-name", "grpo_trainer", f"model.partial_pretrain={model}", f"data.train_files={data['train']}",
        f"data.val_files={data['val']}", f"trainer.default_local_dir={run_dir}", "rollout.max_new_tokens=4",
        "data.prompts_per_step=4", "actor.micro_batch_size_per_gpu=4", "trainer.total_training_steps=6", "trainer.test_freq=3",
        "optim.lr=1e-3", "reward.functions=[{name: exact, fn: arithmetic_exact_match}]",
        "logging.sample_logging.enabled=true", "logging.sample_logging.interval_steps=2",
        "logging.sample_logging.percent_of_max_steps=0.5", "logging.sample_logging.max_new_tokens=4",
        'logging.sample_logging.prompts=["1+1=","22+33="]', "trainer.logger=[console,file]", "trainer.save_freq=1",
        *QUIET_RULES, *extra,
    ]
    return run_torchrun(args, env)
