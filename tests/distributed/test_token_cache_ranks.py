"""The token cache on 2 gloo ranks of one node: only local rank 0 hashes the files, tokenizes
and writes, both map the same entry, a second load writes nothing, and a bad row found by the writer stops
the waiting rank too, with the writer's message. One launch of 2 ranks, no model."""

import json

import pytest

from helpers import ROOT, addition_rows, run_module, write_jsonl

pytestmark = pytest.mark.distributed


def test_local_rank_zero_writes_both_map_and_errors_reach_every_rank(tiny_model, tmp_path):
    good = write_jsonl(addition_rows(64), tmp_path / "good.jsonl")
    rows = addition_rows(3000)
    rows[5]["response"] = " ".join(["9"] * 40)  # 40+ tokens > data.max_length=16
    bad = write_jsonl(rows, tmp_path / "bad.jsonl")
    run_module("token_cache_worker", [str(tiny_model), str(good), str(bad), str(tmp_path / "cache"), str(tmp_path)],
               nproc=2, cwd=tmp_path, env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests' / 'distributed'}"}, timeout=240)
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert zero["first"]["writes"] == 1 and one["first"]["writes"] == 0  # only local rank 0 tokenizes
    assert zero["second"]["writes"] == 1 and one["second"]["writes"] == 0  # the second load is a hit
    assert zero["second"]["hashed"] == 2 and one["second"]["hashed"] == 0  # only the writer reads the files for the key
    assert zero["first"]["folder"] == one["first"]["folder"] == zero["second"]["folder"]
    assert zero["first"]["lengths"] == one["first"]["lengths"] and len(one["first"]["lengths"]) == 64
    assert zero["first"]["example"] == one["first"]["example"]
    for report in (zero, one):
        assert report["bad"] is not None and "bad.jsonl: row 5:" in report["bad"] and "data.max_length=16" in report["bad"]
