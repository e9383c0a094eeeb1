"""From a composed Hydra config to a checked, typed config.

`resolve(cfg, cli_overrides, env, schema, world_size)` applies `VERL_*` environment overrides
to the keys the command line did not set, merges onto the typed schema (unknown keys and
wrong types fail naming the key), runs the value checks, and reports where values came from.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Type, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from config import env as env_module
from config.schema import ConfigError

T = TypeVar("T")
_MISSING = object()

DEMO_ASSETS = Path(__file__).resolve().parent / "demo_assets"


def _demo_asset(name: str) -> str:
    return str(DEMO_ASSETS / name)


def register_resolvers() -> None:
    """`${demo_asset:name}` points at a file bundled with the project (the offline demo)."""
    if not OmegaConf.has_resolver("demo_asset"):
        OmegaConf.register_new_resolver("demo_asset", _demo_asset)


register_resolvers()


@dataclass
class Resolved:
    config: Any
    from_env: dict[str, str] = field(default_factory=dict)  # dotted key -> variable name
    ignored_env: dict[str, str] = field(default_factory=dict)  # env set, but the command line won
    notes: list[str] = field(default_factory=list)  # what verl keys did (config.verl), for the log


def override_keys(overrides: Iterable[str]) -> set[str]:
    """Dotted keys set by Hydra command-line overrides (`a.b=1`, `+a.b=1`, `++a.b=1`, `~a.b`)."""
    keys = set()
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~").strip()
        keys.add(key.split("@", 1)[0])
    return keys


def _set_by_cli(key: str, cli_keys: set[str]) -> bool:
    # `generation.top_k=5` sets the key; `generation=other` replaces the whole group.
    parts = key.split(".")
    return any(".".join(parts[:i]) in cli_keys for i in range(1, len(parts) + 1))


def _not_read(key: str, not_read: Mapping[str, str]) -> str | None:
    """What to use instead of `key`, when this trainer does not read it (the longest listed prefix)."""
    parts = key.split(".")
    return next((not_read[p] for p in (".".join(parts[:i]) for i in range(len(parts), 0, -1)) if p in not_read), None)


def _refuse_not_read(container: dict, defaults: DictConfig, cli_keys: set[str], env: Mapping[str, str],
                     not_read: Mapping[str, str]) -> None:
    """A key this trainer does not read, set anyway, stops the run in one line naming what to use:
    from the environment, the command line, or a YAML value other than the schema's default."""
    for key, (_, variable) in env_module.env_overrides(env).items():
        instead = _not_read(key, not_read)
        if instead:
            raise ConfigError(f"{variable}={env[variable]!r} sets {key}, which this trainer does not read; use {instead}")
    for key in sorted(cli_keys):
        instead = _not_read(key, not_read)
        if instead:
            raise ConfigError(f"{key}: not read by this trainer; use {instead}")
    raw = OmegaConf.create(container)
    for key, instead in not_read.items():
        value = OmegaConf.select(raw, key, default=_MISSING)
        if value is not _MISSING and value != OmegaConf.select(defaults, key, default=_MISSING):
            raise ConfigError(f"{key}={value}: not read by this trainer; use {instead}")


def _merge_error(err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None) or "config"
    if isinstance(err, ConfigKeyError):
        return ConfigError(f"{key}: unknown key (check the spelling; `+{key}=...` cannot add keys the schema lacks)")
    if isinstance(err, ValidationError):
        value = getattr(err, "value", None)
        msg = str(err).splitlines()[0]
        return ConfigError(f"{key}: wrong type ({msg})" if value is None else f"{key}: {value!r} is the wrong type ({msg})")
    return ConfigError(f"{key}: {str(err).splitlines()[0]}")


def resolve(
    cfg: DictConfig | Mapping,
    schema: Type[T],
    cli_overrides: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    world_size: int = 1,
    preprocess: Callable[[dict], dict] | None = None,
) -> Resolved:
    """verl's own keys are taken out of the composed config first (`config.verl`, by schema);
    what they did is returned in `notes`, to be logged."""
    from config.verl import translator

    env = env_module.environ() if env is None else env
    container = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    container.pop("hydra", None)
    cli_keys = override_keys(cli_overrides)
    resolved = Resolved(config=None)
    if preprocess:
        container = preprocess(container)
    verl_keys = translator(schema)
    if verl_keys:
        resolved.notes = verl_keys(container, world_size, cli_keys).notes
    raw = OmegaConf.create(container)
    defaults = OmegaConf.structured(schema)
    _refuse_not_read(container, defaults, cli_keys, env, getattr(schema, "NOT_READ", {}))
    for key, (value, variable) in env_module.env_overrides(env).items():
        if OmegaConf.select(defaults, key, default=_MISSING) is _MISSING:
            continue  # this trainer has no such setting (and no NOT_READ entry naming what to use)
        if _set_by_cli(key, cli_keys):
            resolved.ignored_env[key] = variable
            continue
        OmegaConf.update(raw, key, value, force_add=True)
        resolved.from_env[key] = variable

    try:
        merged = OmegaConf.merge(defaults, raw)
        typed = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _merge_error(err) from None
    typed.check(world_size)
    resolved.config = typed
    return resolved


def to_dict(typed: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(typed), resolve=True)


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def redact(value: Any, name: str = "") -> Any:
    """A copy with every value whose key names a secret (KEY, TOKEN, SECRET, PASSWORD) removed."""
    if isinstance(value, Mapping):
        return {k: ("<redacted>" if env_module.is_secret_name(str(k)) else redact(v, str(k))) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, name) for v in value]
    return value


_URI_CREDENTIALS = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")


def redact_credentials(text: str) -> str:
    """`scheme://user:token@host` -> `scheme://***@host`, wherever it appears in `text` (a
    tracker URI in a log line or in an exception's message)."""
    return _URI_CREDENTIALS.sub(r"\1***@", text)


class _RedactCredentials(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_credentials(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def redact_log_credentials(logger: logging.Logger) -> None:
    """Every line `logger`'s handlers write, without the credentials of a URI in it: the root
    logger's (ours and most libraries'), and those of libraries with their own handler (MLflow
    names its tracking URI in its lines)."""
    for handler in logger.handlers:
        if not any(isinstance(f, _RedactCredentials) for f in handler.filters):
            handler.addFilter(_RedactCredentials())


def format_config(typed: Any, from_env: Mapping[str, str]) -> str:
    """The resolved config as YAML, each environment-set value marked with its variable."""
    lines = OmegaConf.to_yaml(OmegaConf.create(redact(to_dict(typed)))).splitlines()
    out, path = [], []
    for line in lines:
        stripped = line.lstrip(" ")
        depth = (len(line) - len(stripped)) // 2
        key = stripped.split(":", 1)[0] if ":" in stripped and not stripped.startswith("- ") else None
        if key is not None:
            path = path[:depth] + [key]
            dotted = ".".join(path)
            if dotted in from_env:
                line = f"{line}  # from {from_env[dotted]}"
        out.append(line)
    return "\n".join(out)
