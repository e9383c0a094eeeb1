"""Reward functions: a registry of named built-ins plus user functions.

A reward function is `fn(prompt: str, response: str, ground_truth: str | None, **kwargs)` and
returns a float, or None when it does not apply (e.g. no ground truth for a free-text sample
prompt); None is left out of the logged rewards and counts as 0 in the training reward.
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


@register_reward("last_number_match")
def last_number_match(prompt: str, response: str, ground_truth: Optional[str] = None, **_: Any) -> Optional[float]:
    """GSM8K style: the last number in the response equals the last number of the ground truth."""
    if ground_truth is None:
        return None
    want = _NUMBER.findall(str(ground_truth).replace(",", ""))
    got = _NUMBER.findall(response.replace(",", ""))
    return float(bool(want) and bool(got) and float(got[-1]) == float(want[-1]))


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
