"""Task metrics on logged samples: the reward functions' registry and signature, a second use.

A metric is any scoring function of `workers.rewards` (a registered name or `module:function`,
`fn(prompt, response, ground_truth, **kwargs) -> float | None`), so every RL reward also works as
an SFT metric and the other way round. This module builds the configured set (checked before any
model) and summarises an event's scores: means, pass@k and mean@k over k samples per prompt.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any, Optional, Sequence

from config.schema import ConfigError
from workers.rewards import NEEDS_PACKAGE, REWARD_FUNCTIONS, NamedReward, RewardError, RewardSet, resolve_function


def build_metric_set(specs: Sequence[Any], key: str = "samples.metrics") -> RewardSet:
    """From config entries ({name, fn, kwargs}); every problem is a one-line ConfigError naming the key."""
    metrics, seen = [], {}
    for i, spec in enumerate(specs):
        get = spec.get if isinstance(spec, dict) else lambda k, d=None: getattr(spec, k, d)
        fn_spec = get("fn") or get("name")
        where = f"{key}[{i}]"
        if not fn_spec:
            raise ConfigError(f"{where}.fn: is required (a registered name or module:function)")
        try:
            fn = resolve_function(fn_spec)
        except RewardError as err:
            raise ConfigError(f"{where}.fn: {err}".replace("reward function", "metric")) from None
        if isinstance(fn_spec, str) and fn_spec in NEEDS_PACKAGE and REWARD_FUNCTIONS.get(fn_spec) is fn:
            module, package = NEEDS_PACKAGE[fn_spec]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"{where}.fn: {fn_spec} needs the {package} package: "
                                  f"pip install '{package}' (or the project's [eval] extra)")
        name = get("name") or (fn_spec.rpartition(":")[2] if isinstance(fn_spec, str) else f"metric_{i}")
        if name in seen:
            raise ConfigError(f"{where}.name: {name!r} is also {key}[{seen[name]}]; metric names must be unique")
        seen[name] = i
        metrics.append(NamedReward(name, fn, 1.0, dict(get("kwargs") or {})))
    return RewardSet(metrics)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are right (Chen et al. 2021, "Evaluating Large
    Language Models Trained on Code", eq. 1): 1 - C(n-c, k) / C(n, k), as their stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def is_binary(values: Sequence[float]) -> bool:
    return all(v in (0.0, 1.0) for v in values)


def mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def at_k(per_prompt: Sequence[Sequence[float]], k: int) -> dict[str, float]:
    """mean@k (each prompt's mean over its k samples, averaged over prompts) and, for a metric
    that says right or wrong (values 0/1), pass@k (some sample right; unbiased estimator)."""
    groups = [list(v) for v in per_prompt if len(v) >= k]
    if not groups:
        return {}
    out = {f"mean@{k}": sum(sum(g) / len(g) for g in groups) / len(groups)}
    if all(is_binary(g) for g in groups):
        out[f"pass@{k}"] = sum(pass_at_k(len(g), int(sum(g)), k) for g in groups) / len(groups)
    return out
