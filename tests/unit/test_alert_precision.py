"""scripts/alert_precision.py: the table read from run directories (its quick mode: tests/e2e)."""

import importlib.util
import json
import sys

from helpers import ROOT

spec = importlib.util.spec_from_file_location("alert_precision", ROOT / "scripts" / "alert_precision.py")
precision = importlib.util.module_from_spec(spec)
sys.modules["alert_precision"] = precision  # its dataclasses look their module up there
spec.loader.exec_module(precision)


def fake_run(run_dir, val_loss: dict, alerts: list[tuple[int, bool]]):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val/loss": v}) + "\n" for s, v in val_loss.items()))
    (run_dir / "samples.jsonl").write_text("".join(
        json.dumps({"kind": "alert", "step": s, "rule": "drift", "message": "m", **({"discarded": True} if d else {})}) + "\n"
        for s, d in alerts))
    return run_dir


def test_healthy_alerts_lead_and_goals(tmp_path):
    loss = {10: 2.0, 20: 1.5, 30: 1.4, 40: 1.45, 50: 1.5, 60: 1.7}  # regression after 30; +10% of 1.4 first at 60
    early = precision.analyse(fake_run(tmp_path / "a", loss, [(20, False), (40, False)]), at=30, seed="1")
    assert (early.healthy_validations, early.healthy_alerts, early.first_alert, early.loss_rise, early.lead) == (3, 1, 40, 60, 2)
    # A discarded alert (a rolled-back step) is not a false alarm.
    late = precision.analyse(fake_run(tmp_path / "b", loss, [(20, True), (50, False)]), at=30, seed="2")
    assert (late.healthy_alerts, late.lead) == (0, 1)
    text, ok = precision.table([early, late])
    assert not ok and "1 in 6 healthy validations" in text and "| 2 | 3 | 0 | 50 | 60 | 1 |" in text
    clean = precision.analyse(fake_run(tmp_path / "c", loss, [(40, False)]), at=30, seed="3")
    assert precision.table([clean])[1]
