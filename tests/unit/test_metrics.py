"""Task metrics: the built-ins, the shared registry, pass@k/mean@k and an event's summary."""

import itertools
import math
import random

import pytest

from config.schema import AlertConfig, ConfigError, MetricConfig, SamplesConfig
from trainer.history import HISTORY_FILE, SampleHistory
from trainer.samples import metric_summary
from trainer.tracking import SampleEvent, SampleRecord
from trainer.tracking.file import read_records
from workers.generation import Generated, GenerationSettings
from workers.metrics import at_k, build_metric_set, pass_at_k
from workers.rewards import REWARD_FUNCTIONS, build_reward_set, contains, final_number, last_number_match, length_chars, rouge_l

GSM8K_REFERENCE = "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips altogether.\n#### 72"


def test_last_number_match_reads_gsm8k_answers():
    reasoned = "She sold 48 + 24 = 72 clips.\n#### 72"
    assert last_number_match("", reasoned, GSM8K_REFERENCE) == 1.0
    assert last_number_match("", "72", GSM8K_REFERENCE) == 1.0
    assert last_number_match("", "#### 72 because 3 more", GSM8K_REFERENCE) == 1.0  # the marked number wins
    assert last_number_match("", "#### 71", GSM8K_REFERENCE) == 0.0
    assert last_number_match("", "no number", GSM8K_REFERENCE) == 0.0
    assert last_number_match("", "The total is 1,234.0 dollars", "#### 1234") == 1.0  # commas and a trailing .0
    assert last_number_match("", "-3.50", "-3.5") == 1.0
    assert last_number_match("", "3.05", "3.5") == 0.0
    assert last_number_match("", "72", None) is None
    assert final_number("x #### 1,000") == "1000" and final_number("nothing") is None


def test_the_other_builtins():
    assert contains("", "the answer is Paris.", "Paris") == 1.0
    assert contains("", "the answer is paris.", "Paris") == 0.0
    assert contains("", "the answer is paris.", "Paris", ignore_case=True) == 1.0
    assert contains("", "say hi", None, text="hi") == 1.0 and contains("", "x", None) is None
    assert rouge_l("", "the cat sat", "the cat sat down") == pytest.approx(2 * 0.75 / 1.75)  # P=1, R=3/4
    assert rouge_l("", "the cat sat", "the cat sat") == 1.0 and rouge_l("", "x", None) is None
    assert length_chars("", "hello", None) == 5.0


def test_one_registry_for_rewards_and_metrics():
    metrics = build_metric_set([MetricConfig("gsm8k", "last_number_match"), {"name": "short", "fn": "format_regex",
                                                                              "kwargs": {"pattern": r"\d+"}}])
    assert metrics.names == ["gsm8k", "short"]
    assert metrics.score("", "#### 72", GSM8K_REFERENCE) == {"gsm8k": 1.0, "short": 0.0}
    # A metric is a reward and the other way round: the same function objects.
    rewards = build_reward_set([{"name": "lnm", "fn": "last_number_match"}, {"name": "rouge", "fn": "rouge_l"}])
    assert rewards.rewards[0].fn is metrics.rewards[0].fn is REWARD_FUNCTIONS["last_number_match"]
    user = build_metric_set([{"name": "mine", "fn": "workers.rewards:length_chars"}])
    assert user.score("", "abc", None) == {"mine": 3.0}
    assert build_metric_set([{"fn": "workers.rewards:length_chars"}]).names == ["length_chars"]  # the function's name


@pytest.mark.parametrize("spec, key, words", [
    ([{"fn": "exact_match"}, {"fn": "no_such_metric"}], "samples.metrics[1].fn: ", "no_such_metric"),
    ([{"fn": "nowhere_module:fn"}], "samples.metrics[0].fn: ", "cannot be imported"),
    ([{"name": "a", "fn": "exact_match"}, {"name": "a", "fn": "contains"}], "samples.metrics[1].name: ", "unique"),
])
def test_a_bad_metric_is_one_line_naming_the_key(spec, key, words):
    with pytest.raises(ConfigError) as err:
        build_metric_set(spec)
    message = str(err.value)
    assert message.startswith(key) and words in message and "\n" not in message


def test_alert_metric_must_be_a_configured_metric():
    cfg = SamplesConfig(alerts=AlertConfig(metric="rouge_l"))
    with pytest.raises(ConfigError, match=r"^samples.alerts.metric: 'rouge_l' is not one of samples.metrics"):
        cfg.check()
    cfg = SamplesConfig(metrics=[MetricConfig("gsm8k", "last_number_match")])
    cfg.check()
    assert cfg.alerts.metric == "gsm8k"  # null: the first metric


def test_pass_at_k_is_chen_et_al_unbiased_estimator():
    def by_definition(n, c, k):
        return 1 - math.comb(n - c, k) / math.comb(n, k)

    for n, c, k in itertools.product(range(1, 9), range(0, 9), range(1, 9)):
        if c <= n and k <= n:
            assert pass_at_k(n, c, k) == pytest.approx(by_definition(n, c, k)), (n, c, k)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4) and pass_at_k(5, 2, 2) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_pass_at_k_is_never_below_mean_at_k():
    rng = random.Random(0)
    for _ in range(200):
        k = rng.randint(1, 6)
        groups = [[float(rng.random() < 0.3) for _ in range(k)] for _ in range(rng.randint(1, 5))]
        out = at_k(groups, k)
        assert out[f"pass@{k}"] >= out[f"mean@{k}"] - 1e-12
    assert "pass@2" not in at_k([[0.5, 1.0]], 2)  # a graded metric has no right/wrong: mean@k only


def _record(i, pid, sample, metrics, greedy=False, tags=()):
    return SampleRecord(index=i, prompt="p", generation="g", metrics=metrics, sample=sample, greedy=greedy,
                        tags=list(tags), prompt_id=pid)


def test_event_summary_means_at_k_greedy_and_tags():
    records = [
        _record(1, "a", 0, {"em": 1.0}, tags=["math"]), _record(2, "a", 1, {"em": 0.0}, tags=["math"]),
        _record(3, "a", 0, {"em": 0.0}, greedy=True, tags=["math"]),
        _record(4, "b", 0, {"em": 0.0}, tags=["format"]), _record(5, "b", 1, {"em": 0.0}, tags=["format"]),
        _record(6, "b", 0, {"em": 1.0}, greedy=True, tags=["format"]),
        _record(7, "c", 0, {}), _record(8, "c", 1, {}),  # the metric did not apply (no reference)
    ]
    out = metric_summary("val", records, ["em"], [r.prompt_id for r in records])
    assert out == {
        "val/metric/em": 0.25, "val/metric/em/greedy": 0.5, "val/metric/em/mean@2": 0.25, "val/metric/em/pass@2": 0.5,
        "val/tag/format/metric/em": 0.0, "val/tag/math/metric/em": 0.5,
    }


def test_drop_and_forgetting_rules_watch_the_configured_metric(tmp_path):
    history = SampleHistory(tmp_path, AlertConfig(noise_z=0, metric="gsm8k", persist_events=1))
    settings = GenerationSettings(max_new_tokens=8)

    def record(step, values):
        samples = [SampleRecord(index=i + 1, prompt=f"p{i}", generation=f"answer {step} {i}", reference="#### 1",
                                prompt_id=f"id{i}", metrics={"gsm8k": v}) for i, v in enumerate(values)]
        gens = [Generated([1], [5, 6], s.generation, True) for s in samples]
        ev = SampleEvent(step, "validation", "val", "validation", samples)
        return history.record(ev, gens, settings, list(range(len(values))))

    record(1, [1.0, 1.0, 1.0])
    record(2, [1.0, 1.0, 1.0])  # every prompt right twice in a row: mastered
    metrics = record(3, [0.0, 0.0, 1.0])  # exact match (signals) stays None: no reference match
    rules = {r["rule"]: r["message"] for r in read_records(tmp_path / HISTORY_FILE) if r["kind"] == "alert"}
    assert set(rules) == {"gsm8k_drop", "forgetting"}, rules
    assert rules["gsm8k_drop"].startswith("gsm8k 0.33, best so far 1.00")
    assert "(gsm8k)" in rules["forgetting"]
    assert metrics["val/alert/gsm8k_drop"] == 1.0
    rows = [r for r in read_records(tmp_path / HISTORY_FILE) if r["kind"] == "sample"]
    assert rows[-1]["metrics"] == {"gsm8k": 1.0}
    # A resumed run remembers the watched metric's best from the file.
    again = SampleHistory(tmp_path, AlertConfig(noise_z=0, metric="gsm8k"), resume_step=3)
    assert again.series["val"].best_exact_match.value == 1.0
