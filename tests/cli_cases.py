"""Run one CLI entry point for many argument sets, importing it once.

    python tests/cli_cases.py MODULE < cases.json > results.json

cases: [{"args": [...], "env": {...}, "cwd": "..."}] (env and cwd optional); results: [{"returncode": int, "stdout": str, "stderr": str}].
Each case runs in a fork of this process after the module is imported (torch, transformers and
Hydra: the seconds a CLI run spends before it reads its arguments), with its own stdout and
stderr; `main()` then runs exactly as under `python -m MODULE ARGS`.
"""

import importlib
import json
import os
import sys
import tempfile
import traceback


def run_case(module, case: dict) -> dict:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: one CLI run
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            os.environ.update(case.get("env", {}))
            os.chdir(case.get("cwd") or os.getcwd())
            sys.argv = [module.__file__, *case["args"]]
            code = 0
            try:
                returned = module.main()  # `sys.exit(main())` under `python -m`: an int is the exit code
                code = returned if isinstance(returned, int) else 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except BaseException:  # noqa: BLE001 - reported as the CLI would
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        texts = []
        for handle in (out, err):
            handle.seek(0)
            texts.append(handle.read().decode("utf-8", "replace"))
        return {"returncode": os.waitstatus_to_exitcode(status), "stdout": texts[0], "stderr": texts[1]}


def main() -> None:
    module = importlib.import_module(sys.argv[1])
    cases = json.load(sys.stdin)
    results = [run_case(module, case) for case in cases]
    sys.__stdout__.write(json.dumps(results))


if __name__ == "__main__":
    main()
