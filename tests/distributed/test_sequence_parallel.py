"""Ulysses sequence parallelism on 2 gloo ranks gives the loss and gradients of N=1 (one plain
model on the whole global batch), single-turn and multi-turn, with token-budget micro-batches,
padded and packed rows. One launch of 2 ranks (tests/distributed/sp_worker.py) measures; this asserts."""

import json

import pytest

from helpers import ROOT, multiturn_rows, run_module, write_parquet

pytestmark = pytest.mark.distributed


def test_two_way_sequence_parallel_matches_one_process(tiny_model, tiny_data, tmp_path):
    multi = write_parquet(multiturn_rows(16, seed=3), tmp_path / "multiturn.parquet")
    out = tmp_path / "report.json"
    run_module("sp_worker", [str(tiny_model), str(tiny_data["train"]), str(tiny_data["val"]), str(multi), str(out)],
               nproc=2, cwd=tmp_path, env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests' / 'distributed'}"})
    report = json.loads(out.read_text())
    assert set(report) == {"single", "multi"}
    for name, row in report.items():
        assert (row["sp_size"], row["dp_size"]) == (2, 1), name
        assert row["micro_batches"] > 1, name  # token-budget micro-batches, several per step
        assert row["packed_default"] is False  # sdpa: no varlen kernel, so padded rows unless asked
        for layout in ("padded", "packed"):
            got = row[layout]
            assert got["grads_compared"] == row["params"], (name, layout)
            assert got["loss"] == pytest.approx(row["ref_loss"], rel=1e-5), (name, layout)
            assert got["max_grad_diff"] <= 1e-5 * max(1.0, got["max_grad"]), (name, layout, got)
    # A sequence of odd length is split too (padded to a multiple of 2 on the way in).
    assert any(w % 2 for row in report.values() for w in row["widths"])
    assert report["single"]["val_loss"] == pytest.approx(report["single"]["ref_val_loss"], rel=1e-5)
