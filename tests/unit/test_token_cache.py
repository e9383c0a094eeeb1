"""The token cache: a second run skips tokenization, any change of content, tokenizer or key
makes a new entry, a bad row stops the run at its chunk, and the memory-mapped data set gives
the examples that tokenizing in memory gives (texts read back from the files by row)."""

import json
import os
import logging

import numpy as np
import pytest
from transformers import AutoTokenizer

from config.schema import DataConfig, MultiturnConfig
from helpers import DEMO_MODEL, addition_rows, multiturn_rows, write_jsonl, write_parquet
from trainer.data import (
    CHUNK_ROWS, DataError, SFTBatches, TokenizedDataset, load_sft_examples, read_rows, tokenize_multi_turn,
    tokenize_single_turn,
)


@pytest.fixture()
def count_texts(monkeypatch):
    """How many texts the tokenizer has been given (its batched calls count each text)."""
    calls = {"texts": 0}
    original = type(AutoTokenizer.from_pretrained(DEMO_MODEL)).__call__

    def counting(self, text=None, *args, **kwargs):
        calls["texts"] += len(text) if isinstance(text, list) else 1
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(type(AutoTokenizer.from_pretrained(DEMO_MODEL)), "__call__", counting)
    return calls


def cfg(**kw) -> DataConfig:
    base = dict(prompt_key="prompt", response_key="response", max_length=64, train_batch_size=4, micro_batch_size_per_gpu=2)
    base.update(kw)
    return DataConfig(**base)


def same(a, b) -> bool:
    return (a.input_ids, a.labels, a.prompt_ids, a.prompt_text, a.reference) == (b.input_ids, b.labels, b.prompt_ids, b.prompt_text, b.reference)


def test_second_load_uses_the_cache_without_tokenizing(tmp_path, tok, count_texts, caplog):
    data = write_jsonl(addition_rows(300), tmp_path / "d.jsonl")
    first = load_sft_examples(str(data), "data.train_files", tok, cfg(), cache_dir=str(tmp_path / "cache"))
    assert count_texts["texts"] >= 600  # prompts and responses
    count_texts["texts"] = 0
    with caplog.at_level(logging.INFO, logger="trainer.data"):
        second = load_sft_examples(str(data), "data.train_files", tok, cfg(), cache_dir=str(tmp_path / "cache"))
    assert count_texts["texts"] == 0
    assert second.folder == first.folder and second.folder.parent == tmp_path / "cache"
    assert any("token cache" in r.message and "tokenization skipped" in r.message and str(second.folder) in r.message for r in caplog.records)
    assert len(first) == len(second) == 300 and all(same(first[i], second[i]) for i in (0, 17, 299))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.folder.name]  # no temporary folder left


def test_content_tokenizer_and_keys_each_make_a_new_entry(tmp_path, tok):
    data = write_jsonl(addition_rows(50), tmp_path / "d.jsonl")
    cache = str(tmp_path / "cache")

    def folder(c=None, tokenizer=tok, path=data):
        return load_sft_examples(str(path), "k", tokenizer, c or cfg(), cache_dir=cache).folder

    base = folder()
    assert folder() == base
    assert folder(cfg(max_length=32)) != base
    assert folder(cfg(truncation="right")) != base
    assert folder(cfg(apply_chat_template_kwargs={"x": 1})) != base
    moved = tmp_path / "copy.jsonl"
    moved.write_bytes(data.read_bytes())
    assert folder(path=moved) == base  # keyed by content, not by name
    rows = addition_rows(50)
    rows[49]["response"] = rows[49]["response"] + "0"
    assert folder(path=write_jsonl(rows, tmp_path / "d.jsonl")) != base
    other = AutoTokenizer.from_pretrained(DEMO_MODEL)
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    changed = folder(tokenizer=other, path=moved)
    assert changed != base
    assert len({base, changed, folder(path=data)}) == 3


def test_a_bad_row_in_a_large_file_stops_at_its_chunk(tmp_path, tok, count_texts):
    rows = addition_rows(50_000)
    rows[5] = {"prompt": "1+1=", "response": " ".join(["7"] * 200)}  # too long with truncation=error
    data = write_jsonl(rows, tmp_path / "big.jsonl")
    with pytest.raises(DataError, match=r"big.jsonl: row 5: \d+ tokens exceed data.max_length=64"):
        load_sft_examples(str(data), "data.train_files", tok, cfg(), cache_dir=str(tmp_path / "cache"))
    # one chunk of prompts and responses was tokenized, not the 50,000 rows
    assert 0 < count_texts["texts"] <= 2 * CHUNK_ROWS < 0.05 * 2 * len(rows)
    assert not list((tmp_path / "cache").iterdir())  # nothing half-written left behind

    count_texts["texts"] = 0
    lines = data.read_text().splitlines()
    lines[7] = '{"prompt": "1+1=", "response": '
    (tmp_path / "broken.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"broken.jsonl: row 7: not valid JSON"):
        load_sft_examples(str(tmp_path / "broken.jsonl"), "data.train_files", tok, cfg(), cache_dir=str(tmp_path / "cache"))
    assert count_texts["texts"] == 0  # found while reading, before the chunk was tokenized

    rows = addition_rows(50_000)
    rows[3]["response"] = None  # a null cell
    with pytest.raises(DataError, match=r"wide.parquet: row 3: column 'response' is NoneType, expected text"):
        load_sft_examples(str(write_parquet(rows, tmp_path / "wide.parquet")), "k", tok, cfg(), cache_dir=str(tmp_path / "cache"))
    assert count_texts["texts"] <= CHUNK_ROWS  # the first chunk's prompts at most


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_mapped_examples_equal_tokenizing_in_memory(tmp_path, tok, suffix):
    write = write_jsonl if suffix == "jsonl" else write_parquet
    rows = addition_rows(CHUNK_ROWS + 37, seed=4)
    path = str(write(rows, tmp_path / f"d.{suffix}"))
    c = cfg(max_length=12, truncation="left")
    data = load_sft_examples([path, path], "k", tok, c, max_rows=len(rows) + 5, cache_dir=str(tmp_path / "cache"))
    expected = tokenize_single_turn(read_rows(path, ["prompt", "response"], "k"), tok, c)
    assert isinstance(data, TokenizedDataset) and len(data) == len(rows) + 5
    for i in (0, 1, CHUNK_ROWS - 1, CHUNK_ROWS, len(rows) - 1):
        assert same(data[i], expected[i]), i
    assert same(data[len(rows) + 4], expected[4]) and same(data[-1], expected[4])  # the second file, by row
    assert isinstance(data.lengths, np.memmap) and data.lengths.dtype == np.int32
    assert data.lengths.tolist() == [len(e.input_ids) for e in expected] + [len(e.input_ids) for e in expected[:5]]
    assert [e.reference for e in data[3:9:2]] == [rows[i]["response"] for i in (3, 5, 7)]
    batches = SFTBatches(data, c, seed=1, rank=0, world_size=1, pad_id=tok.pad_token_id)
    in_memory = SFTBatches(list(expected) + list(expected[:5]), c, seed=1, rank=0, world_size=1, pad_id=tok.pad_token_id)
    assert batches.lengths is data.lengths
    for step in (0, 3):
        assert batches.plan(1, step) == in_memory.plan(1, step)
        mine, theirs = batches.micro_batches(1, step), in_memory.micro_batches(1, step)
        assert all((a.input_ids.equal(b.input_ids) and a.labels.equal(b.labels)) for a, b in zip(mine, theirs))


def test_multi_turn_examples_and_texts_come_back_from_the_file(tmp_path, tok):
    rows = multiturn_rows(12, seed=2)
    path = str(write_jsonl(rows, tmp_path / "chat.jsonl"))
    c = cfg(max_length=256, multiturn=MultiturnConfig(enable=True))
    data = load_sft_examples(path, "k", tok, c, cache_dir=str(tmp_path / "cache"))
    expected = tokenize_multi_turn(read_rows(path, ["messages"], "k", ["tools", "enable_thinking"]), tok, c)
    assert len(data) == 12 and all(same(data[i], expected[i]) for i in range(12))
    meta = json.loads((data.folder / "meta.json").read_text())
    assert meta["examples"] == 12 and meta["tokens"] == int(data.lengths.sum())


def test_a_writer_killed_mid_write_leaves_no_folder_behind_the_next_write(tmp_path, tok):
    """A writer killed mid-write (SIGKILL: no `finally`) leaves its temporary folder; the next
    write on the host removes it, and leaves a live writer's and another host's alone."""
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    cache = tmp_path / "cache"
    host = socket.gethostname()
    dead = cache / f"0123abcd.tmp-{host}-{int(gone.stdout)}"
    live = cache / f"4567abcd.tmp-{host}-{os.getpid()}"
    elsewhere = cache / f"89abcdef.tmp-other-host-{int(gone.stdout)}"
    for folder in (dead, live, elsewhere):
        (folder).mkdir(parents=True)
        (folder / "input_ids.npy").write_bytes(b"partial")
    data = write_jsonl(addition_rows(20), tmp_path / "d.jsonl")
    loaded = load_sft_examples(str(data), "data.train_files", tok, cfg(), cache_dir=str(cache))
    assert sorted(p.name for p in cache.iterdir()) == sorted([loaded.folder.name, live.name, elsewhere.name])


# ---------------------------------------------------------------------- code versions and eviction
def test_a_library_upgrade_or_a_tokenizing_code_change_makes_a_new_entry(tmp_path, tok, monkeypatch):
    import importlib.metadata

    from trainer import token_cache

    data = write_jsonl(addition_rows(20), tmp_path / "d.jsonl")
    key = lambda: token_cache.entry_key([str(data)], tok, {"max_length": 64})  # noqa: E731
    before = key()
    assert key() == before  # stable
    real_version = importlib.metadata.version
    for library in ("transformers", "tokenizers", "sample-aware-trainer"):
        monkeypatch.setattr(importlib.metadata, "version", lambda name, lib=library: "99.0" if name == lib else real_version(name))
        assert key() != before, library
    monkeypatch.setattr(importlib.metadata, "version", real_version)
    # A fix in the code that tokenizes, without any version bump.
    code = tmp_path / "data.py"
    code.write_text("def tokenize(): return 1\n")
    monkeypatch.setattr(token_cache, "_TOKENIZING_MODULES", (str(code),))
    patched = key()
    assert patched != before
    code.write_text("def tokenize(): return 2  # the fix\n")
    assert key() != patched


def fake_entry(root, name, megabytes, used_at):
    entry = root / name
    entry.mkdir(parents=True)
    (entry / "input_ids.npy").write_bytes(b"\0" * (megabytes * 10**6))
    (entry / "meta.json").write_text("{}")
    (entry / "last_used").touch()
    os.utime(entry / "last_used", (used_at, used_at))
    return entry


def test_prune_deletes_the_least_recently_used_entries_down_to_the_size(tmp_path, capsys):
    from trainer import token_cache

    root = tmp_path / "cache"
    old, mid, new = (fake_entry(root, n, 2, t) for n, t in (("old", 1_000), ("mid", 2_000), ("new", 3_000)))
    writing = root / "x.tmp-otherhost-1"  # another host's writer: never touched
    writing.mkdir()
    assert token_cache.prune(root, max_bytes=5 * 10**6) == [old]
    assert sorted(p.name for p in root.iterdir()) == ["mid", "new", "x.tmp-otherhost-1"]
    # A hit marks its entry used: `mid` is then the newest, `new` goes first.
    token_cache.build_once(lambda: mid, lambda e: 0, token_cache.Ranks(), ValueError)
    assert token_cache.prune(root, max_bytes=3 * 10**6) == [new]
    # The command: one line, and 0 empties the cache.
    assert token_cache.main(["prune", "--max-gb", "0", "--dir", str(root)]) == 0
    assert capsys.readouterr().out.strip() == f"removed 1 entry from {root}; 0.00 GB left"
    assert sorted(p.name for p in root.iterdir()) == ["x.tmp-otherhost-1"]
    assert token_cache.main(["prune", "--dir", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --dir={tmp_path / 'missing'}: no such folder"
