"""The TRL user's way in: TRL's dataset formats, datasets.Dataset / save_to_disk / load_dataset
sources through the token cache, TRL's argument names in create_sft_trainer and create_rl_trainer."""

import sys

import datasets
import pytest
from omegaconf import OmegaConf

from config import trl
from config.schema import ConfigError, DataConfig, MultiturnConfig, SFTConfig
from config.rl_schema import RLConfig
from helpers import DEMO_MODEL, write_jsonl, write_parquet
from trainer.api import create_rl_trainer, create_sft_trainer
from trainer.data import IGNORE, DataError, load_sft_examples
from trainer.data import hf_datasets

CHAT = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]
ROWS = {
    "conversational (messages)": {"messages": CHAT},
    "conversational prompt-completion": {"prompt": CHAT[:1], "completion": CHAT[1:]},
    "prompt-completion": {"prompt": "1+1=", "completion": "2"},
    "prompt-response": {"prompt": "1+1=", "response": "2"},
}


# ----------------------------------------------------------------------------- formats
@pytest.mark.parametrize("name", list(ROWS))
def test_each_trl_format_is_recognised_from_a_file_row(name, tmp_path):
    path = write_jsonl([ROWS[name]], tmp_path / "d.jsonl")
    fmt = hf_datasets.detect_format(hf_datasets.first_row(str(path), "k"), "train_dataset")
    assert fmt.name == name


def test_formats_trained_on_nowhere_else_are_refused_in_one_line():
    with pytest.raises(DataError, match=r"^train_dataset: TRL's language-modeling format \(a `text` column\) is not supported"):
        hf_datasets.detect_format({"text": "hello"}, "train_dataset")
    with pytest.raises(DataError, match=r"^x: columns \['a', 'b'\] match none of the formats read here"):
        hf_datasets.detect_format({"a": 1, "b": 2}, "x")


def test_a_file_in_no_known_format_lists_its_columns(tmp_path):
    path = write_parquet([{"question": "1+1=", "answer": "2"}], tmp_path / "qa.parquet")
    with pytest.raises(DataError, match=r"^train_dataset \(.*qa.parquet\): columns \['answer', 'question'\] match none"):
        create_sft_trainer(model=str(DEMO_MODEL), train_dataset=str(path))


def test_conversational_prompt_completion_trains_on_the_completion_only(tmp_path, tok):
    # An assistant turn in the prompt is context, as with TRL's completion_only_loss.
    prompt = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+3="}]
    completion = [{"role": "assistant", "content": "5"}]
    path = write_jsonl([{"prompt": prompt, "completion": completion}], tmp_path / "c.jsonl")
    c = DataConfig(max_length=64, multiturn=MultiturnConfig(enable=True, messages_key="prompt", completion_key="completion"))
    (ex,) = load_sft_examples(str(path), "data.train_files", tok, c)
    assert ex.input_ids == tok(tok.apply_chat_template(prompt + completion, tokenize=False), add_special_tokens=False).input_ids
    trained = [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE]
    assert trained == tok("5", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert (ex.prompt_text, ex.reference) == ("2+3=", "5")
    bad = write_jsonl([{"prompt": prompt, "completion": [{"role": "user", "content": "x"}]}], tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match=r"bad.jsonl: row 0: column 'completion' has no assistant message to learn from"):
        load_sft_examples(str(bad), "data.train_files", tok, c)


# ----------------------------------------------------------------------------- sources
def test_a_dataset_is_written_once_and_tokenized_once(tmp_path, tok):
    rows = [ROWS["prompt-completion"], {"prompt": "2+2=", "completion": "4"}]
    first = hf_datasets.as_files(datasets.Dataset.from_list(rows), "train_dataset", str(tmp_path))
    mtime = (tmp_path / "datasets").joinpath(first[0].split("/")[-1]).stat().st_mtime_ns
    again = hf_datasets.as_files(datasets.Dataset.from_list(rows), "train_dataset", str(tmp_path))
    assert again == first and (tmp_path / "datasets" / again[0].split("/")[-1]).stat().st_mtime_ns == mtime
    other = hf_datasets.as_files(datasets.Dataset.from_list(rows[:1]), "train_dataset", str(tmp_path))
    assert other != first  # the fingerprint covers the rows
    c = DataConfig(prompt_key="prompt", response_key="completion", max_length=64)
    a = load_sft_examples(first, "data.train_files", tok, c, cache_dir=str(tmp_path))
    b = load_sft_examples(again, "data.train_files", tok, c, cache_dir=str(tmp_path))
    assert a.folder == b.folder and len(a) == 2 and a[1].reference == "4"  # one token-cache entry, memory-mapped


def test_save_to_disk_folders_dataset_dicts_and_load_dataset_folders(tmp_path):
    rows = [ROWS["prompt-completion"]] * 3
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])})
    splits.save_to_disk(str(tmp_path / "dict"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    train, val = hf_datasets.train_and_eval_files(str(tmp_path / "dict"), None, str(tmp_path / "cache"))
    assert len(train) == 1 and len(val) == 1 and pq_rows(train[0]) == 3 and pq_rows(val[0]) == 1
    train, val = hf_datasets.train_and_eval_files(str(tmp_path / "one"), None, str(tmp_path / "cache"))
    assert pq_rows(train[0]) == 3 and val is None
    # Not ours to read directly (CSV): the hub path, `datasets.load_dataset`, reads the folder.
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "train.csv").write_text("prompt,completion\n1+1=,2\n2+2=,4\n")
    train, _ = hf_datasets.train_and_eval_files(str(tmp_path / "csv"), None, str(tmp_path / "cache"))
    assert pq_rows(train[0]) == 2 and hf_datasets.first_row(train[0], "k") == {"prompt": "1+1=", "completion": 2}


def pq_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def test_bad_sources_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"^train_dataset: 'no/such-dataset' is neither a local file or folder nor a dataset"):
        hf_datasets.open_source("no/such-dataset", "train_dataset")
    with pytest.raises(DataError, match=r"^train_dataset: a DatasetDict without a 'train' split \(splits: x\)"):
        hf_datasets.train_part(datasets.DatasetDict({"x": datasets.Dataset.from_list([{"a": 1}])}), "train_dataset")
    with pytest.raises(DataError, match=r"^train_dataset: a streaming \(Iterable\) dataset"):
        hf_datasets.open_source(datasets.Dataset.from_list([{"a": 1}]).to_iterable_dataset(), "train_dataset")
    streamed = datasets.IterableDatasetDict({"train": datasets.Dataset.from_list([{"a": 1}]).to_iterable_dataset()})
    with pytest.raises(DataError, match=r"^train_dataset: a streaming \(Iterable\) dataset"):
        hf_datasets.train_and_eval_files(streamed, None, str(tmp_path))
    with pytest.raises(DataError, match=r"^eval_dataset: file not found: .*missing.parquet$"):
        hf_datasets.open_source(str(tmp_path / "missing.parquet"), "eval_dataset")
    datasets.Dataset.from_list([{"a": 1}]).save_to_disk(str(tmp_path / "saved"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the extra were not installed
    with pytest.raises(DataError, match=r"^eval_dataset: reading it needs the `datasets` package: "
                                        r"pip install 'sample-aware-trainer\[datasets\]'$"):
        hf_datasets.open_source(str(tmp_path / "saved"), "eval_dataset")


# ----------------------------------------------------------------------------- create_sft_trainer
def test_create_sft_trainer_maps_trl_names_and_formats(tmp_path):
    run = create_sft_trainer(
        model=str(DEMO_MODEL), train_dataset=datasets.Dataset.from_list([ROWS["conversational (messages)"]] * 4),
        max_length=48, learning_rate=3e-4, num_train_epochs=2, per_device_train_batch_size=2, gradient_accumulation_steps=4,
        report_to=["tensorboard"], output_dir=str(tmp_path / "run"), seed=7, **{"data.cache_dir": str(tmp_path / "cache")},
    )
    c = run.config
    assert isinstance(c, SFTConfig)
    assert (c.data.multiturn.enable, c.data.multiturn.messages_key, c.data.multiturn.completion_key) == (True, "messages", None)
    assert (c.data.max_length, c.optim.lr, c.trainer.total_epochs, c.trainer.total_training_steps) == (48, 3e-4, 2, None)
    assert (c.data.micro_batch_size_per_gpu, c.data.train_batch_size) == (2, 8)  # 2 per device × 4 accumulation × 1 rank
    assert (c.trainer.logger, c.trainer.default_local_dir, c.trainer.seed) == (["console", "tensorboard"], str(tmp_path / "run"), 7)
    assert c.data.train_files[0].startswith(str(tmp_path / "cache" / "datasets")) and c.data.val_files is None
    # conversational prompt-completion from a file; the user's own keys win over detection
    path = write_parquet([ROWS["conversational prompt-completion"]], tmp_path / "pc.parquet")
    c = create_sft_trainer(model=str(DEMO_MODEL), train_dataset=str(path)).config
    assert (c.data.multiturn.enable, c.data.multiturn.messages_key, c.data.multiturn.completion_key) == (True, "prompt", "completion")
    path = write_parquet([{"q": "1+1=", "a": "2"}], tmp_path / "own.parquet")
    c = create_sft_trainer(model=str(DEMO_MODEL), train_dataset=str(path), data__prompt_key="q", data__response_key="a").config
    assert (c.data.prompt_key, c.data.response_key, c.data.multiturn.enable) == ("q", "a", False)


def test_create_sft_trainer_refuses_in_one_line_before_any_model(tmp_path):
    path = str(write_parquet([ROWS["prompt-completion"]], tmp_path / "d.parquet"))
    with pytest.raises(ConfigError, match=r"^packing \(SFTConfig\): not accepted here; nearest: data.use_dynamic_bsz"):
        create_sft_trainer(model=str(DEMO_MODEL), train_dataset=path, packing=True)
    with pytest.raises(ConfigError, match=r"^create_sft_trainer: unknown argument 'lernin_rate' \(TRL names accepted: "):
        create_sft_trainer(model=str(DEMO_MODEL), train_dataset=path, lernin_rate=1e-3)
    with pytest.raises(ConfigError, match=r"^completion_only_loss=False: the loss here is always on the completion"):
        create_sft_trainer(model=str(DEMO_MODEL), train_dataset=path, completion_only_loss=False)
    with pytest.raises(ConfigError, match=r"^optim.lr is given twice: 0.1 and, from a TRL argument \(learning_rate\), 0.2"):
        create_sft_trainer(model=str(DEMO_MODEL), train_dataset=path, learning_rate=0.2, optim__lr=0.1)
    with pytest.raises(ConfigError, match=r"^data.max_length: must be > 1"):
        create_sft_trainer(model=str(DEMO_MODEL), train_dataset=path, max_length=1)


# ----------------------------------------------------------------------------- create_rl_trainer
def test_create_rl_trainer_maps_grpo_names(rl_data, tiny_model):
    run = create_rl_trainer(
        model_name=str(tiny_model), dataset_name=str(rl_data["dir"]),
        num_generations=4, beta=0.0, epsilon=0.1, max_completion_length=12, max_prompt_length=40, temperature=0.9,
        top_k=None, loss_type="grpo", scale_rewards="none", log_completions=True, report_to="none",
        learning_rate=5e-6, per_device_train_batch_size=8, gradient_accumulation_steps=2, num_iterations=2,
        importance_sampling_level="sequence", max_steps=5,
    )
    c = run.config
    assert isinstance(c, RLConfig)
    assert (c.rollout.responses_per_prompt, c.algorithm.kl_coef, c.rollout.max_new_tokens, c.data.max_prompt_length) == (4, 0.0, 12, 40)
    assert (c.algorithm.clip_ratio_low, c.algorithm.clip_ratio_high) == (0.1, 0.1)  # epsilon_high defaults to epsilon
    assert (c.rollout.temperature, c.rollout.top_k, c.algorithm.loss_agg_mode) == (0.9, 0, "seq-mean-token-mean")
    assert (c.algorithm.norm_adv_by_std_in_grpo, c.logging.sample_logging.enabled, c.trainer.logger) == (False, True, ["console"])
    assert (c.optim.lr, c.actor.micro_batch_size_per_gpu, c.actor.ppo_epochs, c.algorithm.policy_loss) == (5e-6, 8, 2, "gspo")
    assert (c.data.prompts_per_step, c.trainer.total_training_steps) == (4, 5)  # 8 × 2 × 1 rank = 16 completions = 4 groups of 4
    c = create_rl_trainer(model_name=str(tiny_model), dataset_name=str(rl_data["dir"]), epsilon=0.2, epsilon_high=0.28,
                          loss_type="dr_grpo").config
    assert (c.algorithm.clip_ratio_low, c.algorithm.clip_ratio_high, c.algorithm.loss_agg_mode) == (0.2, 0.28, "seq-mean-token-sum-norm")
    # TRL's colocate mode is the engine in each training process here.
    assert create_rl_trainer(model_name=str(tiny_model), dataset_name=str(rl_data["dir"]), use_vllm=True,
                             vllm_mode="colocate").config.rollout.name == "vllm"


def test_create_rl_trainer_refuses_names_with_no_counterpart(rl_data, tiny_model):
    base = dict(model_name=str(tiny_model), dataset_name=str(rl_data["dir"]))
    with pytest.raises(ConfigError, match=r"^vllm_mode='server' \(GRPOConfig\): only 'colocate' here"):
        create_rl_trainer(**base, use_vllm=True, vllm_mode="server")
    with pytest.raises(ConfigError, match=r"^loss_type='bnpo': nearest: algorithm.loss_agg_mode=token-mean"):
        create_rl_trainer(**base, loss_type="bnpo")
    with pytest.raises(ConfigError, match=r"^per_device_train_batch_size=3: 3 completions per step .* groups of num_generations=4"):
        create_rl_trainer(**base, num_generations=4, per_device_train_batch_size=3)
    with pytest.raises(ConfigError, match=r"^scale_rewards='batch': .* 'batch' has no counterpart"):
        create_rl_trainer(**base, scale_rewards="batch")


@pytest.mark.parametrize("names, schema", [(trl.SFT, SFTConfig), (trl.GRPO, RLConfig)])
def test_every_translated_key_exists_in_the_schema(names, schema):
    samples = {"report_to": "wandb", "loss_type": "grpo", "scale_rewards": True, "importance_sampling_level": "sequence", "vllm_mode": "colocate",
               "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "num_generations": 4, "top_k": 5}
    defaults = OmegaConf.structured(schema)
    given = {name: samples.get(name, 1) for name in names}
    ctx = trl.TRLContext(given, 1, lambda key: OmegaConf.select(defaults, key))
    keys = {key for name in names for key in names[name](given[name], ctx)}
    assert len(keys) > 15
    missing = [k for k in keys if OmegaConf.select(defaults, k, default="<missing>") == "<missing>"]
    assert not missing, missing
