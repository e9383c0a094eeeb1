"""What real clusters do to a run, on this host: two torchrun agents as two nodes (c10d
rendezvous on 127.0.0.1), node-local run directories, SIGTERM (preemption), one rank failing."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import ROOT, free_port, read_metrics, run_module

pytestmark = pytest.mark.distributed
MODULE = "trainer.fsdp_sft_trainer"
ENTRY = ROOT / "tests" / "distributed" / "fault_entry.py"
BOUND_S = 180  # every launch here must end by itself well before this; a hang fails the test


def args(model, data, run_dir, *extra):
    return [
        f"model.partial_pretrain={model}", f"data.train_files={data['train']}", f"data.val_files={data['val']}",
        f"trainer.default_local_dir={run_dir}", "trainer.logger=[console,file]", "trainer.log_freq=1", "data.max_length=24",
        "data.prompt_key=prompt", "data.response_key=response", "optim.lr=1e-3", "data.train_batch_size=16",
        "data.micro_batch_size_per_gpu=4", "trainer.max_val_samples=0", "trainer.test_freq=-1", *extra,
    ]


def env(**extra) -> dict:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("VERL_", "FAULT_"))}
    out.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra})
    return out


def two_nodes(cwds: list[Path], train_args: list[str], port: int, target: list[str], extra_env: dict | None = None) -> list[subprocess.Popen]:
    """Two torchrun agents, one "node" each, each in its own working directory."""
    procs = []
    for node, cwd in enumerate(cwds):
        cwd.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=job{port}", *target, *train_args]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env(**(extra_env or {})), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    return procs


def outputs(procs: list[subprocess.Popen]) -> list[str]:
    return [p.communicate(timeout=BOUND_S)[0] for p in procs]


def weights(hf_dir: Path) -> dict:
    return load_file(hf_dir / "model.safetensors")


def test_node_local_run_directories_stop_every_rank_with_one_line(tiny_model, tiny_data, tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    procs = two_nodes(nodes, args(tiny_model, tiny_data, "run", "trainer.total_training_steps=2"), free_port(), ["-m", MODULE])
    logs = outputs(procs)
    for node, (proc, text) in enumerate(zip(procs, logs)):
        assert proc.returncode != 0, text[-2000:]
        lines = [l for l in text.splitlines() if "error: trainer.default_local_dir='run' is not shared by all ranks" in l]
        assert len(lines) == 1, text[-3000:]  # one line on each node's own log
        assert not list((nodes[node] / "run").glob("global_step_*"))  # nothing trained, nothing half-written


# Two ranks as two one-rank nodes (LOCAL_RANK 0 each, their own token caches), started directly.
def node_env(tmp_path: Path, **rank1) -> list[dict]:
    node = {"LOCAL_WORLD_SIZE": "1", "GROUP_WORLD_SIZE": "2"}
    return [{**node, "LOCAL_RANK": "0", "GROUP_RANK": "0", "XDG_CACHE_HOME": str(tmp_path / "cache0")},
            {**node, "LOCAL_RANK": "0", "GROUP_RANK": "1", "XDG_CACHE_HOME": str(tmp_path / "cache1"), **rank1}]


def test_a_verl_variable_set_on_one_node_only_stops_every_rank_at_start(tiny_model, tiny_data, tmp_path):
    # VERL_MAX_VAL_SAMPLES=0 on one node: its rank would skip the sample event's collectives while
    # the other entered them, and both would wait until the collective timeout (30 min), silently.
    run_dir = tmp_path / "run"
    given = [a for a in args(tiny_model, tiny_data, run_dir, "trainer.total_training_steps=2", "trainer.test_freq=1")
             if not a.startswith("trainer.max_val_samples=")]  # the command line would win over the variable
    proc = run_module(MODULE, given, nproc=2, check=False, timeout=BOUND_S, rank_env=node_env(tmp_path, VERL_MAX_VAL_SAMPLES="0"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert errors and errors[0].startswith("error: trainer.max_val_samples: differ between rank 0 and rank 1"), proc.stderr[-3000:]
    assert "VERL_* environment variables" in errors[0] and "step 1" not in proc.stdout


def test_a_data_file_that_differs_on_one_node_stops_every_rank_at_start(tiny_model, tiny_data, tmp_path):
    # The same relative path names another file on each node (48 rows on one, 64 on the other):
    # each would run its own step count, and the longer one would wait in a collective forever.
    import shutil

    import pyarrow.parquet as pq

    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node, rows in zip(nodes, (None, 48)):
        (node / "data").mkdir(parents=True)
        table = pq.read_table(tiny_data["train"])
        pq.write_table(table if rows is None else table.slice(0, rows), node / "data" / "train.parquet")
        shutil.copy(tiny_data["val"], node / "data" / "val.parquet")
    run_dir = tmp_path / "run"
    given = args(tiny_model, {"train": "data/train.parquet", "val": "data/val.parquet"}, run_dir, "trainer.total_training_steps=4")
    proc = run_module(MODULE, given, nproc=2, check=False, timeout=BOUND_S, rank_env=node_env(tmp_path), rank_cwd=nodes)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert errors and errors[0].startswith("error: data.train_files: differ between rank 0 and rank 1"), proc.stderr[-3000:]
    assert "step 1" not in proc.stdout and not list(run_dir.glob("global_step_*"))


def test_the_same_data_under_each_nodes_own_home_trains(tiny_model, tiny_data, tmp_path):
    # verl's paths start with `~`: under another HOME on each node they differ as strings, and the
    # files they name (model and data) are the same: the ranks compare what they read, not how a
    # node spells it.
    import shutil

    homes = [tmp_path / "home0", tmp_path / "home1"]
    for home in homes:
        shutil.copytree(tiny_model, home / "model")
        (home / "data").mkdir(parents=True)
        shutil.copy(tiny_data["train"], home / "data" / "train.parquet")
        shutil.copy(tiny_data["val"], home / "data" / "val.parquet")
    run_dir = tmp_path / "run"
    # quoted for Hydra's grammar; a shell's $HOME/data/... differs per node the same way
    given = args("'~/model'", {"train": "'~/data/train.parquet'", "val": "'~/data/val.parquet'"}, run_dir,
                 "trainer.total_training_steps=2")
    envs = [{**e, "HOME": str(home)} for e, home in zip(node_env(tmp_path), homes)]
    run_module(MODULE, given, nproc=2, timeout=BOUND_S, rank_env=envs)
    assert sorted(read_metrics(run_dir)) == [1, 2]


def test_two_nodes_preempted_by_sigterm_resume_and_export_the_weights_of_one_node(tiny_model, tiny_data, tmp_path):
    common = ["trainer.total_training_steps=8", "trainer.save_freq=-1", "optim.lr_scheduler=cosine"]
    reference = tmp_path / "reference"
    run_module(MODULE, args(tiny_model, tiny_data, reference, *common), nproc=2)

    shared = tmp_path / "shared_run"  # one absolute path that both "nodes" see
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    marker = tmp_path / "holding"
    procs = two_nodes(nodes, args(tiny_model, tiny_data, shared, *common), free_port(), [str(ENTRY)],
                      {"FAULT_HOLD_AT": f"4:{marker}"})
    deadline = time.time() + BOUND_S
    while not marker.exists():
        assert all(p.poll() is None for p in procs) and time.time() < deadline, outputs(procs)
        time.sleep(0.05)
    # SIGTERM to the agent (torchrun) of rank 0's node only, while rank 0 is before step 4: the
    # other node's rank must stop after the same step.
    os.kill(int(marker.read_text()), signal.SIGTERM)
    logs = outputs(procs)  # raises on a hang
    text = "\n".join(logs)
    assert "stopped by SIGTERM after step 4" in text, text[-4000:]
    assert sorted(p.name for p in shared.glob("global_step_*")) == ["global_step_4"]  # save_freq=-1: this one alone
    assert max(read_metrics(shared)) == 4

    procs = two_nodes(nodes, args(tiny_model, tiny_data, shared, *common), free_port(), ["-m", MODULE])
    logs = outputs(procs)
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    assert "resumed from" in "\n".join(logs)
    want, got = weights(reference / "hf_model"), weights(shared / "hf_model")
    assert want.keys() == got.keys()
    for name in want:
        assert (want[name] == got[name]).all(), name
    ref_metrics, run_metrics = read_metrics(reference), read_metrics(shared)
    for step in range(5, 9):
        assert run_metrics[step]["train/loss"] == pytest.approx(ref_metrics[step]["train/loss"], rel=1e-6, abs=1e-7)


def test_a_failure_on_one_rank_ends_every_rank(tiny_model, tiny_data, tmp_path):
    """A NaN loss on one rank skips the step on both; then an error on rank 0 inside the
    generation copy's gather (a collective: formerly inside a `try`, a hang) ends the whole run
    with that error. stdout and stderr go to one file, as under Slurm or nohup. The parameters
    are offloaded to the host (cpu_offload): clipping and the gather then run on CPU tensors, as
    they do over `cpu:gloo,cuda:nccl` on GPUs."""
    run_dir = tmp_path / "run"
    faults = {"FAULT_NAN_LOSS": "1:2", "FAULT_GATHER_ERROR": "0:2"}  # the second validation's gather
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ENTRY),
           *args(tiny_model, tiny_data, run_dir, "trainer.total_training_steps=6", "trainer.test_freq=2",
                 "trainer.max_val_samples=2", "generation.max_new_tokens=2", "model.fsdp_config.cpu_offload=true")]
    log_file = tmp_path / "job.log"
    with open(log_file, "w") as out:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env(**faults), stdout=out, stderr=subprocess.STDOUT, timeout=BOUND_S)
    text = log_file.read_text()
    assert proc.returncode != 0
    assert "injected failure inside the gather on rank 0 (gather 2)" in text, text[-4000:]
    assert "step 2: non-finite loss on some rank; update skipped on every rank (1 so far)" in text, text[-4000:]
    metrics = read_metrics(run_dir)
    assert metrics[2]["train/skipped_steps"] == 1.0 and metrics[1]["train/skipped_steps"] == 0.0
    assert max(metrics) == 4  # the failing validation is step 4's: nothing trained past it
    # A log people read in a file: no bar redrawn with carriage returns, and every sample block
    # and metric line at the start of a line (what `grep '^=== Validation Samples'` needs).
    assert "\r" not in text
    assert "=== Validation Samples (Step 2) ===" in text.splitlines()
    for marker in ("=== Validation Samples (Step", "step 1: train/", "step 2: val/", "step 4: train/"):
        assert marker in text and text.count(marker) == text.count("\n" + marker), marker


def test_a_failing_forward_or_a_bad_row_mid_run_on_one_rank_ends_every_rank(tiny_model, tiny_data, tmp_path):
    """TRL's rank-local forward failure: rank 1's forward raises in step 3 while rank 0 waits
    in that step's collectives; both end, with rank 1's error. Then two "nodes": a data error
    on node 1 mid-run (a row that no longer reads) is one line on that node's log, and node 0,
    whose rank waits in a collective, ends too."""
    run_dir = tmp_path / "forward"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ENTRY),
           *args(tiny_model, tiny_data, run_dir, "trainer.total_training_steps=8")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(FAULT_FORWARD_ERROR="1:3"), capture_output=True, text=True,
                          timeout=BOUND_S)
    assert proc.returncode != 0
    assert "injected forward failure on rank 1 at step 3" in proc.stderr, proc.stderr[-4000:]
    assert max(read_metrics(run_dir)) == 2

    shared = tmp_path / "data"
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    procs = two_nodes(nodes, args(tiny_model, tiny_data, shared, "trainer.total_training_steps=8"), free_port(), [str(ENTRY)],
                      {"FAULT_DATA_ERROR": "1:3"})
    logs = outputs(procs)  # raises on a hang
    assert all(p.returncode != 0 for p in procs), "\n".join(logs)[-4000:]
    said = [l for l in logs[1].splitlines() if "error: injected.jsonl: row" in l]
    assert said == ["[rank 1] error: injected.jsonl: row 2: column 'response' is list, expected text"], logs[1][-4000:]
    assert "Traceback" not in logs[1].split(said[0])[0][-2000:]  # the line, not a stack, says what went wrong
    assert max(read_metrics(shared)) == 2
