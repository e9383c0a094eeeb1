"""Start the ranks of one `python -m MODULE ARGS` launch as forks of one interpreter that has
imported the heavy libraries (torch, transformers, Hydra) once.

    python tests/fork_ranks.py SPEC.json

SPEC: {"module": str, "args": [...], "ranks": [{"env": {...}, "cwd": str}, ...], "status": path}.
The launcher's own environment is the launch's; each rank adds its own variables (torchrun's
worker environment, a node's HOME) and working directory, then runs the module exactly as
`python -m` does (runpy's `_run_module_as_main` in a fresh `__main__`, `sys.path[0]` the working
directory) and exits as an interpreter does (threads joined, exit hooks, streams flushed). As
torchrun does, the first rank to fail stops the others (SIGTERM, then SIGKILL). Each rank's exit
code, as `Popen.returncode` gives it (minus the signal), goes to SPEC's "status" file.

An interpreter start with these imports costs ~6 CPU-seconds here, most of a tiny test run:
with two ranks on two cores it is a third of the suite's time. What a fork does not give a rank:
a str-hash seed of its own (every rank has the launcher's), and an import of the preloaded
libraries under its own variables (the launch's environment holds every variable they read at
import: OMP_NUM_THREADS, HF_HUB_OFFLINE). The project's own modules are imported by each rank.
The tests whose subject is the launcher run torchrun (tests/helpers.run_ranks).
"""

import atexit
import gc
import importlib
import json
import os
import runpy
import signal
import sys
import threading
import time
import types

PRELOAD = (
    "torch", "torch.distributed.checkpoint", "torch.distributed.fsdp", "transformers", "transformers.modeling_utils",
    "transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2", "hydra", "omegaconf",
    "safetensors.torch", "pyarrow.parquet",
)
GRACE_S = 15.0


def run_rank(module: str, args: list, env: dict, cwd: str) -> None:
    """In the forked child: the module as `python -m module args` would run it. Never returns."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ.update(env)
    os.chdir(cwd)
    sys.path[0] = os.getcwd()
    sys.argv = ["-m", *args]  # runpy puts the module's file in argv[0], as `python -m` does
    sys.modules["__main__"] = types.ModuleType("__main__")
    code = 0
    try:
        runpy._run_module_as_main(module, alter_argv=True)
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - reported as the interpreter would
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()  # what an interpreter's exit does first: wait for non-daemon threads
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Ranks:
    """The forked ranks: reaped as they end; after the first failure, or a SIGTERM to the
    launcher (the test's timeout), the rest get SIGTERM and, GRACE_S later, SIGKILL."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self.codes: dict[int, int] = {}  # pid -> exit code, in the order the ranks ended
        self.kill_at = None

    def stop(self, *_) -> None:
        if self.kill_at is None:
            self.kill_at = time.monotonic() + GRACE_S
            self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        for pid in self.pids:
            if pid not in self.codes:
                os.kill(pid, sig)

    def wait(self) -> None:
        while len(self.codes) < len(self.pids):
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid:
                self.codes[pid] = os.waitstatus_to_exitcode(status)
                if self.codes[pid] != 0:
                    self.stop()
                continue
            if self.kill_at is not None and time.monotonic() > self.kill_at:
                self._signal(signal.SIGKILL)
                self.kill_at = float("inf")
            time.sleep(0.05)


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    for name in PRELOAD:
        importlib.import_module(name)
    # Objects the ranks inherit stay out of their collector's scans: a scan writes to each object's
    # header, which would copy every inherited page into each rank (copy-on-write).
    gc.freeze()
    ranks = Ranks()
    signal.signal(signal.SIGTERM, ranks.stop)
    for rank in spec["ranks"]:
        pid = os.fork()
        if pid == 0:
            run_rank(spec["module"], spec["args"], rank["env"], rank["cwd"])
        ranks.pids.append(pid)
    ranks.wait()
    with open(spec["status"], "w") as out:
        json.dump({"returncodes": [ranks.codes[p] for p in ranks.pids], "in_order_ended": list(ranks.codes.values())}, out)


if __name__ == "__main__":
    main()
