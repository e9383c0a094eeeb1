"""The SFT trainer in this process (one rank): failure handling that needs code injected."""

import importlib.util
import json
import logging
import math

import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_module

import trainer.fsdp_sft_trainer as sft
import trainer.sample_prompts as sample_prompts
from config.env import DistEnv
from config.loading import resolve
from config.schema import ConfigError, SFTConfig
from helpers import read_metrics, write_lm_eval_tasks, write_parquet
from trainer.data import DataError
from trainer.tracking.file import read_records
from trainer.distributed import init_distributed


def make_trainer(tiny_model, tiny_data, run_dir, *overrides):
    overrides = [
        f"model.partial_pretrain={tiny_model}", f"data.train_files={tiny_data['train']}", f"data.val_files={tiny_data['val']}",
        f"trainer.default_local_dir={run_dir}", "trainer.logger=[console,file]", "trainer.log_freq=1", "data.max_length=24",
        "data.train_batch_size=16", "data.micro_batch_size_per_gpu=8", "generation.max_new_tokens=4",
        "data.prompt_key=prompt", "data.response_key=response", *overrides,
    ]
    with initialize_config_module(config_module="config", version_base="1.3"):
        cfg = compose("sft_trainer", overrides=overrides)
    typed = resolve(cfg, SFTConfig, overrides, {}).config
    ctx = init_distributed(DistEnv(0, 0, 1, False), "cpu")
    return sft.FSDPSFTTrainer(typed, ctx)


def test_generation_failure_warns_and_training_finishes(tiny_model, tiny_data, tmp_path, monkeypatch, caplog):
    def boom(*args, **kwargs):
        raise RuntimeError("injected generation failure")

    monkeypatch.setattr(sample_prompts, "generate", boom)
    run_dir = tmp_path / "run"
    trainer = make_trainer(tiny_model, tiny_data, run_dir, "trainer.total_training_steps=4", "trainer.test_freq=2", "trainer.save_freq=2")
    with caplog.at_level(logging.WARNING):
        trainer.fit()
    warnings = [r.getMessage() for r in caplog.records if "sample generation failed" in r.getMessage()]
    assert warnings == [
        "validation sample generation failed at step 2: RuntimeError: injected generation failure",
        "validation sample generation failed at step 4: RuntimeError: injected generation failure",
    ]
    assert (run_dir / "global_step_2").is_dir() and (run_dir / "global_step_4").is_dir()
    assert (run_dir / "hf_model" / "config.json").is_file()
    assert sorted(s for s, m in read_metrics(run_dir).items() if "val/loss" in m) == [2, 4]


def test_a_failing_build_of_rank_zeros_copy_warns_and_training_goes_on(tiny_model, tiny_data, tmp_path, monkeypatch, caplog):
    """Out of memory while rank 0 builds or loads its generation copy (its own work, after the
    collective gather) warns like a failing generate; the next event tries again."""
    from workers.replica import ModelReplica

    real_load, calls = ModelReplica.load, []

    def load_once_out_of_memory(self, state):
        calls.append(sorted(state)[:1])
        if len(calls) == 1:
            raise torch.OutOfMemoryError("injected: no room for the copy")
        return real_load(self, state)

    monkeypatch.setattr(ModelReplica, "load", load_once_out_of_memory)
    run_dir = tmp_path / "run"
    trainer = make_trainer(tiny_model, tiny_data, run_dir, "trainer.total_training_steps=4", "trainer.test_freq=2")
    with caplog.at_level(logging.WARNING):
        trainer.fit()
    warnings = [r.getMessage() for r in caplog.records if "sample generation failed" in r.getMessage()]
    assert warnings == ["validation sample generation failed at step 2: OutOfMemoryError: injected: no room for the copy"]
    assert len(calls) == 2 and calls[0] and calls[0] == calls[1]  # the gathered state reached rank 0's part both times
    events = {r["step"] for r in read_records(run_dir / "samples.jsonl") if r.get("kind") == "sample"}
    assert events == {4}  # the second event generated and logged its samples
    assert (run_dir / "hf_model" / "config.json").is_file()


def test_non_finite_gradient_skips_the_update_and_the_schedule(tiny_model, tiny_data, tmp_path, monkeypatch):
    real = sft.token_loss_sum
    poison = {"on": False}

    def nan_while_poisoned(model, batch, *feed):
        loss = real(model, batch, *feed)
        return loss * float("nan") if poison["on"] else loss  # every micro-batch of the poisoned step

    monkeypatch.setattr(sft, "token_loss_sum", nan_while_poisoned)
    run_dir = tmp_path / "run"
    trainer = make_trainer(tiny_model, tiny_data, run_dir, "trainer.total_training_steps=4", "trainer.max_val_samples=0",
                           "optim.lr_warmup_steps_ratio=0.5", "trainer.export_hf_model=false", "trainer.test_freq=-1")
    trainer.train_step(trainer.batches.micro_batches(0, 0))
    after_one = {k: v.full_tensor().clone() for k, v in trainer.model.state_dict().items()}
    lr_after_one = trainer.scheduler.get_last_lr()[0]
    poison["on"] = True
    metrics = trainer.train_step(trainer.batches.micro_batches(0, 1))
    poison["on"] = False
    assert not torch.isfinite(metrics["train/grad_norm"]) and metrics["train/skipped_steps"] == 1
    assert trainer.scheduler.get_last_lr()[0] == lr_after_one  # the schedule did not move
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v.full_tensor(), after_one[k]), k  # the parameters did not move
    trainer.train_step(trainer.batches.micro_batches(0, 2))
    assert trainer.scheduler.get_last_lr()[0] > lr_after_one
    assert any(not torch.equal(v.full_tensor(), after_one[k]) for k, v in trainer.model.state_dict().items())


def test_sample_prompts_are_the_first_distinct_ones(tiny_model, tiny_data, tmp_path):
    rows = pq.read_table(tiny_data["val"]).to_pylist()
    doubled = [rows[0], rows[0], rows[1], rows[0], rows[2], rows[3]]  # the first prompt three times
    val = write_parquet(doubled, tmp_path / "val_doubled.parquet")
    trainer = make_trainer(tiny_model, tiny_data, tmp_path / "run", f"data.val_files={val}", "trainer.max_val_samples=3",
                           "trainer.total_training_steps=1")
    chosen = [p.text for p in trainer.sample_prompts]
    assert chosen == [rows[0]["prompt"], rows[1]["prompt"], rows[2]["prompt"]]


def test_total_training_steps_is_an_early_exit_and_the_schedule_spans_the_epochs(tiny_model, tiny_data, tmp_path):
    # 64 examples, 16 a step: 4 steps an epoch, 3 epochs = a 12-step schedule; the run stops at 2 (verl's early exit).
    trainer = make_trainer(tiny_model, tiny_data, tmp_path / "run", "trainer.total_epochs=3", "trainer.total_training_steps=2",
                           "optim.lr=1e-3", "optim.lr_warmup_steps_ratio=0", "optim.lr_scheduler=cosine",
                           "optim.min_lr_ratio=0", "trainer.max_val_samples=0")
    assert (trainer.run.total_steps, trainer.schedule_steps) == (2, 12)
    for index in range(2):
        trainer.train_step(trainer.batches.micro_batches(0, index))
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 12)))


def test_liger_without_a_gpu_stops_before_the_model_is_built(tiny_model, tiny_data, tmp_path, monkeypatch):
    def built(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(sft, "build_sharded_model", built)
    with pytest.raises(ConfigError) as err:
        make_trainer(tiny_model, tiny_data, tmp_path / "run", "model.use_liger=true")
    message = str(err.value)
    assert message.startswith("model.use_liger=true: ") and "CUDA GPU" in message and "\n" not in message


def test_sigterm_is_handled_during_fit_only(tiny_model, tiny_data, tmp_path):
    """While a trainer runs, SIGTERM asks for a checkpoint and a stop; once it is done, the
    caller's own handler is back (an API user's process must still stop on SIGTERM)."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    trainer = make_trainer(tiny_model, tiny_data, tmp_path / "run", "trainer.total_training_steps=1", "trainer.max_val_samples=0",
                           "trainer.export_hf_model=false", "samples.report=false")
    assert signal.getsignal(signal.SIGTERM) == trainer.run.preemption._on_signal
    trainer.fit()
    assert signal.getsignal(signal.SIGTERM) == before


def _sample_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines() if '"kind": "sample"' in line]


def test_validation_scores_task_metrics_with_k_samples_and_a_greedy_answer(tiny_model, tiny_data, tmp_path):
    args = ("trainer.total_training_steps=2", "trainer.test_freq=2", "trainer.max_val_samples=3",
            "trainer.export_hf_model=false", "generation.num_samples_per_prompt=3", "generation.also_greedy=true")
    make_trainer(tiny_model, tiny_data, tmp_path / "a", *args).fit()
    val = read_metrics(tmp_path / "a")[2]
    for name in ("exact_match", "last_number_match"):  # the default metrics: the rows have references
        assert 0.0 <= val[f"val/metric/{name}"] <= 1.0 and 0.0 <= val[f"val/metric/{name}/greedy"] <= 1.0
        assert val[f"val/metric/{name}/pass@3"] >= val[f"val/metric/{name}/mean@3"]
        assert val[f"val/metric/{name}/mean@3"] == pytest.approx(val[f"val/metric/{name}"])
    assert val["val/samples_generated"] == 3 * (3 + 1)
    rows = _sample_rows(tmp_path / "a")
    assert [(r["index"], r.get("sample", 0), r.get("greedy", False)) for r in rows[:4]] == [
        (1, 0, False), (2, 1, False), (3, 2, False), (4, 0, True)]
    assert all(set(r["metrics"]) == {"exact_match", "last_number_match"} for r in rows)
    assert len({r["prompt_id"] for r in rows}) == 12  # each answer its own history series
    # The same samples on a rerun.
    make_trainer(tiny_model, tiny_data, tmp_path / "b", *args).fit()
    assert [r["generation"] for r in _sample_rows(tmp_path / "b")] == [r["generation"] for r in rows]


def test_prompts_file_with_tags_and_ids_drives_validation_samples(tiny_model, tiny_data, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "1+2=", "reference": "3", "id": "sum", "tags": ["math"], "do_sample": False, "max_new_tokens": 2},
        {"prompt": "Say hi", "id": "hi", "tags": ["chat"], "reference": "hi"},
    ]))
    make_trainer(tiny_model, tiny_data, tmp_path / "run", "trainer.total_training_steps=1", "trainer.export_hf_model=false",
                 f"samples.prompts_file={prompts}", "samples.metrics=[{fn: contains}, {fn: length_chars}]").fit()
    val = read_metrics(tmp_path / "run")[1]
    assert {"val/tag/math/metric/contains", "val/tag/chat/metric/length_chars", "val/metric/contains"} <= set(val)
    assert "val/metric/exact_match" not in val
    rows = _sample_rows(tmp_path / "run")
    assert [(r["prompt_id"], r["tags"], r["settings"]["max_new_tokens"]) for r in rows] == [
        ("sum", ["math"], 2), ("hi", ["chat"], 4)]
    assert rows[0]["settings"]["do_sample"] is False and rows[0]["generated_tokens"] <= 2


@pytest.mark.parametrize("override, error, words", [
    ("samples.metrics=[{fn: exact_match}, {fn: bleu}]", ConfigError, "samples.metrics[1].fn: unknown metric 'bleu'"),
    ("samples.alerts.metric=rouge_l", ConfigError, "samples.alerts.metric: 'rouge_l' is not one of"),
])
def test_a_bad_metric_stops_before_the_model(tiny_model, tiny_data, tmp_path, monkeypatch, override, error, words):
    monkeypatch.setattr(sft, "build_sharded_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model built")))
    with pytest.raises(error) as err:
        make_trainer(tiny_model, tiny_data, tmp_path / "run", override)
    assert str(err.value).startswith(words) and "\n" not in str(err.value)


def test_a_bad_prompts_file_row_stops_before_the_model(tiny_model, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(sft, "build_sharded_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model built")))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"prompt": "x", "temperature": 0}\n')
    with pytest.raises(DataError) as err:
        make_trainer(tiny_model, tiny_data, tmp_path / "run", f"samples.prompts_file={prompts}")
    assert str(err.value) == f"{prompts}: row 2: `temperature` must be > 0, got 0"


def test_lm_eval_runs_local_tasks_on_the_gathered_copy_every_n_validations(tiny_model, tiny_data, tmp_path):
    pytest.importorskip("lm_eval", reason="the [eval] extra")
    tasks = write_lm_eval_tasks(tmp_path / "tasks")
    run_dir = tmp_path / "run"
    make_trainer(tiny_model, tiny_data, run_dir, "trainer.total_training_steps=4", "trainer.test_freq=1",
                 "trainer.max_val_samples=2", "trainer.export_hf_model=false", "eval.every_n_validations=2",
                 "eval.lm_eval.tasks=[sat_tiny_mc,sat_tiny_gen]", f"eval.lm_eval.include_path={tasks}").fit()
    metrics = read_metrics(run_dir)
    assert [s for s in sorted(metrics) if "eval/sat_tiny_mc/acc" in metrics[s]] == [2, 4]
    assert all(0.0 <= metrics[s]["eval/sat_tiny_gen/exact_match"] <= 1.0 for s in (2, 4))
    assert metrics[4]["eval/sat_tiny_mc/acc"] in (0.0, 1 / 3, 2 / 3, 1.0)
    records = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert sorted((r["step"], r["task"]) for r in records) == [
        (2, "sat_tiny_gen"), (2, "sat_tiny_mc"), (4, "sat_tiny_gen"), (4, "sat_tiny_mc")]
    assert all(r["num_samples"] == (3 if r["task"] == "sat_tiny_mc" else 2) for r in records)
    assert "val/metric/exact_match" in metrics[1]  # the samples went on as usual


def test_lm_eval_problems_stop_before_the_model(tiny_model, tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="the [eval] extra")
    monkeypatch.setattr(sft, "build_sharded_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model built")))
    tasks = write_lm_eval_tasks(tmp_path / "tasks")

    def error(*overrides):
        with pytest.raises(ConfigError) as err:
            make_trainer(tiny_model, tiny_data, tmp_path / "run", *overrides)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert error("eval.lm_eval.tasks=[sat_tiny_mc,no_such_task]", f"eval.lm_eval.include_path={tasks}").startswith(
        f"eval.lm_eval.tasks[1]: unknown task 'no_such_task' in {tasks}")
    assert error("eval.lm_eval.tasks=[sat_tiny_mc]", f"eval.lm_eval.include_path={tmp_path / 'nowhere'}") == (
        f"eval.lm_eval.include_path: {tmp_path / 'nowhere'}: no such file or folder")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert "pip install 'sample-aware-trainer[eval]'" in error("eval.lm_eval.tasks=[sat_tiny_mc]",
                                                               f"eval.lm_eval.include_path={tasks}")


def test_bf16_master_weights_train_and_resume_exactly(tiny_model, tiny_data, tmp_path):
    # verl's fsdp_config.model_dtype=bf16: the sharded weights and AdamW's state in bf16, half the
    # memory of fp32 masters; a checkpoint holds them as they are and a resume restores them bit for bit.
    common = ("optim.lr=1e-3", "trainer.max_val_samples=0", "trainer.export_hf_model=false", "trainer.test_freq=-1",
              "trainer.save_freq=2")

    def shard_bytes(trainer):
        return sum(p.to_local().numel() * p.to_local().element_size() for p in trainer.model.parameters())

    fp32 = make_trainer(tiny_model, tiny_data, tmp_path / "fp32", "trainer.total_training_steps=2", *common)
    run_dir = tmp_path / "bf16"
    first = make_trainer(tiny_model, tiny_data, run_dir, "model.fsdp_config.model_dtype=bfloat16",
                         "trainer.total_training_steps=2", *common)
    assert first.cfg.model.fsdp_config.model_dtype == "bf16"  # verl's spelling read as ours
    assert 2 * shard_bytes(first) == shard_bytes(fp32)
    initial = {k: v.full_tensor().clone() for k, v in first.model.state_dict().items()}
    first.fit()
    trained = {k: v.full_tensor().clone() for k, v in first.model.state_dict().items()}
    assert {v.dtype for v in trained.values()} == {torch.bfloat16}
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)  # bf16 steps of lr 1e-3 moved the weights
    moments = [s[m] for s in first.optimizer.state.values() for m in ("exp_avg", "exp_avg_sq")]
    assert moments and {m.dtype for m in moments} == {torch.bfloat16}
    saved_moments = [m.full_tensor().clone() for m in moments]
    loss = [m["train/loss"] for _, m in sorted(read_metrics(run_dir).items()) if "train/loss" in m]
    assert len(loss) == 2 and all(math.isfinite(v) for v in loss)

    resumed = make_trainer(tiny_model, tiny_data, run_dir, "model.fsdp_config.model_dtype=bf16",
                           "trainer.total_training_steps=3", *common)
    assert resumed.run.position.global_step == 2
    for k, v in resumed.model.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v.full_tensor(), trained[k]), k
    again = [s[m].full_tensor() for s in resumed.optimizer.state.values() for m in ("exp_avg", "exp_avg_sq")]
    assert len(again) == len(saved_moments) and all(torch.equal(a, b) for a, b in zip(again, saved_moments))
