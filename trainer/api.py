"""Python API: `create_sft_trainer` and `create_rl_trainer`, each returning a run with `.train()`.

    from datasets import Dataset                      # optional: files and folders work without it
    from trainer.api import create_sft_trainer

    trainer = create_sft_trainer(
        model="config/demo_assets/model",                # local directory or hub id
        train_dataset=Dataset.from_list(rows),           # Dataset, save_to_disk folder, hub id or files
        max_length=64, learning_rate=1e-3, max_steps=20, # TRL's names where they mean the same
        **{"trainer.default_local_dir": "runs/sft"},     # any config key (or trainer__default_local_dir=...)
    )
    trainer.train()

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

They compose the same Hydra config as `python -m trainer.fsdp_sft_trainer` and `python -m
trainer.rl_trainer --config-name <algorithm>_trainer`, so YAML and Python runs are the same runs.
TRL's argument names are translated by `config/trl.py`; a TRL name with no counterpart here is
refused in one line naming the nearest key. `train()` works in one process or under torchrun.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from config import env as env_config
from config import trl
from config.rl_schema import RLConfig, SampleLoggingConfig, lift_flat_sample_logging
from config.schema import ConfigError, SFTConfig
from trainer.cli import announce_config, setup_logging
from trainer.data import hf_datasets
from trainer.distributed import init_distributed, teardown
from trainer.faults import same_config_on_every_rank
from trainer.fsdp_sft_trainer import FSDPSFTTrainer
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


class _Run:
    """The checked config, built into a trainer by `train()` (in one process or under torchrun)."""

    def __init__(self, config: Any, from_env: dict, backend: Optional[Backend] = None):
        self.config = config
        self.from_env = from_env
        self.backend = backend
        self.trainer: Any = None

    def _build(self, ctx) -> Any:
        raise NotImplementedError

    def train(self) -> Any:
        denv = env_config.dist_env()
        setup_logging(env_config.log_level(env_config.environ()), denv.rank)
        if self.backend is not None and self.backend.note and denv.rank == 0:
            log.info("%s", self.backend.note)
        ctx = init_distributed(denv, self.config.trainer.device, self.config.trainer.collective_timeout_seconds)
        same_config_on_every_rank(self.config)
        self.trainer = self._build(ctx)
        self.trainer.fit()
        teardown()
        return self.trainer


class RLRun(_Run):
    """What `create_rl_trainer` returns."""

    def __init__(self, config: RLConfig, reward_functions: Optional[Sequence[Any]], from_env: dict, backend: Backend):
        super().__init__(config, from_env, backend)
        self.reward_functions = reward_functions

    def _build(self, ctx) -> RLTrainer:
        rewards = build_reward_set(self.reward_functions) if self.reward_functions else None
        return RLTrainer(self.config, ctx, rewards)


class SFTRun(_Run):
    """What `create_sft_trainer` returns."""

    def _build(self, ctx) -> FSDPSFTTrainer:
        return FSDPSFTTrainer(self.config, ctx)


def _split_arguments(kwargs: dict[str, Any], names: dict, nearest: dict, api: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(TRL names, config keys) of the keywords; a keyword that is neither is refused, named."""
    given, keys = {}, {}
    for name, value in kwargs.items():
        if trl.is_trl_name(name, names, nearest):
            given[name] = value
            continue
        key = name.replace("__", ".")
        if "." not in key:
            raise ConfigError(f"{api}: unknown argument {name!r} (TRL names accepted: {', '.join(sorted(names))}; "
                              "or a config key, dotted or with __ for dots)")
        keys[key] = value
    return given, keys


def _compose(config_name: str, values: dict[str, Any]) -> Any:
    with initialize_config_module(config_module="config", version_base="1.3"):
        cfg = compose(config_name)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, force_add=True)  # an unknown key fails in resolve(), named
    return cfg


def _with_trl_names(cfg: Any, given: dict, names: dict, nearest: dict, trainer: str, world_size: int,
                    explicit: dict[str, Any]) -> dict[str, Any]:
    """Translate TRL's names (config/trl.py) against the composed config and apply them; a key
    given both ways is refused (which one wins would be a guess)."""
    translated = trl.translate(given, names, nearest, trainer, world_size, lambda key: OmegaConf.select(cfg, key))
    for key, value in translated.items():
        if key in explicit and explicit[key] != value:
            raise ConfigError(f"{key} is given twice: {explicit[key]!r} and, from a TRL argument ({', '.join(given)}), {value!r}")
        OmegaConf.update(cfg, key, value, force_add=True)
    return translated


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
    registered names, or `module:function` strings. Other keywords are TRL's GRPOConfig names where
    they mean the same here (`num_generations=8`, `beta=0.0`, `max_completion_length=32`: see
    config/trl.py) or config keys, dotted (`**{"rollout.max_new_tokens": 32}`) or with `__` for
    dots (`rollout__max_new_tokens=32`).
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
    trl_given, keys = _split_arguments(config_keys, trl.GRPO, trl.GRPO_NEAREST, "create_rl_trainer")
    values.update(keys)
    denv = env_config.dist_env()
    cfg = _compose(f"{algorithm}_trainer", values)
    if sample_logging is not None:
        # Merged into a SampleLoggingConfig with the documented defaults, which validates it.
        given = asdict(sample_logging) if isinstance(sample_logging, SampleLoggingConfig) else dict(sample_logging)
        unknown = set(given) - SampleLoggingConfig.field_names()
        if unknown:
            raise ConfigError(f"sample_logging.{sorted(unknown)[0]}: unknown field "
                              f"(fields: {', '.join(sorted(SampleLoggingConfig.field_names()))})")
        cfg.logging.sample_logging = asdict(SampleLoggingConfig(**given))
    values.update(_with_trl_names(cfg, trl_given, trl.GRPO, trl.GRPO_NEAREST, "GRPOConfig", denv.world_size, values))

    resolved = resolve(cfg, RLConfig, list(values), env_config.environ(), denv.world_size, preprocess=lift_flat_sample_logging)
    announce_config(resolved, denv.rank)
    return RLRun(resolved.config, reward_functions, resolved.from_env, BACKENDS[backend])


# ---------------------------------------------------------------------- SFT
_SFT_FORMAT_KEYS = ("data.prompt_key", "data.response_key", "data.multiturn")


def create_sft_trainer(
    model: str,
    train_dataset: Any,
    eval_dataset: Any = None,
    config_name: str = "sft_trainer",
    **kwargs: Any,
) -> SFTRun:
    """Build an SFT run, TRL's `SFTTrainer(model=..., train_dataset=..., args=SFTConfig(...))` in
    one call. Everything is checked here, before any model is loaded.

    `model`: a local directory or hub id. `train_dataset` / `eval_dataset`: a `datasets.Dataset`
    or `DatasetDict`, a folder written by `save_to_disk`, a hub id, a parquet/JSONL file, a list of
    them, or a folder of them (val/test files in it become the validation set); TRL's formats
    (`messages`, `prompt`/`completion`, conversational prompt/completion) are recognised from the
    first row unless `data.prompt_key`/`data.response_key`/`data.multiturn.*` are given. Other
    keywords: TRL's SFTConfig names where they mean the same here (`max_length`, `learning_rate`,
    `num_train_epochs`, `max_steps`, `per_device_train_batch_size`, `report_to`, ...: see
    config/trl.py) or config keys, dotted or with `__` for dots.
    """
    trl_given, keys = _split_arguments(kwargs, trl.SFT, trl.SFT_NEAREST, "create_sft_trainer")
    values: dict[str, Any] = {"model.partial_pretrain": model, **keys}
    denv = env_config.dist_env()
    cfg = _compose(config_name, values)
    values.update(_with_trl_names(cfg, trl_given, trl.SFT, trl.SFT_NEAREST, "SFTConfig", denv.world_size, values))

    # Datasets become parquet files under the token cache's folder, tokenized once from there.
    cache_dir = OmegaConf.select(cfg, "data.cache_dir") or env_config.token_cache_dir(env_config.environ())
    train_files, val_files = hf_datasets.train_and_eval_files(train_dataset, eval_dataset, cache_dir)
    data = {"data.train_files": train_files, "data.val_files": val_files}
    if not any(k.startswith(_SFT_FORMAT_KEYS) for k in values):
        fmt = hf_datasets.detect_format(hf_datasets.first_row(train_files[0], "train_dataset"), f"train_dataset ({train_files[0]})")
        data.update({f"data.{k}": v for k, v in fmt.keys.items()})
    for key, value in data.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    values.update(data)

    resolved = resolve(cfg, SFTConfig, list(values), env_config.environ(), denv.world_size)
    announce_config(resolved, denv.rank)
    return SFTRun(resolved.config, resolved.from_env)
