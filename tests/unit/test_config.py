"""Schema, VERL_* environment overrides and their precedence, Hydra composition."""

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir, initialize_config_module

from config.env import env_overrides, log_level
from config.loading import format_config, override_keys, redact, resolve, to_dict
from config.schema import ConfigError, SFTConfig


def composed(name: str = "demo", overrides=()):
    with initialize_config_module(config_module="config", version_base="1.3"):
        return compose(name, overrides=list(overrides))


def load(overrides=(), env=None, world_size=1, name="demo"):
    return resolve(composed(name, overrides), SFTConfig, overrides, env or {}, world_size)


def test_demo_config_is_the_offline_demo():
    cfg = load().config
    assert Path(cfg.model.partial_pretrain, "config.json").is_file()
    assert Path(cfg.data.train_files).is_file() and Path(cfg.data.val_files).is_file()
    assert cfg.trainer.default_local_dir == "checkpoints/sft_demo/arithmetic"
    assert cfg.trainer.max_val_samples == 5 and cfg.generation.max_new_tokens == 100


def test_with_generation_example_has_the_documented_values(tiny_model, tiny_data):
    inputs = [f"model.partial_pretrain={tiny_model}", f"data.train_files={tiny_data['train']}"]
    g = load(inputs, name="sft_trainer_with_generation").config.generation
    assert (g.temperature, g.top_k, g.top_p, g.do_sample, g.max_new_tokens) == (1.0, 50, 0.7, True, 100)


@pytest.mark.parametrize(
    "override, key",
    [
        ("+data.train_filez=x.parquet", "data.train_filez"),
        ("+trainer.nonsense=1", "trainer.nonsense"),
        ("data.max_length=long", "data.max_length"),
        ("optim.lr=fast", "optim.lr"),
        ("data.truncation=middle", "data.truncation"),
        ("optim.lr_scheduler=linear", "optim.lr_scheduler"),
        ("generation.top_p=1.5", "generation.top_p"),
        ("trainer.resume_mode=sometimes", "trainer.resume_mode"),
        ("trainer.logger=[console,graphite]", "trainer.logger"),
        ("data.micro_batch_size_per_gpu=0", "data.micro_batch_size_per_gpu"),
        ("data.max_token_len_per_gpu=16", "data.max_token_len_per_gpu"),  # below max_length 32
        ("model.fsdp_config.param_dtype=fp16", "model.fsdp_config.param_dtype"),  # no loss scaling: refused
        ("model.fsdp_config.model_dtype=fp16", "model.fsdp_config.model_dtype"),  # no loss scaling: refused
        ("model.fsdp_config.model_dtype=int8", "model.fsdp_config.model_dtype"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load([override])
    message = str(err.value)
    assert message.startswith(key) and "\n" not in message


def test_token_budget_defaults_to_a_full_micro_batch_and_needs_dynamic_batching():
    data = load().config.data
    assert data.token_budget() == data.micro_batch_size_per_gpu * data.max_length
    assert load(["data.max_token_len_per_gpu=100"]).config.data.token_budget() == 100
    assert load(["data.use_dynamic_bsz=false"]).config.data.token_budget() is None
    with pytest.raises(ConfigError, match=r"^data.max_token_len_per_gpu: is only used with data.use_dynamic_bsz=true"):
        load(["data.use_dynamic_bsz=false", "data.max_token_len_per_gpu=100"])


def test_batch_size_must_divide_over_ranks_and_micro_batches():
    with pytest.raises(ConfigError, match=r"^data.train_batch_size: 64 is not divisible by .* = 24 × 2"):
        load(["data.micro_batch_size_per_gpu=24"], world_size=2)
    assert load(["data.micro_batch_size_per_gpu=16"], world_size=2).config.data.micro_batch_size_per_gpu == 16


ALL_ENV = {
    "VERL_GENERATION_TEMPERATURE": "0.5",
    "VERL_GENERATION_TOP_K": "7",
    "VERL_GENERATION_TOP_P": "0.3",
    "VERL_GENERATION_DO_SAMPLE": "false",
    "VERL_GENERATION_MAX_NEW_TOKENS": "12",
    "VERL_MAX_VAL_SAMPLES": "3",
}


def test_every_env_variable_maps_onto_its_key():
    resolved = load(env=ALL_ENV)
    g, t = resolved.config.generation, resolved.config.trainer
    assert (g.temperature, g.top_k, g.top_p, g.do_sample, g.max_new_tokens, t.max_val_samples) == (0.5, 7, 0.3, False, 12, 3)
    assert resolved.from_env["generation.top_k"] == "VERL_GENERATION_TOP_K"
    assert "# from VERL_GENERATION_TOP_P" in format_config(resolved.config, resolved.from_env)


def test_precedence_command_line_over_env_over_yaml():
    env = {"VERL_GENERATION_TEMPERATURE": "0.5", "VERL_GENERATION_TOP_K": "7"}
    resolved = load(["generation.temperature=0.25"], env=env)
    assert resolved.config.generation.temperature == 0.25  # command line wins
    assert resolved.config.generation.top_k == 7  # env beats YAML
    assert resolved.config.generation.top_p == 0.7  # YAML
    assert resolved.ignored_env == {"generation.temperature": "VERL_GENERATION_TEMPERATURE"}


@pytest.mark.parametrize(
    "variable, value, accepts",
    [
        ("VERL_GENERATION_TEMPERATURE", "hot", "a number > 0"),
        ("VERL_GENERATION_TEMPERATURE", "-1", "a number > 0"),
        ("VERL_GENERATION_TOP_P", "1.5", "(0, 1]"),
        ("VERL_GENERATION_DO_SAMPLE", "maybe", "true/false"),
        ("VERL_GENERATION_TOP_K", "-3", "integer >= 0"),
        ("VERL_GENERATION_MAX_NEW_TOKENS", "-5", "integer >= 1"),
        ("VERL_MAX_VAL_SAMPLES", "-1", "integer >= 0"),
        ("VERL_MAX_VAL_SAMPLES", "2.5", "integer >= 0"),
    ],
)
def test_bad_env_values_name_the_variable(variable, value, accepts):
    with pytest.raises(ConfigError) as err:
        env_overrides({variable: value})
    message = str(err.value)
    assert message.startswith(f"{variable}={value!r}") and accepts in message and "\n" not in message


def test_log_level_variable():
    assert log_level({"VERL_SFT_LOGGING_LEVEL": "debug"}) == 10
    assert log_level({}) == 20
    with pytest.raises(ConfigError, match="^VERL_SFT_LOGGING_LEVEL='LOUD'"):
        log_level({"VERL_SFT_LOGGING_LEVEL": "loud"})


def test_override_keys_parses_hydra_syntax():
    assert override_keys(["a.b=1", "+c.d=2", "++e=3", "~f.g", "generation=default"]) == {"a.b", "c.d", "e", "f.g", "generation"}


def test_users_own_yaml_extends_the_base(tmp_path, tiny_model, tiny_data):
    # The seed document's "Custom Configuration", in the user's own --config-path.
    (tmp_path / "my_sft.yaml").write_text(
        "defaults:\n  - sft_trainer\n  - _self_\n\n"
        "generation:\n  temperature: 0.8\n  top_k: 40\n  top_p: 0.9\n  do_sample: true\n  max_new_tokens: 150\n\n"
        "trainer:\n  max_val_samples: 10\n  project_name: \"my_sft_project\"\n  experiment_name: \"with_validation_generation\"\n"
    )
    inputs = [f"model.partial_pretrain={tiny_model}", f"data.train_files={tiny_data['train']}"]
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose("my_sft", overrides=inputs)
    typed = resolve(cfg, SFTConfig, inputs, {}).config
    assert (typed.generation.temperature, typed.generation.top_k, typed.generation.max_new_tokens) == (0.8, 40, 150)
    assert typed.trainer.max_val_samples == 10
    assert typed.trainer.default_local_dir == "checkpoints/my_sft_project/with_validation_generation"
    assert typed.optim.lr == 1e-5  # inherited from the base (verl's default)


def test_our_own_keys_are_not_mistaken_for_secrets():
    from config import env as env_module
    from config.rl_schema import RLConfig

    logged = redact(to_dict(load().config))
    assert logged["data"]["prompt_key"] == "prompt" and logged["generation"]["max_new_tokens"] == 100
    # Every schema field whose name looks like a secret must have been looked at and allowed.
    for root in (SFTConfig, RLConfig):
        for name in field_names(root):
            if any(marker in name.upper() for marker in env_module.SECRET_MARKERS):
                assert name in env_module.NOT_SECRETS, f"{name}: a secret, or add it to NOT_SECRETS"


def field_names(cls):
    for f in dataclasses.fields(cls):
        factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        yield from field_names(factory) if dataclasses.is_dataclass(factory) else [f.name]


def test_secrets_are_redacted():
    cleaned = redact({"a": {"api_key": "s3cr3t", "Token": "t", "x": 1}, "db_password": "p", "list": [{"secret_thing": 2}]})
    assert cleaned == {"a": {"api_key": "<redacted>", "Token": "<redacted>", "x": 1}, "db_password": "<redacted>", "list": [{"secret_thing": "<redacted>"}]}


@pytest.mark.parametrize("config_name", ["sft_trainer", "demo", "grpo_trainer", "ppo_trainer", "grpo_demo"])
def test_every_schema_key_is_in_the_yaml_so_the_command_line_can_set_it(config_name):
    # Hydra refuses an override of a key its composed config lacks ("not in struct"), and a `+`
    # on a key the schema defines is read as a plain override (trainer.cli.appends_as_overrides):
    # a schema key missing from the YAML could not be set at all (trainer.collective_timeout_seconds was).
    from omegaconf import OmegaConf

    from config.rl_schema import RLConfig

    def fields(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            yield from fields(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]

    with initialize_config_module(config_module="config", version_base="1.3"):
        cfg = compose(config_name)
    schema = SFTConfig() if config_name in ("sft_trainer", "demo") else RLConfig()
    missing = [key for key in fields(schema) if OmegaConf.select(cfg, key, default="<absent>") == "<absent>"]
    assert missing == []
