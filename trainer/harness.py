"""lm-evaluation-harness (EleutherAI's `lm-eval`, the `[eval]` extra) on rank 0's gathered copy.

The sample event calls `Harness.maybe_run(copy, step, stage)` on rank 0 after its samples; the
other ranks wait at the event's barrier as they do for the samples. The copy goes to the harness
as it is (`HFLM(pretrained=<model>, tokenizer=<tokenizer>)`), so nothing is loaded or fetched;
tasks come from the user's own YAML files (`eval.lm_eval.include_path`, local data files).
Results go to every tracker (`eval/<task>/<metric>`) and to `eval.jsonl` in the run directory.

Everything that can be wrong is checked before any model is built (`Harness.create`): lm-eval
missing, an include path or a task name that does not exist. A failure while running warns and
training goes on.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from config.schema import ConfigError, EvalConfig
from trainer.tracking import Tracking
from trainer.tracking.file import read_records

log = logging.getLogger(__name__)

EVAL_FILE = "eval.jsonl"


class Harness:
    def __init__(self, cfg: EvalConfig, task_manager: Any, run_dir: Path):
        self.cfg = cfg
        self.task_manager = task_manager
        self.path = Path(run_dir) / EVAL_FILE
        self.events = 0  # sample events seen by this process
        self.tracking: Optional[Tracking] = None
        self.tokenizer = None

    @classmethod
    def create(cls, cfg: EvalConfig, run_dir: Path) -> Optional["Harness"]:
        """None when no task is configured; a one-line ConfigError for anything missing."""
        lm = cfg.lm_eval
        if not lm.tasks:
            return None
        if importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("eval.lm_eval.tasks: lm-eval is not installed: pip install 'sample-aware-trainer[eval]' "
                              "(or pip install lm-eval)")
        from lm_eval.tasks import TaskManager

        include = lm.include_path if lm.include_path is None or isinstance(lm.include_path, str) else list(lm.include_path)
        manager = TaskManager(include_path=include, include_defaults=lm.include_defaults, verbosity="ERROR")
        known = set(manager.all_tasks)
        for i, task in enumerate(lm.tasks):
            if task not in known:
                where = f"in {include}" if include else "(no eval.lm_eval.include_path)"
                hint = "" if lm.include_defaults else "; built-in tasks need eval.lm_eval.include_defaults=true"
                raise ConfigError(f"eval.lm_eval.tasks[{i}]: unknown task {task!r} {where}{hint}")
        return cls(cfg, manager, run_dir)

    def attach(self, tracking: Tracking, tokenizer: Any, resume_step: int = 0) -> None:
        """Rank 0, after the resume: records after the resumed step are about to be made again."""
        kept = [r for r in read_records(self.path) if r.get("step", 0) <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self.tracking = tracking
        # The harness may set padding side or a pad token on its tokenizer: it gets its own.
        self.tokenizer = copy.deepcopy(tokenizer)

    def maybe_run(self, model: torch.nn.Module, step: int, stage: str) -> dict[str, float]:
        """Rank 0 only, on the gathered copy: the tasks at every N-th event; a failure warns."""
        self.events += 1
        if self.events % self.cfg.every_n_validations != 0:
            return {}
        try:
            return self._run(model, step, stage)
        except Exception as err:  # noqa: BLE001 - an optional part: training goes on
            log.warning("lm-eval failed at step %d: %s: %s", step, type(err).__name__, err)
            return {}

    def _run(self, model: torch.nn.Module, step: int, stage: str) -> dict[str, float]:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        lm = self.cfg.lm_eval
        start = time.perf_counter()
        was_training = model.training
        # The harness seeds and draws from the global generators; training's stream must not
        # depend on whether (and where) it ran.
        py_state, np_state = random.getstate(), np.random.get_state()
        # Its INFO lines and the warnings about a model passed as an object (what we mean to do)
        # would bury the run's own log; a failure still reaches ours (`maybe_run`).
        harness_log = logging.getLogger("lm_eval")
        level = harness_log.level
        harness_log.setLevel(logging.ERROR)
        with torch.random.fork_rng(devices=[]):
            try:
                results = lm_eval.simple_evaluate(
                    model=HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=lm.batch_size),
                    tasks=list(lm.tasks), task_manager=self.task_manager, num_fewshot=lm.num_fewshot,
                    limit=lm.limit, log_samples=False, bootstrap_iters=0,
                )
            finally:
                harness_log.setLevel(level)
                model.train(was_training)
                random.setstate(py_state)
                np.random.set_state(np_state)
        seconds = time.perf_counter() - start
        metrics, records = {}, []
        for task, values in (results or {}).get("results", {}).items():
            numbers = task_metrics(values)
            metrics.update({f"eval/{task}/{name}": v for name, v in numbers.items()})
            records.append({"kind": "eval", "step": step, "stage": stage, "task": task, "metrics": numbers,
                            "num_samples": (results.get("n-samples", {}).get(task) or {}).get("effective"),
                            "time": time.time()})
        metrics["eval/time_s"] = seconds
        self._append(records)
        if self.tracking is not None:
            self.tracking.log_metrics(metrics, step)
        log.info("lm-eval at step %d (%.1fs): %s", step, seconds,
                 ", ".join(f"{k[5:]}={v:.4f}" for k, v in metrics.items() if k != "eval/time_s"))
        return metrics

    def _append(self, records: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in records))
            handle.flush()
            os.fsync(handle.fileno())


def task_metrics(values: dict[str, Any]) -> dict[str, float]:
    """lm-eval's `{"acc,none": 0.5, "acc_stderr,none": ..., "alias": ...}` as `{"acc": 0.5}`;
    a filter other than `none` stays in the name (`exact_match/strict-match`)."""
    out = {}
    for key, value in values.items():
        if "," not in key or "_stderr" in key:
            continue
        metric, _, filter_name = key.partition(",")
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[metric if filter_name == "none" else f"{metric}/{filter_name}"] = number
    return out
