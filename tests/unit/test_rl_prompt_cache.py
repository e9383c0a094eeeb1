"""RL prompts through the token cache: the mapped prompts are those tokenizing row by row gives
(ids, text, answer), a second load tokenizes nothing, a changed setting makes a new entry, a bad
row stops the load at its chunk, and the prompt batches are those of a list."""

import logging

import pytest

from config.rl_schema import RLDataConfig
from helpers import rl_rows, write_jsonl, write_parquet
from trainer.data import rl_prompts as rl_data
from trainer.data import CHUNK_ROWS, DataError, Row
from trainer.data.rl_prompts import PromptBatches, load_rl_prompts


@pytest.fixture()
def count_encodes(monkeypatch):
    calls = {"prompts": 0}
    original = rl_data.encode_messages

    def counting(*args, **kwargs):
        calls["prompts"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(rl_data, "encode_messages", counting)
    return calls


def verl_rows(n: int, int_answers: bool = False) -> list[dict]:
    rows = rl_rows(n, seed=3)
    for i, r in enumerate(rows):
        if i % 3 == 0:  # a system turn before the user's: the text is the user's message
            r["prompt"] = [{"role": "system", "content": "Add."}, *r["prompt"]]
        if int_answers and i % 4 == 1:  # an int answer becomes text (JSONL: a parquet column has one type)
            r["reward_model"]["ground_truth"] = int(r["reward_model"]["ground_truth"])
    return rows


@pytest.mark.parametrize("suffix", ["parquet", "jsonl"])
def test_mapped_prompts_equal_tokenizing_row_by_row(tmp_path, tok, suffix):
    rows = verl_rows(CHUNK_ROWS + 37, int_answers=suffix == "jsonl")  # two chunks
    path = (write_parquet if suffix == "parquet" else write_jsonl)(rows, tmp_path / f"p.{suffix}")
    cfg = RLDataConfig(max_prompt_length=64)
    prompts = load_rl_prompts(str(path), "data.train_files", tok, cfg, cache_dir=str(tmp_path / "cache"))
    assert len(prompts) == len(rows)
    for i in (0, 1, 3, CHUNK_ROWS, len(rows) - 1):
        expected = rl_data._prompt(Row(str(path), i, rows[i]), tok, cfg)
        got = prompts[i]
        assert (got.prompt_ids, got.text, got.ground_truth) == (expected.prompt_ids, expected.text, expected.ground_truth)
    assert prompts[1].ground_truth == str(rows[1]["reward_model"]["ground_truth"]) and isinstance(prompts[1].ground_truth, str)
    assert isinstance(rows[1]["reward_model"]["ground_truth"], int) == (suffix == "jsonl")
    assert prompts[0].text == rows[0]["prompt"][-1]["content"]
    assert [p.text for p in prompts[:3]] == [r["prompt"][-1]["content"] for r in rows[:3]]
    assert prompts[-1].text == rows[-1]["prompt"][-1]["content"]


def test_second_load_tokenizes_nothing_and_a_changed_setting_makes_a_new_entry(tmp_path, tok, count_encodes, caplog):
    path = write_parquet(verl_rows(50), tmp_path / "p.parquet")
    cache = str(tmp_path / "cache")
    first = load_rl_prompts(str(path), "data.train_files", tok, RLDataConfig(), cache_dir=cache)
    assert count_encodes["prompts"] == 50
    with caplog.at_level(logging.INFO, logger="trainer.data"):
        second = load_rl_prompts(str(path), "data.train_files", tok, RLDataConfig(), cache_dir=cache)
    assert count_encodes["prompts"] == 50  # nothing tokenized again
    assert second.folder == first.folder
    assert any("50 prompts from the token cache" in r.message and "tokenization skipped" in r.message
               and str(second.folder) in r.message for r in caplog.records)
    assert [p.prompt_ids for p in second] == [p.prompt_ids for p in first]
    truncated = load_rl_prompts(str(path), "data.train_files", tok, RLDataConfig(max_prompt_length=5, truncation="left"),
                                cache_dir=cache)
    assert truncated.folder != first.folder and count_encodes["prompts"] == 100
    assert all(p.prompt_ids == q.prompt_ids[-5:] for p, q in zip(truncated, first))


def test_left_out_prompts_are_logged_from_the_cache_too(tmp_path, tok, caplog):
    rows = verl_rows(6)
    rows[2]["prompt"] = [{"role": "user", "content": "1+1=" * 40}]
    path = write_jsonl(rows, tmp_path / "p.jsonl")
    cfg = RLDataConfig(max_prompt_length=40, filter_overlong_prompts=True)
    for _ in range(2):  # written, then read from the cache
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="trainer.data.rl_prompts"):
            kept = load_rl_prompts(str(path), "data.train_files", tok, cfg, cache_dir=str(tmp_path / "cache"))
        assert [p.text for p in kept] == [r["prompt"][-1]["content"] for i, r in enumerate(rows) if i != 2]
        assert any("1 prompt(s) longer than data.max_prompt_length=40 left out" in r.message for r in caplog.records)


def test_a_bad_row_stops_the_load_at_its_chunk(tmp_path, tok, count_encodes):
    rows = verl_rows(CHUNK_ROWS * 4)
    rows[CHUNK_ROWS + 5]["prompt"] = 17  # neither text nor messages
    path = write_jsonl(rows, tmp_path / "p.jsonl")
    with pytest.raises(DataError, match=rf"p.jsonl: row {CHUNK_ROWS + 5}: column 'prompt' must be text or a list"):
        load_rl_prompts(str(path), "data.train_files", tok, RLDataConfig(), cache_dir=str(tmp_path / "cache"))
    assert count_encodes["prompts"] <= 2 * CHUNK_ROWS  # not the whole file
    assert not list((tmp_path / "cache").iterdir())  # no entry, no temporary folder left


def test_prompt_batches_over_the_mapped_set_are_those_of_a_list(tmp_path, tok):
    path = write_parquet(verl_rows(40), tmp_path / "p.parquet")
    mapped = load_rl_prompts(str(path), "data.train_files", tok, RLDataConfig())
    listed = list(mapped)
    for rank in (0, 1):
        a = PromptBatches(mapped, 8, seed=5, shuffle=True, rank=rank, world_size=2)
        b = PromptBatches(listed, 8, seed=5, shuffle=True, rank=rank, world_size=2)
        for epoch, index in ((0, 0), (0, 4), (1, 2)):
            (ia, pa), (ib, pb) = a.rank_prompts(epoch, index), b.rank_prompts(epoch, index)
            assert ia == ib and [(p.prompt_ids, p.text, p.ground_truth) for p in pa] == [(p.prompt_ids, p.text, p.ground_truth) for p in pb]
    assert a.rank_prompts(0, 0)[0] != a.rank_prompts(1, 0)[0]  # each epoch its own order


def test_a_moved_seed_reshuffles_the_epoch_already_cached():
    """A rollback without skip_data moves the data seed mid-epoch: the cached order must follow."""
    prompts = list(range(32))  # only indexed here
    batches = PromptBatches(prompts, 8, seed=5, shuffle=True, rank=0, world_size=1)
    before = batches.rank_prompts(0, 0)[0]
    batches.seed = 6
    after = batches.rank_prompts(0, 0)[0]
    batches.seed = 5
    assert after != before and batches.rank_prompts(0, 0)[0] == before
