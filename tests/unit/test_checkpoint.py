"""Checkpoint contents (trainer.checkpoint.*), finding checkpoints, and Hugging Face directories
written from a state dict (one process, no process group)."""

import json
import shutil

import pytest
import torch
from hydra import compose, initialize_config_module
from transformers import AutoModelForCausalLM

from config.loading import resolve
from config.rl_schema import RLConfig
from config.schema import CheckpointConfig, ConfigError, SFTConfig
from trainer.checkpoint import (
    CheckpointError,
    HFAssets,
    fresh_parts,
    latest_checkpoint,
    write_hf_model,
)
from helpers import DEMO_MODEL
from trainer.export import find_checkpoint
from workers.model import load_config, load_tokenizer


def load(overrides=(), name="sft_trainer", schema=SFTConfig):
    # A model and data that exist (the base configs carry verl's placeholder paths).
    data = "rl_train.parquet" if schema is RLConfig else "train.parquet"
    overrides = [f"model.partial_pretrain={DEMO_MODEL}", f"data.train_files={DEMO_MODEL.parent / 'arithmetic' / data}",
                 *overrides]
    with initialize_config_module(config_module="config", version_base="1.3"):
        cfg = compose(name, overrides=overrides)
    return resolve(cfg, schema, overrides, {}, 1).config.trainer.checkpoint


# ---------------------------------------------------------------------- config
def test_defaults_are_verls_and_load_contents_follows_save_contents():
    c = load()
    assert c.save_contents == ["model", "optimizer", "extra"]
    assert c.effective_load_contents() == ["model", "optimizer", "extra"]
    # verl's `${trainer.checkpoint.save_contents}` interpolation, through our loader
    c = load(["trainer.checkpoint.save_contents=[model,hf_model]"])
    assert c.load_contents == ["model", "hf_model"]
    assert load(["trainer.checkpoint.load_contents=[model]"]).effective_load_contents() == ["model"]
    assert load(["trainer.checkpoint.save_contents=[model]", "trainer.checkpoint.load_contents=null"]).effective_load_contents() == ["model"]
    # The RL trainers share the trainer section.
    assert load(["trainer.checkpoint.save_contents=[model,extra]"], "grpo_trainer", RLConfig).load_contents == ["model", "extra"]
    assert CheckpointConfig().effective_load_contents() == ["model", "optimizer", "extra"]  # null: same as save_contents


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["trainer.checkpoint.save_contents=[optimizer,extra]"],
         "trainer.checkpoint.save_contents: must include model, got ['optimizer', 'extra']"),
        (["trainer.checkpoint.save_contents=[model,weights]"],
         "trainer.checkpoint.save_contents: got 'weights', expected one of model, optimizer, extra, hf_model"),
        (["trainer.checkpoint.load_contents=[optimizer]"], "trainer.checkpoint.load_contents: must include model"),
        (["trainer.checkpoint.save_contents=[model,model]"], "trainer.checkpoint.save_contents: lists a part twice"),
    ],
)
def test_bad_contents_are_one_line_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load(overrides)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_fresh_parts_say_why():
    assert fresh_parts(["model", "optimizer", "extra"], ["model", "optimizer", "extra"]) == {}
    assert fresh_parts(["model", "optimizer", "extra"], ["model"]) == {
        "optimizer": "not in the checkpoint", "extra": "not in the checkpoint"}
    assert fresh_parts(["model", "optimizer"], ["model", "optimizer", "extra", "hf_model"]) == {
        "extra": "not in trainer.checkpoint.load_contents"}


# ---------------------------------------------------------------------- finding checkpoints
def make_step(run, step, complete=True):
    d = run / f"global_step_{step}"
    d.mkdir(parents=True)
    if complete:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return d


def test_latest_complete_checkpoint_and_tmp_never_read(tmp_path):
    run = tmp_path / "run"
    make_step(run, 2)
    ten = make_step(run, 10)
    make_step(run, 12, complete=False)  # no trainer_state.json: not complete
    tmp = run / "global_step_14.tmp"
    shutil.copytree(ten, tmp)  # even with a state file, a .tmp is never read
    assert latest_checkpoint(run) == ten
    assert find_checkpoint(run) == (ten, True)
    assert find_checkpoint(ten) == (ten, False)
    with pytest.raises(CheckpointError, match="still being written"):
        find_checkpoint(tmp)
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        find_checkpoint(run / "global_step_12")
    (run / "latest_checkpointed_iteration.txt").write_text("2")
    assert latest_checkpoint(run) == run / "global_step_2"  # the pointer wins when complete


@pytest.mark.parametrize("damage", ["", "{\"global_st", "[1, 2]"], ids=["zero-byte", "truncated", "not-a-state"])
def test_a_damaged_state_file_is_skipped_for_the_previous_checkpoint_in_one_line(tmp_path, caplog, damage):
    import logging

    run = tmp_path / "run"
    ten = make_step(run, 10)
    twenty = make_step(run, 20)
    (run / "latest_checkpointed_iteration.txt").write_text("20")
    (twenty / "trainer_state.json").write_text(damage)  # what a power cut can leave
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert latest_checkpoint(run) == ten
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert f"{twenty / 'trainer_state.json'}" in warnings[0] and warnings[0].endswith(f"using {ten}")
    assert find_checkpoint(run) == (ten, True)  # python -m trainer.export takes the same one
    # Named explicitly, it is refused in one line (a ConfigError: every rank gets it) rather than guessed around.
    from trainer.checkpoint import Checkpointer

    ckpt = Checkpointer(run, save_freq=2, max_to_keep=None, rank=0, world_size=1, contents=CheckpointConfig(), hf=None)
    with pytest.raises(ConfigError, match=r"trainer.resume_from_path=.*global_step_20.*trainer_state.json") as err:
        ckpt.resolve_resume("auto", str(twenty))
    assert "\n" not in str(err.value)
    # Every checkpoint damaged: nothing to resume, said once.
    (ten / "trainer_state.json").write_text("")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert latest_checkpoint(run) is None
    assert len(caplog.records) == 1 and "no complete checkpoint left" in caplog.records[0].getMessage()


@pytest.mark.parametrize("pointer", ["", "2\x00\x00", "garbage"], ids=["zero-byte", "nul-padded", "corrupt"])
def test_a_damaged_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path, caplog, pointer):
    import logging

    run = tmp_path / "run"
    make_step(run, 2)
    four = make_step(run, 4)
    (run / "latest_checkpointed_iteration.txt").write_text(pointer)
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert latest_checkpoint(run) == four  # was: ValueError from int()
    assert len(caplog.records) == 1 and "latest_checkpointed_iteration.txt is damaged" in caplog.records[0].getMessage()


def test_the_pointer_never_leads_to_a_newer_checkpoint_than_it_names(tmp_path):
    run = tmp_path / "run"
    two, four = make_step(run, 2), make_step(run, 4)
    (run / "latest_checkpointed_iteration.txt").write_text("2")
    (two / "trainer_state.json").write_text("")
    make_step(run, 1)
    # The pointer names step 2 (a resumed run's newest save); damaged, the one before it is used, not step 4.
    assert latest_checkpoint(run) == run / "global_step_1"
    assert four.is_dir()


def test_state_and_pointer_writes_are_fsynced_with_their_directory(tmp_path, monkeypatch):
    import os

    from trainer import checkpoint

    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", spy)
    run = tmp_path / "run"
    run.mkdir()
    checkpoint._write_durable(run / "latest_checkpointed_iteration.txt", "7")
    assert (run / "latest_checkpointed_iteration.txt").read_text() == "7"
    # The data (under its temporary name), then the directory that holds the new name.
    assert synced == [str(run / "latest_checkpointed_iteration.txt.tmp"), str(run)]
    synced.clear()
    (run / "hf").mkdir()
    (run / "hf" / "config.json").write_text("{}")
    checkpoint._fsync_tree(run)
    assert str(run / "hf" / "config.json") in synced and str(run / "hf") in synced and str(run) in synced


def test_export_refuses_an_out_dir_that_is_holds_or_is_inside_its_input_even_with_force(tmp_path):
    from trainer.export import export

    run = tmp_path / "run"
    step = make_step(run, 2)
    (step / "huggingface").mkdir()
    (step / "huggingface" / "config.json").write_text("{}")
    cases = [
        (run, run, "is or contains the input"),  # `python -m trainer.export RUN RUN --force`: was rmtree(RUN)
        (step, step, "is or contains the input"),
        (step, run, "is or contains the input"),
        (run, tmp_path, "is or contains the input"),
        (step, step / "huggingface", "is or contains the input"),  # the config source
        (step, step / "export", "is inside the checkpoint"),
        (run, step / "huggingface" / "x", "is inside the checkpoint"),
    ]
    for given, out, expected in cases:
        with pytest.raises(CheckpointError, match=expected) as err:
            export(given, out, force=True)
        assert "\n" not in str(err.value)
    assert sorted(p.name for p in step.iterdir()) == ["huggingface", "trainer_state.json"]
    assert (step / "huggingface" / "config.json").read_text() == "{}"


def test_pruning_keeps_the_newest_by_write_order_and_never_the_one_just_written(tmp_path):
    import os

    from trainer.checkpoint import Checkpointer

    run = tmp_path / "run"
    # A run that reached steps 10, 20 and 30, then resumed from step 10 (resume_from_path) and
    # has just written step 12: by step number 12 would be the one to go.
    for t, step in enumerate((10, 20, 30, 12)):
        d = make_step(run, step)
        os.utime(d / "trainer_state.json", ns=(10**18 + t * 10**9,) * 2)
    ckpt = Checkpointer(run, save_freq=2, max_to_keep=2, rank=0, world_size=1, contents=CheckpointConfig(), hf=None)
    ckpt._prune(run / "global_step_12")
    assert sorted(p.name for p in run.iterdir()) == ["global_step_12", "global_step_30"]
    # The one just written stays even when its file times say otherwise (a clock step back).
    make_step(run, 14)
    os.utime(run / "global_step_14" / "trainer_state.json", ns=(1, 1))
    ckpt.max_to_keep = 1
    ckpt._prune(run / "global_step_14")
    assert sorted(p.name for p in run.iterdir()) == ["global_step_14"]


def test_resume_from_outside_the_run_directory_says_where_from(tmp_path, caplog):
    import logging

    from trainer.checkpoint import Checkpointer

    elsewhere = make_step(tmp_path / "other_run", 4)
    ckpt = Checkpointer(tmp_path / "run", save_freq=2, max_to_keep=None, rank=0, world_size=1, contents=CheckpointConfig(), hf=None)
    with caplog.at_level(logging.INFO, logger="trainer.checkpoint"):
        assert ckpt.agree_on_resume("auto", str(elsewhere)) == elsewhere
    assert f"the checkpoint to resume, {elsewhere}, is outside the run directory {tmp_path / 'run'}" in caplog.text
    assert ckpt.agree_on_resume("auto", None) is None  # nothing in the run directory yet
    with pytest.raises(FileNotFoundError, match="is not a complete checkpoint"):
        ckpt.agree_on_resume("auto", str(tmp_path / "missing"))


# ---------------------------------------------------------------------- Hugging Face directories
@pytest.fixture(scope="module")
def trained_state(tiny_model):
    """A state dict unlike the tiny model's, as a checkpoint of a trained model would hold."""
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return {k: v.clone() for k, v in model.state_dict().items()}


def assets_from(model_dir):
    return HFAssets(load_config(str(model_dir)), load_tokenizer(str(model_dir)), str(model_dir))


def test_write_hf_model_round_trips_in_the_asked_dtype(tiny_model, trained_state, tmp_path):
    out = write_hf_model(trained_state, assets_from(tiny_model), tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, trained_state[key]), key
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    assert (out / "generation_config.json").read_bytes() == (tiny_model / "generation_config.json").read_bytes()
    assert not (tmp_path / "out.tmp").exists()
    bf16 = write_hf_model(trained_state, assets_from(tiny_model), tmp_path / "bf16", torch.bfloat16)
    assert AutoModelForCausalLM.from_pretrained(bf16, dtype="auto").dtype == torch.bfloat16


def test_no_generation_config_is_invented(tiny_model, trained_state, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(tiny_model, source)
    (source / "generation_config.json").unlink()
    out = write_hf_model(trained_state, assets_from(source), tmp_path / "out")
    assert (out / "config.json").is_file() and not (out / "generation_config.json").exists()


def test_a_state_that_does_not_fit_the_config_is_an_error(tiny_model, trained_state, tmp_path):
    partial = {k: v for k, v in trained_state.items() if "layers.1." not in k}
    with pytest.raises(CheckpointError, match=r"lacks \d+ weight\(s\) of this model config, e.g. 'model.layers.1"):
        write_hf_model(partial, assets_from(tiny_model), tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"has 1 weight\(s\) this model config lacks, e.g. 'model.layers.2.mlp.up_proj.weight'"):
        write_hf_model({**trained_state, "model.layers.2.mlp.up_proj.weight": torch.zeros(3)}, assets_from(tiny_model), tmp_path / "out")
    wide = {**trained_state, "model.norm.weight": torch.ones(64)}
    with pytest.raises(CheckpointError, match=r"do not fit this model config \(size mismatch for model.norm.weight"):
        write_hf_model(wide, assets_from(tiny_model), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the resume guard
def _checkpoint_with(run_dir, step, essential=None):
    import json as _json

    from trainer.resume_guard import ESSENTIAL_KEY

    ckpt = run_dir / f"global_step_{step}"
    ckpt.mkdir(parents=True)
    state = {"global_step": step, **({ESSENTIAL_KEY: essential} if essential is not None else {})}
    (ckpt / "trainer_state.json").write_text(_json.dumps(state))
    (run_dir / "latest_checkpointed_iteration.txt").write_text(str(step))
    return ckpt


def test_resuming_another_runs_checkpoint_is_one_line_naming_the_key(tmp_path, caplog):
    from trainer import resume_guard

    data = tmp_path / "a.parquet"
    data.write_bytes(b"x")
    cfg = {"model": {"partial_pretrain": "m", "lora_rank": 0}, "data": {"train_files": str(data), "multiturn": {"enable": False}}}
    saved = resume_guard.essential_config(cfg)
    assert saved["data.train_files"] == [str(data.resolve())] and "algorithm.adv_estimator" not in saved
    run_dir = tmp_path / "run"
    ckpt = _checkpoint_with(run_dir, 4, saved)
    same = resume_guard.essential_config({**cfg, "data": {"train_files": [str(data)], "multiturn": {"enable": False}}})
    assert resume_guard.mismatch("auto", None, run_dir, same) is None
    other = resume_guard.essential_config({**cfg, "model": {"partial_pretrain": "other", "lora_rank": 0}})
    with pytest.raises(ConfigError, match=rf"^model.partial_pretrain changed since the checkpoint {ckpt} \('m' -> 'other'\): "
                                          r"resuming would continue a different run; start fresh with trainer.resume_mode=disable "
                                          r"or a new trainer.default_local_dir, or resume it anyway with trainer.resume_force=true$"):
        resume_guard.check("auto", None, False, run_dir, other)
    assert resume_guard.mismatch("disable", None, run_dir, other) is None
    assert resume_guard.mismatch("auto", str(ckpt), run_dir, other) is None  # named by the user: a choice, not a surprise
    with caplog.at_level("WARNING", logger="trainer.resume_guard"):
        resume_guard.check("auto", None, True, run_dir, other)
    assert "trainer.resume_force=true: resuming although model.partial_pretrain changed" in caplog.text


def test_older_checkpoints_are_compared_with_the_run_directorys_config(tmp_path):
    import json as _json

    from trainer import resume_guard

    run_dir = tmp_path / "run"
    _checkpoint_with(run_dir, 2)  # written before the keys were saved with checkpoints
    assert resume_guard.mismatch("auto", None, run_dir, {"model.lora_rank": 8}) is None  # nothing to compare with
    (run_dir / "config.json").write_text(_json.dumps({"model": {"lora_rank": 0}, "algorithm": {"adv_estimator": "grpo"}}))
    assert resume_guard.mismatch("auto", None, run_dir, {"model.lora_rank": 0}) is None
    assert resume_guard.mismatch("auto", None, run_dir, {"model.lora_rank": 8}).startswith("model.lora_rank changed since")
