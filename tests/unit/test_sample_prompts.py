"""Sample prompts: the prompts file, k answers per prompt with their seeds, a greedy answer,
and one `generate` call per distinct setting."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.data import DataError
from trainer.sample_prompts import (
    SamplePrompt, SamplingPlan, answer_seed, encode_file_prompts, generate_samples, read_prompts_file,
)
from trainer.samples import prompt_id, sample_seed
from workers.generation import GenerationSettings, generate

BASE = GenerationSettings(max_new_tokens=5, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)


def write_lines(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


class CountingGenerate:
    def __init__(self):
        self.calls = []

    def __call__(self, model, tokenizer, prompt_ids, settings, seeds, **kw):
        self.calls.append((settings, len(prompt_ids)))
        return generate(model, tokenizer, prompt_ids, settings, seeds, **kw)


@pytest.mark.parametrize("line, words", [
    ("not json", "row 2: not JSON"),
    ('["a list"]', "row 2: expected an object"),
    ('{"prompt": "x", "messages": [{"role": "user", "content": "x"}]}', "row 2: needs exactly one of"),
    ('{"prompt": ""}', "row 2: `prompt` must be non-empty text"),
    ('{"messages": [{"role": "user"}]}', "row 2: `messages` must be"),
    ('{"prompt": "x", "temprature": 0.5}', "row 2: unknown field(s) temprature"),
    ('{"prompt": "x", "max_new_tokens": "8"}', "row 2: `max_new_tokens` must be int"),
    ('{"prompt": "x", "top_p": 1.5}', "row 2: `top_p` must be in (0, 1]"),
    ('{"prompt": "x", "tags": "math"}', "row 2: `tags` must be a list"),
    ('{"prompt": "y", "id": "a"}', "row 2: id 'a' repeats row 1"),
])
def test_a_bad_row_is_one_line_naming_file_and_row(tmp_path, line, words):
    path = write_lines(tmp_path / "prompts.jsonl", ['{"prompt": "1+2=", "id": "a"}', line])
    with pytest.raises(DataError) as err:
        read_prompts_file(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and words in message and "\n" not in message


def test_seeds_k1_are_todays_and_each_sample_has_its_own(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    prompts = [SamplePrompt(t, tuple(tok(t)["input_ids"]), "3") for t in ("1+2=", "40+2=")]
    one = generate_samples(model, tok, prompts, BASE, SamplingPlan(), run_seed=7)
    # Unchanged from before k existed: each prompt's seed from the run seed and its token ids.
    assert one.seeds == [sample_seed(7, prompt_id(p.prompt_ids)) for p in prompts]
    four = generate_samples(model, tok, prompts, BASE, SamplingPlan(4, also_greedy=True), run_seed=7)
    assert [(m.prompt_id, m.sample, m.greedy) for m in four.meta] == [
        (p.pid, j, False) for p in prompts[:1] for j in range(4)] + [(prompts[0].pid, 0, True)] + [
        (p.pid, j, False) for p in prompts[1:] for j in range(4)] + [(prompts[1].pid, 0, True)]
    sampled = [s for s, m in zip(four.seeds, four.meta) if not m.greedy]
    assert len(set(sampled)) == 8 and sampled[0] == one.seeds[0] and sampled[4] == one.seeds[1]
    assert four.generated[0].token_ids == one.generated[0].token_ids  # sample 1 is k=1's sample
    assert four.meta[4].settings.do_sample is False
    again = generate_samples(model, tok, prompts, BASE, SamplingPlan(4, also_greedy=True), run_seed=7)
    assert [g.token_ids for g in again.generated] == [g.token_ids for g in four.generated]
    assert answer_seed(7, "x", 0) == sample_seed(7, "x") != answer_seed(7, "x", 1)


def test_prompts_file_settings_are_respected_and_batched(tiny_model, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    path = write_lines(tmp_path / "prompts.jsonl", [
        {"prompt": "1+2=", "reference": "3", "id": "s1", "tags": ["math"], "max_new_tokens": 2, "do_sample": False},
        {"prompt": "3+4=", "id": "s2", "tags": ["math"], "max_new_tokens": 2, "do_sample": False},
        {"messages": [{"role": "user", "content": "hello"}], "temperature": 0.7, "max_new_tokens": 7},
        {"prompt": "5+6=", "temperature": 0.7, "max_new_tokens": 7, "top_k": 3},
        {"prompt": "7+8="},
    ])
    prompts = encode_file_prompts(read_prompts_file(path), tok)
    assert [p.pid for p in prompts[:2]] == ["s1", "s2"] and prompts[0].tags == ("math",)
    assert prompts[2].text == "user: hello" and prompts[2].pid == prompt_id(prompts[2].prompt_ids)
    counter = CountingGenerate()
    out = generate_samples(model, tok, prompts, BASE, SamplingPlan(2), run_seed=1, generate_fn=counter)
    # 4 distinct settings (greedy 2 tokens, t=0.7 7 tokens, the same with top_k=3, the base): 4 calls.
    assert len(counter.calls) == 4
    assert [(st.do_sample, st.max_new_tokens, st.top_k, n) for st, n in counter.calls] == [
        (False, 2, 0, 2), (True, 7, 0, 2), (True, 7, 3, 2), (True, 5, 0, 2)]  # prompts x answers per call
    lengths = {}
    for g, m in zip(out.generated, out.meta):
        assert g.num_tokens <= m.settings.max_new_tokens
        lengths.setdefault(m.settings.max_new_tokens, []).append(g.num_tokens)
    assert max(lengths[7]) > 2  # an untrained model rarely stops: the longer limit is used
    assert [m.sample for m in out.meta[:2]] == [0, 0]  # a greedy prompt gets one answer, not k
    assert out.references[:2] == ["3", None]
    again = generate_samples(model, tok, prompts[:2], BASE, SamplingPlan(2), run_seed=99)  # another seed
    assert [g.token_ids for g in again.generated] == [g.token_ids for g in out.generated[:2]]  # greedy repeats


def _event(style: str, answers: list[tuple[str, int, bool]]):
    """A SampleEvent; answers: (prompt id, sample j, greedy) in the order trainer.sample_prompts makes them."""
    from trainer.samples import SampleMeta
    from trainer.tracking import SampleEvent, SampleRecord

    records = [SampleRecord(index=i, prompt=f"prompt {pid}", generation=f"answer {i}", prompt_id=SampleMeta(j, g).key(pid),
                            sample=j, greedy=g, rewards={"r": 0.5} if style != "validation" else {})
               for i, (pid, j, g) in enumerate(answers, start=1)]
    return SampleEvent(step=3, stage="validation" if style == "validation" else "step_3", prefix="val", style=style, samples=records)


def test_console_block_says_which_answer_is_which_and_prints_each_prompt_once():
    from trainer.tracking.console import format_samples

    two_by_two_and_greedy = [("a", 0, False), ("a", 1, False), ("a", 0, True), ("b", 0, False), ("b", 1, False), ("b", 0, True)]
    assert format_samples(_event("validation", two_by_two_and_greedy), 100).splitlines() == [
        "=== Validation Samples (Step 3) ===",
        "Prompt 1: prompt a",
        "Generation 1 (prompt 1, sample 1/2): answer 1",
        "Generation 2 (prompt 1, sample 2/2): answer 2",
        "Generation 3 (prompt 1, greedy): answer 3",
        "-" * 50,
        "Prompt 2: prompt b",
        "Generation 4 (prompt 2, sample 1/2): answer 4",
        "Generation 5 (prompt 2, sample 2/2): answer 5",
        "Generation 6 (prompt 2, greedy): answer 6",
        "-" * 50,
    ]
    assert format_samples(_event("qualitative", two_by_two_and_greedy[:3]), 100).splitlines() == [
        "=" * 80,
        "Qualitative samples (step_3) - prompts: 1, answers: 3",
        "[Prompt 1/1] Prompt: prompt a",
        "[Sample 1/3] Response (prompt 1, sample 1/2): answer 1",
        "[Sample 1/3] Rewards: {'r': 0.5}",
        "[Sample 2/3] Response (prompt 1, sample 2/2): answer 2",
        "[Sample 2/3] Rewards: {'r': 0.5}",
        "[Sample 3/3] Response (prompt 1, greedy): answer 3",
        "[Sample 3/3] Rewards: {'r': 0.5}",
        "=" * 80,
    ]
    # one answer per prompt, no greedy one: the seed documents' form, unchanged
    one_each = [("a", 0, False), ("b", 0, False)]
    assert format_samples(_event("validation", one_each), 100).splitlines() == [
        "=== Validation Samples (Step 3) ===", "Prompt 1: prompt a", "Generation 1: answer 1", "-" * 50,
        "Prompt 2: prompt b", "Generation 2: answer 2", "-" * 50,
    ]
    assert format_samples(_event("qualitative", one_each), 100).splitlines() == [
        "=" * 80, "Qualitative samples (step_3) - prompts: 2",
        "[Sample 1/2] Prompt: prompt a", "[Sample 1/2] Response: answer 1", "[Sample 1/2] Rewards: {'r': 0.5}",
        "[Sample 2/2] Prompt: prompt b", "[Sample 2/2] Response: answer 2", "[Sample 2/2] Rewards: {'r': 0.5}", "=" * 80,
    ]
