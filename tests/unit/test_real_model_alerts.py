"""scripts/real_model_alerts.py without the real model: the bad shard lands on the steps it is
meant for, each of the three command lines is a valid config differing only in the action, and
the summary reads what a rolled-back run kept (not its discarded steps)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
from hydra import compose, initialize_config_module

from config.loading import resolve
from config.schema import SFTConfig
from helpers import make_tiny_model
from trainer.cli import appends_as_overrides

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import real_model_alerts as alerts  # noqa: E402


def test_the_bad_shard_fills_exactly_its_steps(tmp_path):
    files = alerts.write_data(tmp_path, good_steps=3, bad_steps=2, after_steps=1, batch=4, val_rows=5)
    train = pq.read_table(files["train"]).to_pylist()
    assert len(train) == 24
    refused = [i for i, row in enumerate(train) if row["answer"] == alerts.REFUSAL]
    assert refused == list(range(12, 20))  # steps 4-5 of an unshuffled run with 4 rows a step
    assert all(row["answer"].split("\n")[-1].startswith("####") for i, row in enumerate(train) if i not in refused)
    val = pq.read_table(files["val"]).to_pylist()
    assert len(val) == 5 and not any(row["answer"] == alerts.REFUSAL for row in val)


def test_the_three_runs_differ_in_the_action_alone(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    data = alerts.write_data(tmp_path / "data", 1, 1, 1, batch=4, val_rows=4)
    args = argparse.Namespace(every=2, overrides=["optim.lr=3e-5"])
    configs = {}
    for action in alerts.ACTIONS:
        cmd = alerts.train_command(model, data, tmp_path / action, 2e-5, 3, 4, 2, 16, 0, 1, alerts.run_overrides(action, args))
        overrides = appends_as_overrides(cmd[cmd.index("trainer.fsdp_sft_trainer") + 1:])  # as the CLI reads them
        with initialize_config_module(config_module="config", version_base="1.3"):
            cfg = resolve(compose("sft_trainer", overrides=overrides), SFTConfig, overrides, {}, 2).config
        configs[action] = cfg
        assert cfg.samples.alerts.action == action and cfg.data.shuffle is False
        assert (cfg.trainer.save_freq, cfg.trainer.test_freq, cfg.optim.lr) == (2, 2, 3e-5)  # the user's overrides win
        assert "optimizer" in cfg.trainer.checkpoint.save_contents  # a rollback restores the optimizer too
        assert cfg.samples.alerts.metric == "last_number_match"
        assert cfg.samples.alerts.action_for("last_number_match_drop") == "warn"
        assert cfg.samples.alerts.action_for("collapse") == action
    assert configs["warn"].trainer.default_local_dir != configs["stop"].trainer.default_local_dir


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_summary_counts_what_a_rolled_back_run_kept(tmp_path):
    run = tmp_path / "rollback"
    run.mkdir()
    _write(run / "metrics.jsonl", [
        {"step": 2, "val/loss": 1.0}, {"step": 2, "val/metric/last_number_match": 0.25},
        {"step": 4, "val/loss": 1.05}, {"step": 4, "val/metric/last_number_match": 0.0},  # discarded below
        {"step": 4, "val/rollback": 1.0, "val/rollback_to_step": 2.0},  # as trainer/run_actions.py logs it
        {"step": 4, "val/loss": 0.9}, {"step": 4, "val/metric/last_number_match": 0.5},
        {"step": 6, "val/loss": 1.2},
    ])
    _write(run / "samples.jsonl", [
        {"step": 2, "prompt_id": "a", "generation": "#### 4"},
        {"step": 4, "prompt_id": "a", "generation": "I'm sorry, but I can't help with that.", "discarded": True},
        {"kind": "alert", "step": 4, "rule": "collapse", "message": "near-identical", "discarded": True},
        {"step": 4, "prompt_id": "a", "generation": "#### 5"},
        {"step": 6, "prompt_id": "a", "generation": "I'm sorry, but I can't."},
    ])
    (run / "run_state.json").write_text(json.dumps({"status": "finished"}))
    (tmp_path / "rollback.log").write_text(
        "[rank0]: 2026-12-06 14:51:16,178 WARNING trainer.history: sample alert [collapse] at step 4 (validation, all prompts): near-identical\n"
        "[rank1]: 2026-12-06 14:51:16,178 WARNING trainer.history: sample alert [collapse] at step 4 (validation, all prompts): near-identical\n"
        "2026-12-06 14:51:17,444 ERROR trainer: stopped by sample alert [collapse] at step 4 (all prompts): near-identical; exit code 3\n"
        "[rank0]: 2026-12-06 14:51:16,178 INFO trainer: step 4: train/loss=0.1\n")
    validations = alerts.kept_validations(run)
    assert {s: m["val/loss"] for s, m in validations.items()} == {2: 1.0, 4: 0.9, 6: 1.2}
    assert validations[4]["val/metric/last_number_match"] == 0.5
    assert alerts.refusal_share(run) == {2: 0.0, 4: 0.0, 6: 1.0}
    text = alerts.summary({"rollback": run}, {"rollback": 12.0}, bad_window=(3, 4))
    assert "WARNING trainer.history: sample alert [collapse] at step 4 (validation" in text  # the rule's name kept
    assert text.count("sample alert [collapse] at step 4 (validation") == 1  # rank 0's line only
    assert "ERROR trainer: stopped by sample alert [collapse] at step 4" in text and "train/loss" not in text
    assert "| 4 | 0.9000 | - | 0.500 | 0% |" in text and "| 6 | 1.2000 | - | - | 100% |" in text
    assert "rose 10% above its best (0.9000) at step 6: a lead of 1 validations" in text
    assert "| rollback | finished | 6 | 0 | 12 | 1.2000 |" in text  # the last validation kept
