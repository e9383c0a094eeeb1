"""Scoring functions: one registry of named built-ins plus user functions, for two uses: RL
rewards (`reward.functions`) and task metrics on logged samples (`samples.metrics`,
`workers.metrics`). Every reward is a metric and every metric a reward.

A function is `fn(prompt: str, response: str, ground_truth: str | None, **kwargs)` and returns
a float, or None when it does not apply (e.g. no ground truth for a free-text sample prompt);
None is left out of the logged rewards and metrics and counts as 0 in the training reward.
Users give functions as `module:function` in YAML or as callables in Python, each with a name.
"""

from __future__ import annotations

import importlib
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

RewardFn = Callable[..., Optional[float]]
REWARD_FUNCTIONS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def wrap(fn: RewardFn) -> RewardFn:
        REWARD_FUNCTIONS[name] = fn
        return fn

    return wrap


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_SUM_PROMPT = re.compile(r"^\s*(-?\d+)\s*\+\s*(-?\d+)\s*=\s*$")


@register_reward("arithmetic_exact_match")
def arithmetic_exact_match(prompt: str, response: str, ground_truth: Optional[str] = None, **_: Any) -> Optional[float]:
    """The bundled task's checker: 1.0 when the response is exactly the sum.

    Without a ground truth it computes the answer from an `a+b=` prompt, so qualitative sample
    prompts of the demo are scored too; other prompts get None.
    """
    if ground_truth is None:
        match = _SUM_PROMPT.match(prompt)
        if not match:
            return None
        ground_truth = str(int(match.group(1)) + int(match.group(2)))
    return float(response.strip() == str(ground_truth).strip())


@register_reward("exact_match")
def exact_match(prompt: str, response: str, ground_truth: Optional[str] = None, **_: Any) -> Optional[float]:
    """1.0 when the response equals the ground truth after trimming whitespace."""
    if ground_truth is None:
        return None
    return float(response.strip() == str(ground_truth).strip())


_FINAL_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def final_number(text: str) -> Optional[str]:
    """GSM8K's answer: the number after `####`, else the last number in the text; commas and a
    trailing `.0` dropped (`1,234.0` -> `1234`), so equal numbers compare equal as text."""
    marked = _FINAL_ANSWER.search(text)
    found = [marked.group(1)] if marked else _NUMBER.findall(text.replace(",", ""))
    if not found:
        return None
    number = found[-1].replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return "0" if number in ("-0", "") else number


@register_reward("last_number_match")
def last_number_match(prompt: str, response: str, ground_truth: Optional[str] = None, **_: Any) -> Optional[float]:
    """GSM8K style: the response's final number (after `####`, else its last) equals the ground
    truth's (after `####`, else its last)."""
    if ground_truth is None:
        return None
    want, got = final_number(str(ground_truth)), final_number(response)
    return float(want is not None and got == want)


@register_reward("contains")
def contains(prompt: str, response: str, ground_truth: Optional[str] = None, text: Optional[str] = None,
             ignore_case: bool = False, **_: Any) -> Optional[float]:
    """1.0 when the response contains `text` (kwargs), else the ground truth (trimmed)."""
    needle = text if text is not None else ground_truth
    if needle is None:
        return None
    needle, hay = str(needle).strip(), response
    if ignore_case:
        needle, hay = needle.lower(), hay.lower()
    return float(needle in hay)


@register_reward("rouge_l")
def rouge_l(prompt: str, response: str, ground_truth: Optional[str] = None, use_stemmer: bool = False,
            **_: Any) -> Optional[float]:
    """ROUGE-L F-measure against the ground truth, from Google's `rouge-score` package."""
    if ground_truth is None:
        return None
    return _rouge_scorer(use_stemmer).score(str(ground_truth), response)["rougeL"].fmeasure


_SCORERS: dict[bool, Any] = {}


def _rouge_scorer(use_stemmer: bool):
    if use_stemmer not in _SCORERS:
        from rouge_score import rouge_scorer  # optional: the `eval` extra

        _SCORERS[use_stemmer] = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    return _SCORERS[use_stemmer]


@register_reward("length_chars")
def length_chars(prompt: str, response: str, ground_truth: Optional[str] = None, **_: Any) -> float:
    """The response's length in characters (a metric to watch, not a reward to train on)."""
    return float(len(response))


# Registered functions that need an optional package: (import name, pip extra naming it).
NEEDS_PACKAGE = {"rouge_l": ("rouge_score", "rouge-score")}


@register_reward("length_penalty")
def length_penalty(prompt: str, response: str, ground_truth: Optional[str] = None, max_chars: int = 200, **_: Any) -> float:
    """0 up to `max_chars` characters, then falling linearly to -1 at twice that length."""
    excess = max(0, len(response) - max_chars)
    return -min(1.0, excess / max_chars)


@register_reward("format_regex")
def format_regex(prompt: str, response: str, ground_truth: Optional[str] = None, pattern: str = r"-?\d+", **_: Any) -> float:
    """1.0 when the whole response (trimmed) matches `pattern`."""
    return float(re.fullmatch(pattern, response.strip(), flags=re.DOTALL) is not None)


class RewardError(ValueError):
    """A reward function could not be found or built; the message names it."""


def resolve_function(spec: str | RewardFn) -> RewardFn:
    if callable(spec):
        return spec
    if spec in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[spec]
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise RewardError(f"reward function {spec!r} cannot be imported ({type(err).__name__}: {err})") from None
        if not callable(fn):
            raise RewardError(f"reward function {spec!r} is not callable")
        return fn
    raise RewardError(f"unknown reward function {spec!r}: use a registered name ({', '.join(sorted(REWARD_FUNCTIONS))}) or module:function")


@dataclass
class NamedReward:
    name: str
    fn: RewardFn
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)

    def __call__(self, prompt: str, response: str, ground_truth: Optional[str]) -> Optional[float]:
        on = f"prompt {prompt[:60]!r}, response {response[:60]!r}"
        try:
            value = self.fn(prompt, response, ground_truth, **self.kwargs)
        except Exception as err:  # noqa: BLE001 - the user's code: say which function, where, on what
            frame = traceback.extract_tb(err.__traceback__)[-1]
            raise RewardError(f"reward function {self.name!r} raised {type(err).__name__}: {err} "
                              f"(at {Path(frame.filename).name}:{frame.lineno}; {on})") from err
        if value is None:
            return None  # not applicable to this prompt
        try:
            return float(value)
        except (TypeError, ValueError):
            raise RewardError(f"reward function {self.name!r} returned {value!r}, not a number or None ({on})") from None


class RewardSet:
    """Every registered reward of a trainer; scores one response by each, and their weighted sum.

    `scored_elsewhere` ({name: weight}) are rewards whose scores the trainer adds to each response's
    scores itself (a reward model: a collective forward, not a per-response function call); they
    count in `names` and `total` like the functions."""

    def __init__(self, rewards: Sequence[NamedReward], scored_elsewhere: Optional[dict[str, float]] = None):
        self.rewards = list(rewards)
        self.scored_elsewhere = dict(scored_elsewhere or {})

    def with_scored_elsewhere(self, name: str, weight: float) -> "RewardSet":
        if name in self.names:
            raise RewardError(f"reward name {name!r} is taken by a reward function (names: {', '.join(self.names)})")
        return RewardSet(self.rewards, {**self.scored_elsewhere, name: weight})

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards] + list(self.scored_elsewhere)

    def score(self, prompt: str, response: str, ground_truth: Optional[str]) -> dict[str, float]:
        scores = {}
        for r in self.rewards:
            value = r(prompt, response, ground_truth)
            if value is not None:
                scores[r.name] = value
        return scores

    def total(self, scores: dict[str, float]) -> float:
        return (sum(r.weight * scores.get(r.name, 0.0) for r in self.rewards)
                + sum(weight * scores.get(name, 0.0) for name, weight in self.scored_elsewhere.items()))


def build_reward_set(specs: Sequence[Any]) -> RewardSet:
    """From config entries ({name, fn, weight, kwargs}), callables, or (name, callable) pairs.

    A callable without a name is called `reward_<i>`, as in the sample-logging document.
    """
    rewards = []
    for i, spec in enumerate(specs):
        if isinstance(spec, NamedReward):
            rewards.append(spec)
        elif isinstance(spec, str):
            rewards.append(NamedReward(spec, resolve_function(spec)))
        elif callable(spec):
            rewards.append(NamedReward(getattr(spec, "reward_name", None) or f"reward_{i}", spec))
        elif isinstance(spec, tuple) and len(spec) == 2:
            rewards.append(NamedReward(spec[0], resolve_function(spec[1])))
        else:
            get = spec.get if isinstance(spec, dict) else lambda k, d=None: getattr(spec, k, d)
            fn_spec = get("fn")
            name = get("name") or (fn_spec if isinstance(fn_spec, str) else f"reward_{i}")
            rewards.append(NamedReward(name, resolve_function(fn_spec), float(get("weight", 1.0)), dict(get("kwargs") or {})))
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise RewardError(f"reward function names must be unique, got {names}")
    return RewardSet(rewards)
