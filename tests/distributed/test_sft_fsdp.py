"""The SFT trainer on 2 gloo ranks: learning, split invariance, exact resume."""

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import ROOT, read_metrics, run_module

pytestmark = pytest.mark.distributed
MODULE = "trainer.fsdp_sft_trainer"


def args(model, data, run_dir, *extra):
    return [
        f"model.partial_pretrain={model}",
        f"data.train_files={data['train']}",
        f"data.val_files={data['val']}",
        f"trainer.default_local_dir={run_dir}",
        "trainer.logger=[console,file]",
        "trainer.log_freq=1",
        "data.max_length=24",
        # The tiny task's columns and learning rate (the base config carries verl's GSM8K ones).
        "data.prompt_key=prompt",
        "data.response_key=response",
        "optim.lr=1e-3",
        *extra,
    ]


def losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    return {step: m[key] for step, m in read_metrics(run_dir).items() if key in m}


def test_two_process_run_learns_exports_and_leaves_no_litter(tiny_model, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = run_module(MODULE, args(tiny_model, tiny_data, run_dir, "trainer.total_epochs=4", "data.train_batch_size=16",
                                   "data.micro_batch_size_per_gpu=4", "optim.lr=3e-3", "trainer.max_val_samples=2",
                                   "generation.max_new_tokens=4"), nproc=2, cwd=cwd)
    train = losses(run_dir)
    val = losses(run_dir, "val/loss")
    assert len(train) == 16 and max(train) == 16
    assert train[16] < 0.8 * train[1], train
    assert sorted(val) == [4, 8, 12, 16] and val[16] < val[4]
    assert list(cwd.iterdir()) == []  # no Hydra outputs/ litter
    assert "=== Validation Samples (Step 16) ===" in proc.stdout
    # The export loads with plain transformers and generates.
    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model")
    tok = AutoTokenizer.from_pretrained(run_dir / "hf_model")
    ids = tok.apply_chat_template([{"role": "user", "content": "1+2="}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert (run_dir / "hf_model" / "model.safetensors").is_file()


# Every rank casts to the dtype the model's config declares before the export's gathers; the ranks
# once disagreed on it (ranks > 0 built on meta from a config transformers then set to the build's
# dtype): a model declaring bf16, as real ones do, crashed at the end of a 2-rank run without
# validation samples, and so did bf16 master weights with them.
@pytest.mark.parametrize("declared, model_dtype, samples", [("bfloat16", "fp32", 0), ("float32", "bf16", 2)])
def test_two_ranks_export_in_the_declared_dtype(tiny_model, tiny_data, tmp_path, declared, model_dtype, samples):
    import shutil

    from safetensors.torch import load_file

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "dtype": declared}))
    run_dir = tmp_path / "run"
    run_module(MODULE, args(model_dir, tiny_data, run_dir, f"model.fsdp_config.model_dtype={model_dtype}",
                            "trainer.total_training_steps=4", "data.train_batch_size=16", f"trainer.max_val_samples={samples}",
                            "generation.max_new_tokens=4"), nproc=2)
    assert sorted(losses(run_dir)) == [1, 2, 3, 4] and sorted(losses(run_dir, "val/loss")) == [4]
    exported = load_file(run_dir / "hf_model" / "model.safetensors")
    assert json.loads((run_dir / "hf_model" / "config.json").read_text())["dtype"] == declared
    assert {t.dtype for t in exported.values()} == {getattr(torch, declared)}
    initial = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert any(not torch.equal(t.float(), initial[n].to(torch.bfloat16).float()) for n, t in exported.items())  # it trained
    if model_dtype == "bf16":  # bf16 masters: every exported fp32 value is a bf16 number
        assert all(torch.equal(t, t.to(torch.bfloat16).float()) for t in exported.values())


def test_loss_does_not_depend_on_how_the_batch_is_split(tiny_model, tiny_data, tmp_path):
    common = ["trainer.total_training_steps=3", "data.train_batch_size=8", "trainer.test_freq=-1", "trainer.max_val_samples=0",
              "trainer.export_hf_model=false", "optim.lr_scheduler=constant"]
    one = tmp_path / "one"
    two = tmp_path / "two"
    fixed = ["data.use_dynamic_bsz=false", "data.micro_batch_size_per_gpu=2"]
    run_module(MODULE, args(tiny_model, tiny_data, one, *common, *fixed), nproc=0)  # 1 × 4 micro, no torchrun
    run_module(MODULE, args(tiny_model, tiny_data, two, *common, *fixed), nproc=2)  # 2 × 2 micro
    budget = tmp_path / "budget"  # 2 ranks, micro-batches cut by a token budget instead of a count
    run_module(MODULE, args(tiny_model, tiny_data, budget, *common, "data.max_token_len_per_gpu=48"), nproc=2)
    a, b, c = read_metrics(one), read_metrics(two), read_metrics(budget)
    for step in (1, 2, 3):
        for other in (b, c):
            assert a[step]["train/loss"] == pytest.approx(other[step]["train/loss"], rel=1e-5)
            assert a[step]["train/grad_norm"] == pytest.approx(other[step]["train/grad_norm"], rel=1e-4)


# 10 epochs of 64 examples, 16 a step (4 steps an epoch, 40 in all), micro-batches cut by a token
# budget. One uninterrupted run of it, checkpointed every 4 steps (every epoch boundary), is the
# reference of both resume tests below.
TEN_EPOCHS = ["trainer.total_epochs=10", "data.train_batch_size=16", "data.max_token_len_per_gpu=40", "trainer.max_val_samples=0",
              "trainer.test_freq=-1", "trainer.export_hf_model=false"]


@pytest.fixture(scope="module")
def ten_epochs(tiny_model, tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ten_epochs") / "run"
    run_module(MODULE, args(tiny_model, tiny_data, run_dir, *TEN_EPOCHS, "trainer.save_freq=4"), nproc=2)
    return run_dir


def test_resume_from_an_epoch_boundary_continues_with_the_next_epoch(tiny_model, tiny_data, ten_epochs, tmp_path):
    state = json.loads((ten_epochs / "global_step_4" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 0)
    # Steps 5-8 from the checkpoint at step 4; the schedule stays the 40 steps of all epochs.
    resumed = tmp_path / "resumed"
    run_module(MODULE, args(tiny_model, tiny_data, resumed, *TEN_EPOCHS, "trainer.total_training_steps=8",
                            "trainer.resume_mode=resume_path", f"trainer.resume_from_path={ten_epochs / 'global_step_4'}"), nproc=2)
    want, got = losses(ten_epochs), losses(resumed)
    assert sorted(got) == [5, 6, 7, 8]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7)
    # Step 5 is the first batch of the second epoch (0-based epoch 1), not a replay of epoch 0.
    assert read_metrics(resumed)[5]["train/epoch"] == read_metrics(ten_epochs)[5]["train/epoch"] == 1.0


def test_killed_run_resumes_with_the_same_losses(tiny_model, tiny_data, ten_epochs, tmp_path):
    common = [*TEN_EPOCHS, "trainer.save_freq=10", "trainer.max_ckpt_to_keep=2"]
    reference = ten_epochs

    crashed = tmp_path / "crashed"
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", MODULE,
           *args(tiny_model, tiny_data, crashed, *common)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**__import__("os").environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not (crashed / "latest_checkpointed_iteration.txt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    # A crashed node: every process dies at once. torchrun starts its workers in sessions of their
    # own, so killing torchrun's process group alone would leave them training (and writing
    # checkpoints beside the resumed run).
    agent = psutil.Process(proc.pid)
    workers = agent.children(recursive=True)
    for process in [*workers, agent]:
        process.kill()
    proc.wait()
    psutil.wait_procs(workers, timeout=30)
    done_before = max(losses(crashed))
    assert done_before < 40, "the run finished before it could be killed"
    checkpoint = int((crashed / "latest_checkpointed_iteration.txt").read_text())

    run_module(MODULE, args(tiny_model, tiny_data, crashed, *common), nproc=2)  # resume_mode=auto
    want, got = losses(reference), losses(crashed)
    assert max(got) == max(want) == 40
    for step in range(checkpoint + 1, 41):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    assert not list(crashed.glob("*.tmp"))
    assert len(list(crashed.glob("global_step_*"))) == 2  # max_ckpt_to_keep


def test_hsdp_2x2_trains_like_one_process_and_resumes(tiny_model, tiny_data, tmp_path):
    """model.fsdp_config.fsdp_size=2 on 4 ranks: sharded within pairs, replicated across them. The
    losses and gradient norms of the global batch are one process's (plain `python -m`, no
    launcher: the reference costs one interpreter, not four); its checkpoint (each pair's shards,
    replicas once) resumes to the same step 3."""
    common = ["data.train_batch_size=16", "data.micro_batch_size_per_gpu=2", "trainer.test_freq=-1", "trainer.max_val_samples=0",
              "trainer.export_hf_model=false", "optim.lr_scheduler=constant"]
    one, hsdp = tmp_path / "one", tmp_path / "hsdp"
    run_module(MODULE, args(tiny_model, tiny_data, one, *common, "trainer.total_training_steps=3"), nproc=0)
    hsdp_args = [*common, "model.fsdp_config.fsdp_size=2"]
    proc = run_module(MODULE, args(tiny_model, tiny_data, hsdp, *hsdp_args, "trainer.total_training_steps=2"), nproc=4)
    assert "HSDP: 2 replica groups × 2 shards" in proc.stderr
    assert (hsdp / "global_step_2" / ".metadata").is_file()
    proc = run_module(MODULE, args(tiny_model, tiny_data, hsdp, *hsdp_args, "trainer.total_training_steps=3"), nproc=4)
    assert "resumed from" in proc.stderr
    a, b = read_metrics(one), read_metrics(hsdp)
    assert sorted(b) == [1, 2, 3]
    for step in (1, 2, 3):
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-5), step
        assert b[step]["train/grad_norm"] == pytest.approx(a[step]["train/grad_norm"], rel=1e-4), step
