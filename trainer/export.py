"""A checkpoint as a Hugging Face model directory, offline: one process, no process group, no GPU.

    python -m trainer.export CHECKPOINT_DIR OUT_DIR [--dtype fp32|bf16|fp16] [--model-config DIR] [--merge] [--force]

CHECKPOINT_DIR is a `global_step_N/` directory, or a run directory (its latest checkpoint is
used, and named). The model part of the sharded checkpoint is read (for PPO: the actor, not the
critic), put into a model built from the checkpoint's `huggingface/` folder, and saved as
safetensors with config, tokenizer and generation config; what verl's model merger
(`verl.model_merger`, formerly `scripts/legacy_model_merger.py`) does for verl checkpoints.
Checkpoints from before `huggingface/` was written need `--model-config DIR`: a directory with
the model's config.json and tokenizer, e.g. the run's `model.partial_pretrain`.

OUT_DIR is refused when it is, contains or sits inside the checkpoint (or the run directory
given), even with `--force`. Reading a checkpoint unpickles its `.metadata` (DCP does): the
command says so each time; export only checkpoints you trust.

A LoRA run's checkpoint (its `huggingface/` has adapter_config.json) gives the adapter
(adapter_config.json, adapter_model.safetensors: `PeftModel.from_pretrained(base, OUT_DIR)`), or
with `--merge` the base with the adapter merged in, a plain model for `from_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from transformers.utils import logging as transformers_logging

from trainer.checkpoint import (
    HF_DIR,
    STATE_FILE,
    CheckpointError,
    HFAssets,
    declared_dtype,
    is_checkpoint,
    latest_checkpoint,
    load_model_state,
    write_hf_model,
)
from workers.lora import ADAPTER_CONFIG, adapter_spec_of
from workers.model import DTYPES, ModelLoadError, load_config, load_tokenizer


def find_checkpoint(path: Path) -> tuple[Path, bool]:
    """The checkpoint to export, and whether it was picked as the latest of a run directory."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.name.endswith(".tmp"):
        raise CheckpointError(f"{path} is a checkpoint still being written (or left by a crash): never read")
    if is_checkpoint(path):
        return path, False
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise CheckpointError(f"{path} is neither a checkpoint (no {STATE_FILE}) nor a run directory holding one")
    return latest, True


def model_source(checkpoint: Path, model_config: Optional[Path]) -> tuple[Path, str]:
    """Where config, tokenizer and generation config come from, and the name errors give it."""
    if model_config is not None:
        return model_config, "--model-config"
    if not (checkpoint / HF_DIR).is_dir():
        raise CheckpointError(
            f"{checkpoint} has no {HF_DIR}/ folder (written since checkpoints carry one): pass --model-config DIR, "
            "a directory with the model's config.json and tokenizer, e.g. the run's model.partial_pretrain"
        )
    return checkpoint / HF_DIR, "checkpoint"


def check_out_dir(out: Path, force: bool, inputs: Sequence[Path] = ()) -> None:
    """OUT_DIR is replaced as a whole (with --force): it must not be, hold or sit inside any of
    `inputs` (what was asked for, the checkpoint, the config source), whatever --force says."""
    target = out.resolve()
    for given in inputs:
        source = given.resolve()
        if target == source or target in source.parents:
            raise CheckpointError(f"{out} is or contains the input {given}: replacing it would delete what is exported; "
                                  "choose another OUT_DIR")
    for given in inputs:
        source = given.resolve()
        if source.is_dir() and source in target.parents and (is_checkpoint(source) or source.name == HF_DIR):
            raise CheckpointError(f"{out} is inside the checkpoint {given}: choose an OUT_DIR outside it")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CheckpointError(f"{out} exists and is not empty (pass --force to replace it)")


def export(checkpoint: Path, out: Path, dtype_name: Optional[str] = None, model_config: Optional[Path] = None,
           force: bool = False, merge: bool = False) -> Path:
    given = checkpoint
    checkpoint, picked = find_checkpoint(checkpoint)
    if picked:
        print(f"using the latest checkpoint of the run: {checkpoint}")
    source, key = model_source(checkpoint, model_config)
    check_out_dir(out, force, [given, checkpoint, source])
    # What the trainer says for a checkpoint from outside its run directory: here every input is one.
    print(f"note: reading {checkpoint / '.metadata'} unpickles it (torch.distributed.checkpoint): "
          "export only checkpoints you trust", file=sys.stderr)
    lora = adapter_spec_of(checkpoint / HF_DIR)
    if merge and lora is None:
        raise CheckpointError(f"--merge: {checkpoint} holds no LoRA adapter (no {HF_DIR}/{ADAPTER_CONFIG}); it is a whole model already")
    base = json.loads((checkpoint / HF_DIR / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") if lora else None
    assets = HFAssets(load_config(str(source), key=key), load_tokenizer(str(source), key=key), str(source), lora=lora,
                      base_model=base)
    dtype = DTYPES[dtype_name] if dtype_name else declared_dtype(assets.model_config)
    write_hf_model(load_model_state(checkpoint), assets, out, dtype, merge=merge)
    dtype_name = str(dtype).removeprefix("torch.")
    what = dtype_name if lora is None else (f"the base with the LoRA adapter merged in, {dtype_name}" if merge else "the LoRA adapter, float32")
    print(f"exported {checkpoint} to {out} ({what})")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", type=Path, help="a global_step_N directory, or a run directory (its latest checkpoint)")
    parser.add_argument("out", metavar="OUT_DIR", type=Path, help="the Hugging Face model directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: the one the model config declares)")
    parser.add_argument("--model-config", metavar="DIR", type=Path, help="config and tokenizer directory for checkpoints without huggingface/")
    parser.add_argument("--merge", action="store_true", help="LoRA checkpoints: write the base with the adapter merged in")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    args = parser.parse_args(argv)
    transformers_logging.disable_progress_bar()
    try:
        export(args.checkpoint, args.out, args.dtype, args.model_config, args.force, args.merge)
    except (CheckpointError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
