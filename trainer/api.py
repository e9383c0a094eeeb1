"""Python API for the RL trainers.

    from trainer.api import create_rl_trainer

    trainer = create_rl_trainer(
        model_name="checkpoints/sft_demo/arithmetic/hf_model",   # local directory or hub id
        dataset_name="config/demo_assets/arithmetic",            # file, directory or hub id
        algorithm="ppo",                                         # ppo | grpo | gspo
        backend="fsdp",
        num_epochs=1,
        batch_size=16,                                           # prompts per optimizer step
        sample_logging={"enabled": True, "percent_of_max_steps": 0.5, "num_samples": 2},
        **{"optim.lr": 1e-5},                                    # any config key (or optim__lr=...)
    )
    trainer.train()

It composes the same Hydra config as `python -m trainer.rl_trainer --config-name <algorithm>_trainer`,
so YAML and Python runs are the same runs. `train()` works in one process or under torchrun.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from config import env as env_config
from config.rl_schema import RLConfig, SampleLoggingConfig, lift_flat_sample_logging
from config.schema import ConfigError
from trainer.cli import announce_config, setup_logging
from trainer.distributed import init_distributed, teardown
from trainer.rl_trainer import RLTrainer
from config.loading import resolve
from workers.rewards import build_reward_set

log = logging.getLogger("trainer.api")

ALGORITHMS = ("ppo", "grpo", "gspo")


@dataclass(frozen=True)
class Backend:
    description: str
    note: Optional[str] = None  # logged once when the run starts: what the name means here


_ON_FSDP = "runs on this project's FSDP2 workers (same algorithms and sample logging; {what} are not used here)"
# The AlignTune document's backend names run on the FSDP2 workers, so its examples run as written.
BACKENDS = {
    "fsdp": Backend("FSDP2 workers (one process, or many under torchrun)"),
    "auto": Backend("the best available: fsdp"),
    "unsloth": Backend("accepted: fsdp", "backend='unsloth' " + _ON_FSDP.format(what="Unsloth's kernels and 4-bit loading")),
    "trl": Backend("accepted: fsdp", "backend='trl' " + _ON_FSDP.format(what="TRL's trainers")),
}
_DATA_SUFFIXES = (".parquet", ".jsonl", ".json")


def _split_files(folder: Path) -> tuple[list[str], list[str]]:
    files = sorted(p for p in folder.rglob("*") if p.suffix in _DATA_SUFFIXES and p.is_file())
    val = [str(p) for p in files if any(tag in p.name for tag in ("val", "test", "valid"))]
    train = [str(p) for p in files if str(p) not in val]
    # verl's layout keeps RL prompts beside SFT files: prefer files that say so.
    rl_train = [f for f in train if "rl" in Path(f).name]
    rl_val = [f for f in val if "rl" in Path(f).name]
    return (rl_train or train), (rl_val or val)


def resolve_dataset(dataset_name: str) -> tuple[list[str], list[str]]:
    """(train files, validation files) of a local file or folder, or of a dataset on the hub."""
    path = Path(dataset_name).expanduser()
    if path.is_file():
        return [str(path)], []
    if not path.exists():
        from huggingface_hub import snapshot_download  # only when it is not a local path

        try:
            path = Path(snapshot_download(repo_id=dataset_name, repo_type="dataset", allow_patterns=["*.parquet", "*.jsonl", "*.json"]))
        except Exception as err:  # noqa: BLE001 - one line naming the culprit
            raise ConfigError(f"dataset_name={dataset_name!r} is neither a local path nor a reachable hub dataset ({type(err).__name__})") from None
    train, val = _split_files(path)
    if not train:
        raise ConfigError(f"dataset_name={dataset_name!r}: no .parquet or .jsonl training files found in {path}")
    return train, val


class RLRun:
    """What `create_rl_trainer` returns: the checked config, built into a trainer by `train()`."""

    def __init__(self, config: RLConfig, reward_functions: Optional[Sequence[Any]], from_env: dict, backend: Backend = BACKENDS["fsdp"]):
        self.config = config
        self.reward_functions = reward_functions
        self.from_env = from_env
        self.backend = backend
        self.trainer: Optional[RLTrainer] = None

    def train(self) -> RLTrainer:
        denv = env_config.dist_env()
        setup_logging(env_config.log_level(env_config.environ()), denv.rank)
        if self.backend.note and denv.rank == 0:
            log.info("%s", self.backend.note)
        ctx = init_distributed(denv, self.config.trainer.device, self.config.trainer.collective_timeout_seconds)
        rewards = build_reward_set(self.reward_functions) if self.reward_functions else None
        self.trainer = RLTrainer(self.config, ctx, rewards)
        self.trainer.fit()
        teardown()
        return self.trainer


def create_rl_trainer(
    model_name: str,
    dataset_name: str,
    algorithm: str = "grpo",
    backend: str = "fsdp",
    num_epochs: Optional[int] = None,
    batch_size: Optional[int] = None,
    reward_functions: Optional[Sequence[Callable | str | tuple | dict]] = None,
    sample_logging: Optional[dict | SampleLoggingConfig] = None,
    **config_keys: Any,
) -> RLRun:
    """Build an RL run. Everything is checked here, before any model is loaded.

    `batch_size` counts prompts per optimizer step (all ranks). `reward_functions` are callables
    (named `reward_0`, `reward_1`, ... unless they carry a `reward_name`), `(name, fn)` pairs,
    registered names, or `module:function` strings. Other keywords are config keys, dotted
    (`**{"rollout.max_new_tokens": 32}`) or with `__` for dots (`rollout__max_new_tokens=32`).
    """
    if backend not in BACKENDS:
        known = "; ".join(f"{k} ({v.description})" for k, v in BACKENDS.items())
        raise ConfigError(f"backend={backend!r} is not available; backends: {known}")
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm={algorithm!r} is not available; algorithms: {', '.join(ALGORITHMS)}")
    train_files, val_files = resolve_dataset(dataset_name)

    values: dict[str, Any] = {"model.partial_pretrain": model_name, "data.train_files": train_files,
                              "data.val_files": val_files or None}
    if num_epochs is not None:
        values["trainer.total_epochs"] = num_epochs
        values["trainer.total_training_steps"] = None  # the epochs decide
    if batch_size is not None:
        values["data.prompts_per_step"] = batch_size
    for key, value in config_keys.items():
        values[key.replace("__", ".")] = value

    with initialize_config_module(config_module="config", version_base="1.3"):
        cfg = compose(f"{algorithm}_trainer")
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, force_add=True)  # an unknown key fails in resolve(), named
    if sample_logging is not None:
        # Merged into a SampleLoggingConfig with the documented defaults, which validates it.
        given = asdict(sample_logging) if isinstance(sample_logging, SampleLoggingConfig) else dict(sample_logging)
        unknown = set(given) - SampleLoggingConfig.field_names()
        if unknown:
            raise ConfigError(f"sample_logging.{sorted(unknown)[0]}: unknown field "
                              f"(fields: {', '.join(sorted(SampleLoggingConfig.field_names()))})")
        cfg.logging.sample_logging = asdict(SampleLoggingConfig(**given))

    denv = env_config.dist_env()
    resolved = resolve(cfg, RLConfig, list(values), env_config.environ(), denv.world_size, preprocess=lift_flat_sample_logging)
    announce_config(resolved, denv.rank)
    return RLRun(resolved.config, reward_functions, resolved.from_env, BACKENDS[backend])
