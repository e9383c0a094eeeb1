"""Checkpoints verl users can use: `huggingface/` in every checkpoint, `trainer.checkpoint.save_contents`
/ `load_contents`, and `python -m trainer.export` (a checkpoint → a Hugging Face model directory).

Two SFT runs on 2 gloo ranks serve every test here:
  run A saves [model, hf_model] at steps 2 and 4 (no optimizer, no extra) and exports hf_model;
  run B resumes from A's step 2 with the default contents, trains steps 3-4 and exports hf_model.
The export commands of a test group run one after the other, each a fork of the suite's zygote
(tests/fork_ranks.py): most of a CLI run is its imports.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import make_tiny_model, read_metrics, run_cases, run_module

pytestmark = pytest.mark.distributed
SFT = "trainer.fsdp_sft_trainer"
# Not what transformers would derive from config.json, so a copy can be told from an invention.
GENERATION_CONFIG = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [1, 0], "pad_token_id": 0}
PROMPT_IDS = torch.tensor([[5, 17, 3, 42, 8, 11, 60, 2, 9, 33]])


def sft_args(model, data, run_dir, *extra):
    # Every key given: the base config's defaults are not what these tests are about.
    return [
        f"model.partial_pretrain={model}", f"data.train_files={data['train']}", f"data.val_files={data['val']}",
        "data.prompt_key=prompt", "data.response_key=response",
        "data.max_length=24", "data.train_batch_size=16", "data.micro_batch_size_per_gpu=4", "optim.lr=1e-3",
        "trainer.max_val_samples=0", "trainer.total_training_steps=4", "trainer.total_epochs=1", "trainer.save_freq=2",
        "trainer.max_ckpt_to_keep=null", "trainer.test_freq=-1",
        "trainer.export_hf_model=true", "trainer.logger=[console,file]", "trainer.log_freq=1", f"trainer.default_local_dir={run_dir}",
        *extra,
    ]


def run_exports(*arg_lists) -> list:
    """`python -m trainer.export ARGS` for each list, each a process forked after one import."""
    return run_cases("trainer.export", [{"args": [str(a) for a in args]} for args in arg_lists])


def logits(model_dir: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=PROMPT_IDS).logits


@pytest.fixture(scope="module")
def source_model(tmp_path_factory) -> Path:
    model = make_tiny_model(tmp_path_factory.mktemp("export_model") / "model")
    (model / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    return model


@pytest.fixture(scope="module")
def runs(source_model, tiny_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export_runs")
    a, b = root / "a", root / "b"
    run_module(SFT, sft_args(source_model, tiny_data, a, "trainer.checkpoint.save_contents=[model,hf_model]"), nproc=2)
    resumed = run_module(SFT, sft_args(source_model, tiny_data, b, "trainer.resume_mode=resume_path",
                                       f"trainer.resume_from_path={a / 'global_step_2'}"), nproc=2)
    return {"a": a, "b": b, "resume_log": resumed.stderr, "out": root / "out"}


@pytest.fixture(scope="module")
def exports(runs) -> dict:
    a, b, out = runs["a"], runs["b"], runs["out"]
    procs = run_exports(
        [a / "global_step_2", out / "a2"],
        [a, out / "a_latest"],  # a run directory: its latest checkpoint
        [b / "global_step_4", out / "b4_bf16", "--dtype", "bf16"],
    )
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {"a2": procs[0], "a_latest": procs[1], "b4_bf16": procs[2]}


# ---------------------------------------------------------------------- what a checkpoint holds
def test_every_checkpoint_has_a_huggingface_folder(source_model, runs):
    for step_dir in (runs["a"] / "global_step_2", runs["a"] / "global_step_4", runs["b"] / "global_step_4"):
        hf = step_dir / "huggingface"
        assert json.loads((hf / "config.json").read_text())["num_hidden_layers"] == 2
        assert (hf / "generation_config.json").read_bytes() == (source_model / "generation_config.json").read_bytes()
        assert AutoTokenizer.from_pretrained(hf)("12+34=")["input_ids"] == AutoTokenizer.from_pretrained(source_model)("12+34=")["input_ids"]
    # The full weights only where save_contents has hf_model.
    assert (runs["a"] / "global_step_2" / "huggingface" / "model.safetensors").is_file()
    assert not list((runs["b"] / "global_step_4" / "huggingface").glob("*.safetensors"))
    assert not list(runs["a"].glob("*.tmp")) and not list(runs["b"].glob("*.tmp"))


def test_save_contents_model_only_writes_no_optimizer_and_no_extra(runs):
    step = runs["a"] / "global_step_2"
    parts = {key.split(".", 1)[0] for key in FileSystemReader(str(step)).read_metadata().state_dict_metadata}
    assert parts == {"model"}
    assert not (step / "rng").exists()
    state = json.loads((step / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["save_contents"] == ["model", "hf_model"] and "scheduler" not in state
    # The default contents: optimizer state, scheduler and RNG are there.
    full = runs["b"] / "global_step_4"
    assert {k.split(".", 1)[0] for k in FileSystemReader(str(full)).read_metadata().state_dict_metadata} == {"model", "optim"}
    assert "scheduler" in json.loads((full / "trainer_state.json").read_text()) and (full / "rng" / "rank_1.pt").is_file()


def test_resume_without_optimizer_and_extra_warns_once_and_continues(runs):
    warnings = [l for l in runs["resume_log"].splitlines() if "resuming from" in l]
    assert len(warnings) == 1, warnings
    assert "without optimizer (not in the checkpoint) and extra (not in the checkpoint)" in warnings[0]
    assert "the optimizer state starts from zero" in warnings[0] and "the LR schedule restarts" in warnings[0]
    assert sorted(read_metrics(runs["b"])) == [3, 4]  # continued from step 2 to the end
    assert (runs["b"] / "global_step_4" / "trainer_state.json").is_file()


def test_hf_model_in_save_contents_loads_with_from_pretrained(source_model, runs):
    hf = runs["a"] / "global_step_2" / "huggingface"
    model = AutoModelForCausalLM.from_pretrained(hf)
    initial = AutoModelForCausalLM.from_pretrained(source_model)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, initial.model.layers[0].mlp.up_proj.weight)
    assert model.generation_config.temperature == 0.6


# ---------------------------------------------------------------------- export
def test_export_of_an_intermediate_checkpoint_matches_its_full_weights(source_model, runs, exports):
    out = runs["out"] / "a2"
    got, want = logits(out), logits(runs["a"] / "global_step_2" / "huggingface")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, logits(source_model), atol=1e-3)  # training moved the weights
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.6
    assert AutoTokenizer.from_pretrained(out).eos_token == AutoTokenizer.from_pretrained(source_model).eos_token
    # DCP unpickles .metadata: the command says so, as the trainer does for checkpoints from elsewhere.
    note = f"note: reading {runs['a'] / 'global_step_2' / '.metadata'} unpickles it"
    assert sum(line.startswith(note) for line in exports["a2"].stderr.splitlines()) == 1, exports["a2"].stderr


def test_export_of_a_run_directory_takes_the_latest_and_matches_the_trained_model(source_model, runs, exports):
    assert f"using the latest checkpoint of the run: {runs['a'] / 'global_step_4'}" in exports["a_latest"].stdout
    got = logits(runs["out"] / "a_latest")
    torch.testing.assert_close(got, logits(runs["a"] / "hf_model"), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, logits(runs["out"] / "a2"), atol=1e-4)  # step 4, not step 2


def test_export_in_bf16_holds_the_trained_weights_rounded(runs, exports):
    out = runs["out"] / "b4_bf16"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(runs["b"] / "hf_model", dtype=torch.float32).state_dict()
    for key, value in trained.items():
        assert torch.equal(exported[key], value.to(torch.bfloat16).float()), key
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


# ---------------------------------------------------------------------- export: bad input
def test_bad_input_is_one_line_and_exit_code_2(source_model, runs, tmp_path):
    old = tmp_path / "old_checkpoint"  # as written before checkpoints carried huggingface/
    shutil.copytree(runs["a"] / "global_step_2", old, ignore=shutil.ignore_patterns("huggingface"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    partial = tmp_path / "run" / "global_step_6.tmp"
    replaced = tmp_path / "replaced"
    replaced.mkdir()
    (replaced / "stale.txt").write_text("old export")
    shutil.copytree(runs["a"] / "global_step_2", partial)
    cases = [
        ([not_a_checkpoint, tmp_path / "o1"], f"error: {not_a_checkpoint} is neither a checkpoint (no trainer_state.json) nor a run directory"),
        ([old, tmp_path / "o2"], f"error: {old} has no huggingface/ folder"),
        ([runs["a"] / "global_step_2", busy], f"error: {busy} exists and is not empty (pass --force to replace it)"),
        ([partial, tmp_path / "o4"], f"error: {partial} is a checkpoint still being written"),
    ]
    procs = run_exports(*[args for args, _ in cases], [old, replaced, "--model-config", source_model, "--force"])
    for proc, (args, expected) in zip(procs, cases):
        errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
        assert errors[0].startswith(expected), errors[0]
        assert "Traceback" not in proc.stderr
    assert "--model-config DIR" in procs[1].stderr
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o4"))
    # The old checkpoint exports with the config and tokenizer given by hand, over an old export.
    assert procs[-1].returncode == 0, procs[-1].stderr[-3000:]
    assert not (replaced / "stale.txt").exists()
    torch.testing.assert_close(logits(replaced), logits(runs["a"] / "global_step_2" / "huggingface"), rtol=1e-6, atol=1e-6)
