"""The suite's launcher (tests/fork_ranks.py, through helpers.run_module): a forked rank runs its
module as `python -m` would, exit codes and streams are torchrun's, a timeout leaves nothing
running, and a launch whose import-time variables differ gets an interpreter of its own."""

import json
import subprocess

import psutil
import pytest
import torch

from helpers import ROOT, run_module

PROBE = """
import json, os, sys, time
import torch
import extra_mod
print(json.dumps({"rank": os.environ.get("RANK"), "cwd": os.getcwd(), "path0": sys.path[0], "argv": sys.argv,
                  "name": __name__, "extra": extra_mod.VALUE, "threads": torch.get_num_threads(),
                  "pid": os.getpid()}), flush=True)
print("rank", os.environ.get("RANK"), "to stderr", file=sys.stderr)
if os.environ.get("PROBE_PID_FILE"):
    open(os.environ["PROBE_PID_FILE"], "w").write(str(os.getpid()))
if os.environ.get("RANK") == "1":
    sys.exit(3)
time.sleep(float(os.environ.get("PROBE_SLEEP", "0")))
"""


@pytest.fixture
def probe(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "extra_mod.py").write_text("VALUE = 7\n")
    return tmp_path, {"PYTHONPATH": f"{ROOT}:{lib}"}


def test_a_forked_rank_runs_its_module_as_python_m_and_the_first_failure_stops_the_others(probe):
    where, env = probe
    # rank 1 exits 3 at once; rank 0 would sleep 10 minutes: it is stopped, and the code is rank 1's
    proc = run_module("probe", ["a", "b=1"], nproc=2, cwd=where, env={**env, "PROBE_SLEEP": "600"}, check=False, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    seen = sorted((json.loads(line) for line in proc.stdout.splitlines()), key=lambda r: r["rank"])
    assert [r["rank"] for r in seen] == ["0", "1"]
    for r in seen:
        assert r["cwd"] == r["path0"] == str(where)
        assert r["argv"] == [str(where / "probe.py"), "a", "b=1"] and r["name"] == "__main__"
        # the launch's PYTHONPATH; the threads of the suite's OMP_NUM_THREADS, as this process has them
        assert r["extra"] == 7 and r["threads"] == torch.get_num_threads()
    assert "rank 0 to stderr" in proc.stderr and "rank 1 to stderr" in proc.stderr
    assert not psutil.pid_exists(seen[0]["pid"])


def test_a_launch_past_its_timeout_is_stopped_whole(probe, tmp_path):
    where, env = probe
    pid_file = tmp_path / "pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run_module("probe", [], nproc=0, cwd=where, env={**env, "PROBE_SLEEP": "600", "PROBE_PID_FILE": str(pid_file)},
                   timeout=8)
    assert pid_file.exists() and not psutil.pid_exists(int(pid_file.read_text()))


def test_a_launch_with_its_own_import_time_variables_gets_its_own_interpreter(probe):
    where, env = probe
    # OMP_NUM_THREADS is read when torch is imported: a fork of the zygote (the suite's value) would not have another
    other = 2 if torch.get_num_threads() == 1 else 1  # torch caps it at the cores (2 here)
    proc = run_module("probe", [], nproc=0, cwd=where, env={**env, "OMP_NUM_THREADS": str(other)})
    assert json.loads(proc.stdout)["threads"] == other
