"""SFT data: loss masks, truncation, dict keys, and errors that name file, row and column."""

import json

import pytest

from config.schema import DataConfig, MultiturnConfig
from helpers import DEMO_MODEL, write_jsonl, write_parquet
from trainer.data import IGNORE, DataError, SFTBatches, load_sft_examples, read_rows, validation_micro_batches


def cfg(**kw) -> DataConfig:
    base = dict(prompt_key="prompt", response_key="response", max_length=64, train_batch_size=2, micro_batch_size_per_gpu=1)
    base.update(kw)
    return DataConfig(**base)


def test_single_turn_loss_covers_response_and_eos_only(tmp_path, tok):
    path = write_parquet([{"prompt": "12+34=", "response": "46"}], tmp_path / "d.parquet")
    (ex,) = load_sft_examples(str(path), "data.train_files", tok, cfg())
    prompt_ids = tok(tok.apply_chat_template([{"role": "user", "content": "12+34="}], add_generation_prompt=True, tokenize=False), add_special_tokens=False).input_ids
    response_ids = tok("46", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert ex.input_ids == prompt_ids + response_ids
    assert ex.labels == [IGNORE] * len(prompt_ids) + response_ids
    assert ex.prompt_ids == prompt_ids and ex.prompt_text == "12+34=" and ex.reference == "46"


def test_multi_turn_loss_on_assistant_turns_only(tmp_path, tok):
    messages = [
        {"role": "system", "content": "add"},
        {"role": "user", "content": "1+1="},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+3="},
        {"role": "assistant", "content": "5"},
    ]
    path = write_jsonl([{"messages": messages}], tmp_path / "chat.jsonl")
    (ex,) = load_sft_examples(str(path), "data.train_files", tok, cfg(multiturn=MultiturnConfig(enable=True)))
    assert ex.input_ids == tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False).input_ids
    trained = [t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE]
    eos = tok.eos_token_id
    assert trained == tok("2", add_special_tokens=False).input_ids + [eos] + tok("5", add_special_tokens=False).input_ids + [eos]
    assert all(l == IGNORE or l == t for t, l in zip(ex.input_ids, ex.labels))
    assert tok.decode(ex.prompt_ids) == tok.apply_chat_template(messages[:4], add_generation_prompt=True, tokenize=False)
    assert ex.reference == "5"


def test_dict_keys_reach_into_columns_like_verl_gsm8k(tmp_path, tok):
    rows = [{"extra_info": {"question": "3+4=", "answer": "7", "index": 0}}]
    path = write_parquet(rows, tmp_path / "gsm.parquet")
    c = cfg(prompt_key="extra_info", response_key="extra_info", prompt_dict_keys=["question"], response_dict_keys=["answer"])
    (ex,) = load_sft_examples(str(path), "data.train_files", tok, c)
    assert ex.prompt_text == "3+4=" and ex.reference == "7"


def test_truncation_modes(tmp_path, tok):
    path = write_parquet([{"prompt": "1234567890" * 3, "response": "abc"}], tmp_path / "long.parquet")
    with pytest.raises(DataError, match=r"long.parquet: row 0: \d+ tokens exceed data.max_length=16"):
        load_sft_examples(str(path), "k", tok, cfg(max_length=16))
    (left,) = load_sft_examples(str(path), "k", tok, cfg(max_length=16, truncation="left"))
    (right,) = load_sft_examples(str(path), "k", tok, cfg(max_length=16, truncation="right"))
    assert len(left.input_ids) == len(right.input_ids) == 16
    assert left.input_ids[-1] == tok.eos_token_id and left.labels[-4:] != [IGNORE] * 4  # keeps the response
    assert right.labels == [IGNORE] * 16  # keeps the start of the prompt


@pytest.mark.parametrize(
    "rows, kwargs, message",
    [
        ([{"prompt": "1+1=", "answer": "2"}], {}, r"d.parquet: column 'response' not found"),
        ([{"prompt": "1+1=", "response": ["2"]}], {}, r"d.parquet: row 0: column 'response' is list, expected text"),
        ([{"prompt": {"q": "1"}, "response": "2"}], {"prompt_dict_keys": ["question"]}, r"row 0: column 'prompt' has no key 'question'"),
    ],
)
def test_bad_rows_name_file_row_and_column(tmp_path, tok, rows, kwargs, message):
    path = write_parquet(rows, tmp_path / "d.parquet")
    with pytest.raises(DataError, match=message):
        load_sft_examples(str(path), "data.train_files", tok, cfg(**kwargs))


def test_missing_and_empty_files(tmp_path, tok):
    with pytest.raises(DataError, match=r"data.train_files: file not found: .*nope.parquet"):
        load_sft_examples(str(tmp_path / "nope.parquet"), "data.train_files", tok, cfg())
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl: no rows"):
        load_sft_examples(str(empty), "data.train_files", tok, cfg())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl: row 1: not valid JSON"):
        load_sft_examples(str(bad), "data.train_files", tok, cfg())


def test_list_of_files_and_jsonl(tmp_path, tok):
    a = write_parquet([{"prompt": "1+1=", "response": "2"}], tmp_path / "a.parquet")
    b = write_jsonl([{"prompt": "2+2=", "response": "4"}], tmp_path / "b.jsonl")
    examples = load_sft_examples([str(a), str(b)], "data.train_files", tok, cfg())
    assert [e.reference for e in examples] == ["2", "4"]


def test_batches_are_a_pure_function_of_seed_epoch_and_index(tmp_path, tok):
    rows = [{"prompt": f"{i}+0=", "response": str(i)} for i in range(20)]
    examples = load_sft_examples(str(write_parquet(rows, tmp_path / "d.parquet")), "k", tok, cfg())
    c = cfg(train_batch_size=8, micro_batch_size_per_gpu=2, use_dynamic_bsz=False)
    batches = SFTBatches(examples, c, seed=3, rank=0, world_size=2, pad_id=tok.pad_token_id)
    assert batches.steps_per_epoch == 2
    assert batches.global_batch(0, 1) == SFTBatches(examples, c, 3, 1, 2, tok.pad_token_id).global_batch(0, 1)
    assert batches.global_batch(0, 0) != batches.global_batch(1, 0)
    shares = [SFTBatches(examples, c, 3, r, 2, tok.pad_token_id).rank_share(batches.global_batch(0, 0)) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(batches.global_batch(0, 0))
    assert [mb.input_ids.shape[0] for mb in batches.micro_batches(0, 0)] == [2, 2]
    # The default token budget (2 × max_length) holds all 4 short sequences in one forward.
    dynamic = SFTBatches(examples, cfg(train_batch_size=8, micro_batch_size_per_gpu=2), 3, 0, 2, tok.pad_token_id)
    assert [mb.input_ids.shape[0] for mb in dynamic.micro_batches(0, 0)] == [4]


def test_uneven_validation_gives_every_rank_the_same_number_of_batches(tmp_path, tok):
    rows = [{"prompt": f"{i}+1=", "response": str(i + 1)} for i in range(7)]
    examples = load_sft_examples(str(write_parquet(rows, tmp_path / "v.parquet")), "k", tok, cfg())
    per_rank = [validation_micro_batches(examples, 2, r, 3, tok.pad_token_id) for r in range(3)]
    assert [len(b) for b in per_rank] == [2, 2, 2]
    assert sum(mb.num_loss_tokens for batches in per_rank for mb in batches) == sum(e.num_loss_tokens for e in examples)


def test_max_samples_take_the_first_rows_over_the_files(tmp_path, tok):
    a = write_parquet([{"prompt": f"{i}+1=", "response": str(i + 1)} for i in range(3)], tmp_path / "a.parquet")
    b = write_parquet([{"prompt": f"{i}+2=", "response": str(i + 2)} for i in range(3)], tmp_path / "b.parquet")
    got = load_sft_examples([str(a), str(b)], "data.train_files", tok, cfg(), max_rows=4)
    assert [e.prompt_text for e in got] == ["0+1=", "1+1=", "2+1=", "0+2="]
    assert len(load_sft_examples([str(a), str(b)], "data.train_files", tok, cfg(), max_rows=-1)) == 6


def test_chat_template_kwargs_reach_the_template(tmp_path, tok):
    # A template that shows the arguments it was given, so the test sees them arrive.
    template = ("{% if tools %}T{{ tools | length }};{% endif %}{% if enable_thinking %}think;{% endif %}"
                "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }};{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    from workers.model import load_tokenizer

    custom = load_tokenizer(str(DEMO_MODEL), chat_template=template)
    assert custom.chat_template == template and tok.chat_template != template
    path = write_parquet([{"prompt": "1+1=", "response": "2"}], tmp_path / "d.parquet")
    (ex,) = load_sft_examples(str(path), "data.train_files", custom, cfg(apply_chat_template_kwargs={"enable_thinking": True}))
    assert custom.decode(ex.prompt_ids) == "think;user:1+1=;assistant:"
    conversation = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]
    rows = [{"messages": conversation, "tools": json.dumps([{"name": "add"}, {"name": "sub"}]), "enable_thinking": False},
            {"messages": conversation, "tools": None, "enable_thinking": True}]
    multi = write_jsonl(rows, tmp_path / "m.jsonl")
    first, second = load_sft_examples(str(multi), "data.train_files", custom, cfg(multiturn=MultiturnConfig(enable=True)))
    assert custom.decode(first.prompt_ids) == "T2;user:1+1=;assistant:"  # its own tools, thinking off
    assert custom.decode(second.prompt_ids) == "think;user:1+1=;assistant:"


def test_corrupt_data_files_are_one_line_naming_the_file(tmp_path):
    not_parquet = tmp_path / "train.parquet"
    not_parquet.write_text("prompt,response\n1+1=,2\n")  # a CSV under the wrong name
    with pytest.raises(DataError, match=r"train.parquet: not a readable parquet file \(") as err:
        read_rows(str(not_parquet), ["prompt"], "data.train_files")
    assert "\n" not in str(err.value)
    truncated = tmp_path / "cut.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a"] * 100}), truncated)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cut.parquet: not a readable parquet file"):
        read_rows(str(truncated), ["prompt"], "data.train_files")
    binary = tmp_path / "train.jsonl"
    binary.write_bytes(b'{"prompt": "a"}\n\xff\xfe\x00garbage\n')
    with pytest.raises(DataError, match=r"train.jsonl: row 1: not UTF-8 text"):
        read_rows(str(binary), ["prompt"], "data.train_files")
