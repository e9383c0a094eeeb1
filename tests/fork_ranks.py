"""Run `python -m MODULE ARGS` launches (one or more ranks) as forks of an interpreter that has
imported the heavy libraries (torch, transformers, Hydra) once.

    python tests/fork_ranks.py --serve     # a zygote: one launch per JSON line on stdin
    python tests/fork_ranks.py SPEC.json   # one launch, this interpreter importing for it alone

A launch: {"module": str, "args": [...], "env": {...}, "ranks": [{"env": {...}, "cwd": str}, ...],
"status": path, "stdout": path, "stderr": path}. The zygote forks a manager per launch (it answers
with the manager's pid, the leader of the launch's process group); the manager takes the launch's
environment exactly, sends both streams to the launch's files and forks the ranks. Each rank adds
its own variables (torchrun's worker environment, a node's HOME) and working directory, runs the
module exactly as `python -m` does (runpy's `_run_module_as_main` in a fresh `__main__`,
`sys.path[0]` the working directory) and exits as an interpreter does (threads joined, exit
hooks, streams flushed). As torchrun does, the first rank to fail stops the others (SIGTERM,
then SIGKILL); a SIGTERM to the manager (a test's timeout) stops them all the same. Each rank's
exit code, as `Popen.returncode` gives it, goes to the "status" file, written last.

An interpreter start with these imports costs ~6 CPU-seconds here, most of a tiny test run: with
two ranks on two cores it was a third of the suite's time. What a fork does not give a rank: a
str-hash seed of its own (every rank has the zygote's), and an import of the preloaded libraries
under the launch's variables. So tests/helpers.py sends a launch to the zygote only when the
variables those libraries read at import (OMP_*, HF_*, ...) are the zygote's, and starts
`fork_ranks.py SPEC.json` under the launch's environment otherwise. A launch's own PYTHONPATH
is applied to sys.path as the interpreter would have. The project's own
modules are imported by each rank. The tests whose subject is the launcher run torchrun, each
rank an interpreter of its own (tests/helpers.run_ranks).
"""

import atexit
import gc
import importlib
import importlib.util
import json
import os
import runpy
import signal
import sys
import threading
import time
import traceback
import types

PRELOAD = (
    "torch", "torch.distributed.checkpoint", "torch.distributed.fsdp", "transformers", "transformers.modeling_utils",
    "transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2", "hydra", "omegaconf",
    "safetensors.torch", "pyarrow.parquet",
)
GRACE_S = 15.0


def preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    if importlib.util.find_spec("vllm") is not None:  # the engine's venv: every launch there starts an engine
        importlib.import_module("vllm")
    # Objects the forks inherit stay out of their collector's scans: a scan writes to each object's
    # header, which would copy every inherited page into each fork (copy-on-write).
    gc.freeze()


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
    """The forked ranks: reaped as they end; after the first failure, or a SIGTERM to this
    process, the rest get SIGTERM and, GRACE_S later, SIGKILL."""

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


def launch(spec: dict) -> None:
    """Fork the launch's ranks, wait for them, write the status file (last, by rename)."""
    ranks = Ranks()
    signal.signal(signal.SIGTERM, ranks.stop)
    for rank in spec["ranks"]:
        pid = os.fork()
        if pid == 0:
            run_rank(spec["module"], spec["args"], rank["env"], rank["cwd"])
        ranks.pids.append(pid)
    ranks.wait()
    status = {"returncodes": [ranks.codes[p] for p in ranks.pids], "in_order_ended": list(ranks.codes.values())}
    with open(spec["status"] + ".tmp", "w") as out:
        json.dump(status, out)
    os.rename(spec["status"] + ".tmp", spec["status"])


def use_pythonpath(zygote: str, launch: str) -> None:
    """sys.path as an interpreter started with the launch's PYTHONPATH has it: the launch's entries
    in place of the zygote's, after sys.path[0] (a test's worker modules under tests/distributed)."""
    def entries(value: str) -> list[str]:
        return [os.path.abspath(p) for p in value.split(os.pathsep) if p]

    rest = [p for p in sys.path[1:] if p not in entries(zygote)]
    sys.path[:] = [sys.path[0], *entries(launch), *rest]


def serve() -> None:
    preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the managers are reaped by the kernel
    for line in sys.stdin:
        spec = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the launch's manager
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # it waits for its ranks
                os.setpgid(0, 0)  # the launch is one process group: a stuck one is killed whole
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                for fd, path in ((1, spec["stdout"]), (2, spec["stderr"])):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
                use_pythonpath(os.environ.get("PYTHONPATH", ""), spec["env"].get("PYTHONPATH", ""))
                os.environ.clear()
                os.environ.update(spec["env"])
                launch(spec)
            except BaseException:  # noqa: BLE001 - the launch's stderr says why it has no status
                traceback.print_exc()
            finally:
                os._exit(0)
        print(pid, flush=True)


def main() -> None:
    if sys.argv[1] == "--serve":
        serve()
        return
    spec = json.loads(open(sys.argv[1]).read())
    preload()
    launch(spec)


if __name__ == "__main__":
    main()
