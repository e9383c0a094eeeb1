"""Environment variables: the only module that reads `os.environ`.

`VERL_*` variables override config values (command line > environment > YAML). A bad value
stops the run with one line naming the variable and what it accepts. The process-group and
tracker variables are read here too and handed to the code that needs them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

from config.schema import ConfigError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError


def _parse_positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value == float("inf"):
        raise ValueError
    return value


def _parse_unit_interval(raw: str) -> float:
    value = float(raw)
    if not 0 < value <= 1:
        raise ValueError
    return value


def _parse_count(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw.strip())
        if value < minimum:
            raise ValueError
        return value

    return parse


@dataclass(frozen=True)
class EnvOverride:
    variable: str
    key: str  # dotted config key it overrides
    parse: Callable[[str], object]
    accepts: str  # shown when the value is bad


ENV_OVERRIDES: tuple[EnvOverride, ...] = (
    EnvOverride("VERL_GENERATION_TEMPERATURE", "generation.temperature", _parse_positive_float, "a number > 0"),
    EnvOverride("VERL_GENERATION_TOP_K", "generation.top_k", _parse_count(0), "an integer >= 0 (0 turns top-k off)"),
    EnvOverride("VERL_GENERATION_TOP_P", "generation.top_p", _parse_unit_interval, "a number in (0, 1]"),
    EnvOverride("VERL_GENERATION_DO_SAMPLE", "generation.do_sample", _parse_bool, "true/false (also 1/0, yes/no, on/off)"),
    EnvOverride("VERL_GENERATION_MAX_NEW_TOKENS", "generation.max_new_tokens", _parse_count(1), "an integer >= 1"),
    EnvOverride("VERL_MAX_VAL_SAMPLES", "trainer.max_val_samples", _parse_count(0), "an integer >= 0"),
)

LOG_LEVEL_VARIABLE = "VERL_SFT_LOGGING_LEVEL"
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def environ() -> Mapping[str, str]:
    return os.environ


def env_overrides(env: Mapping[str, str]) -> dict[str, tuple[object, str]]:
    """Parsed `VERL_*` overrides: {dotted key: (value, variable name)}. Raises ConfigError."""
    found: dict[str, tuple[object, str]] = {}
    for spec in ENV_OVERRIDES:
        raw = env.get(spec.variable)
        if raw is None or raw.strip() == "":
            continue
        try:
            value = spec.parse(raw)
        except ValueError:
            raise ConfigError(f"{spec.variable}={raw!r} is not valid: expected {spec.accepts}") from None
        found[spec.key] = (value, spec.variable)
    return found


def token_cache_dir(env: Mapping[str, str]) -> str:
    """The token cache's default folder (data.cache_dir=null), after the XDG convention."""
    root = env.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return str(Path(root) / "sample-aware-trainer" / "tokens")


def log_level(env: Mapping[str, str]) -> int:
    raw = env.get(LOG_LEVEL_VARIABLE, "").strip().upper()
    if not raw:
        return logging.INFO
    if raw not in _LOG_LEVELS:
        raise ConfigError(f"{LOG_LEVEL_VARIABLE}={raw!r} is not valid: expected one of {', '.join(_LOG_LEVELS)}")
    return getattr(logging, raw)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    launched: bool  # under torchrun (or another env:// launcher)


def dist_env(env: Optional[Mapping[str, str]] = None) -> DistEnv:
    env = os.environ if env is None else env
    launched = "RANK" in env and "WORLD_SIZE" in env
    return DistEnv(
        rank=int(env.get("RANK", 0)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        launched=launched,
    )


@dataclass(frozen=True)
class ClientBound:
    """A limit on how long a tracker's own client may wait on its server, set through the
    client's environment variable (the only knob it reads) unless the user set that variable."""

    variable: str
    value: str
    why: str


# The tracker clients' defaults wait minutes for a server that went away; these keep one call
# in tens of seconds. They matter off the training path too: the tracker's start, and its drain
# at close, are bounded by them. Checked against mlflow 3.17 and wandb 0.31 (their sources).
TRACKER_CLIENT_BOUNDS: tuple[ClientBound, ...] = (
    ClientBound("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2", "default 7 retries, back-off 2 s doubling: ~4 min per call"),
    ClientBound("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1", "default 2 (s, doubled per retry)"),
    ClientBound("MLFLOW_HTTP_REQUEST_TIMEOUT", "10", "default 120 s per request"),
    ClientBound("WANDB_INIT_TIMEOUT", "30", "default 90 s for wandb.init"),
    ClientBound("WANDB_FINISH_TIMEOUT", "60", "default 0: run.finish() waits until every upload is done"),
)


@dataclass(frozen=True)
class TrackerEnv:
    """What the trackers need to know about their environment variables."""

    mlflow_tracking_uri: Optional[str]
    swanlab_mode: Optional[str]
    wandb_mode: Optional[str]
    # (variable, value) of each TRACKER_CLIENT_BOUNDS entry the user left unset; the tracker
    # fan-out applies them (`apply_client_bounds`) on the rank that talks to the servers.
    client_bounds: tuple[tuple[str, str], ...] = ()


def tracker_env(env: Optional[Mapping[str, str]] = None) -> TrackerEnv:
    env = os.environ if env is None else env
    return TrackerEnv(
        mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI") or None,
        swanlab_mode=env.get("SWANLAB_MODE") or None,
        wandb_mode=env.get("WANDB_MODE") or None,
        client_bounds=tuple((b.variable, b.value) for b in TRACKER_CLIENT_BOUNDS if not env.get(b.variable, "").strip()),
    )


def apply_client_bounds(bounds: tuple[tuple[str, str], ...]) -> None:
    """Set the tracker clients' bounds in this process's environment, where their clients read
    them (per request for MLflow, at init for W&B); a variable the user set is never replaced."""
    for variable, value in bounds:
        os.environ.setdefault(variable, value)


SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
# Our own keys that contain a marker but hold column names or counts. Anything else with a
# marker in its name (a reward function's kwargs, an environment variable) is hidden.
NOT_SECRETS = frozenset({
    "prompt_key", "response_key", "answer_key", "messages_key", "prompt_dict_keys", "response_dict_keys",
    "tools_key", "enable_thinking_key", "completion_key",
    "max_new_tokens", "max_token_len_per_gpu", "max_num_batched_tokens",
    "ppo_max_token_len_per_gpu", "log_prob_max_token_len_per_gpu", "forward_max_token_len_per_gpu",  # RL's token budgets
})


def is_secret_name(name: str) -> bool:
    if name in NOT_SECRETS:
        return False
    upper = name.upper()
    return any(marker in upper for marker in SECRET_MARKERS)


def prepare_vllm_env(cpu_kvcache_space_gib: float, env=None) -> None:
    """The environment an in-process vLLM engine needs (`rollout.name=vllm`), set before it is built.

    The engine runs in the training process (TRL's colocate mode, verl's hybrid engine): no engine
    core process of its own (`VLLM_ENABLE_V1_MULTIPROCESSING=0`; the external launcher sets the
    same). On CPU its KV cache is `VLLM_CPU_KVCACHE_SPACE` GiB per rank (`rollout.vllm.cpu_kvcache_space_gib`).
    A value the user exported wins.
    """
    env = os.environ if env is None else env
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cpu_kvcache_space_gib:g}")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines print the whole engine config per rank
