"""Preference data as RL prompts (TRL's formats): hh-rlhf text conversations, conversational
`chosen`/`rejected` lists, the explicit `prompt`/`chosen`/`rejected` format; the prompt is the
conversation up to the last assistant turn, templated with the policy's chat template and kept
(with its whole conversation) through the token cache. A file with neither layout: one line."""

import pytest

from config.rl_schema import RLDataConfig
from helpers import write_jsonl, write_parquet
from trainer.data import DataError
from trainer.data.rl_prompts import encode_messages, hh_turns, load_rl_prompts

HH_CHOSEN = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: It is 6."
HH_REJECTED = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: No idea."
HH_PROMPT = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
             {"role": "user", "content": "And 3+3?"}]


def load(path, tok, **cfg):
    return load_rl_prompts(str(path), "data.train_files", tok, RLDataConfig(max_prompt_length=256, **cfg))


def test_hh_rlhf_turns_become_chat_messages():
    assert hh_turns(HH_CHOSEN) == [*HH_PROMPT, {"role": "assistant", "content": "It is 6."}]
    assert hh_turns("Human: hi\n\nAssistant: yo") == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert hh_turns("just a sentence with Human: inside") is None


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_implicit_prompt_hh_rlhf_text_is_the_conversation_before_the_last_assistant_turn(tmp_path, tok, suffix):
    rows = [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
            {"chosen": "\n\nHuman: Name a colour.\n\nAssistant: Blue.", "rejected": "\n\nHuman: Name a colour.\n\nAssistant: No."}]
    path = (write_jsonl if suffix == "jsonl" else write_parquet)(rows, tmp_path / f"hh.{suffix}")
    prompts = load(path, tok)
    assert len(prompts) == 2
    first = prompts[0]
    assert first.messages == HH_PROMPT and first.text == "And 3+3?" and first.ground_truth is None
    # The policy's chat template applies to the turns (the demo tokenizer has one).
    assert tok.chat_template and first.prompt_ids == encode_messages(tok, HH_PROMPT)
    assert prompts[1].conversation == [{"role": "user", "content": "Name a colour."}]


def test_implicit_prompt_conversational_lists(tmp_path, tok):
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "1+1="}
    rows = [{"chosen": [system, user, {"role": "assistant", "content": "2"}],
             "rejected": [system, user, {"role": "assistant", "content": "3"}]}]
    prompts = load(write_jsonl(rows, tmp_path / "conv.jsonl"), tok)
    assert prompts[0].messages == [system, user] and prompts[0].text == "1+1="
    assert prompts[0].prompt_ids == encode_messages(tok, [system, user])


def test_explicit_prompt_format_needs_no_answer_column(tmp_path, tok):
    rows = [{"prompt": [{"role": "user", "content": "2+3="}], "chosen": [{"role": "assistant", "content": "5"}],
             "rejected": [{"role": "assistant", "content": "6"}]},
            {"prompt": "\n\nHuman: Say hi.\n\nAssistant:", "chosen": " Hi!", "rejected": " No."}]
    prompts = load(write_jsonl(rows, tmp_path / "explicit.jsonl"), tok)
    assert [p.text for p in prompts] == ["2+3=", "Say hi."]
    # An hh-rlhf text prompt ends with an empty assistant turn: the generation's place, not a message.
    assert prompts[1].messages == [{"role": "user", "content": "Say hi."}]
    assert all(p.ground_truth is None for p in prompts)


def test_a_file_with_neither_layout_is_one_line_naming_it_and_its_columns(tmp_path, tok):
    path = write_jsonl([{"question": "q", "answer": "a"}], tmp_path / "qa.jsonl")
    with pytest.raises(DataError) as err:
        load(path, tok)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "'prompt'" in message and "'chosen', 'rejected'" in message and "(columns: question, answer)" in message


def test_a_preference_row_without_an_assistant_turn_names_its_row(tmp_path, tok):
    rows = [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, {"chosen": "\n\nHuman: only a question", "rejected": "x"}]
    with pytest.raises(DataError, match=r"hh\.jsonl: row 1: column 'chosen' has no assistant turn"):
        load(write_jsonl(rows, tmp_path / "hh.jsonl"), tok)
