"""Run under torchrun with 2 processes by test_sequence_parallel.py: the SFT trainer with
`ulysses_sequence_parallel_size=2` against the same global batch on one plain model (N=1).

For single-turn and multi-turn data with token-budget (dynamic) micro-batches, padded and
packed rows (block-diagonal mask): the trainer's loss and its gathered gradients, and the
validation loss. (verl's SP scripts train whole runs: test_verl_scripts.py.) Rank 0
writes what it measured as JSON; the test asserts.

    torchrun --nproc_per_node=2 -m sp_worker MODEL SINGLE_TRAIN SINGLE_VAL MULTI_TRAIN OUT_JSON
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from transformers import AutoModelForCausalLM

import trainer.fsdp_sft_trainer as sft
from config import env as env_config
from config.loading import resolve
from config.schema import SFTConfig
from trainer.data import collate
from trainer.distributed import init_distributed, teardown
from workers.packing import Layout


def make_trainer(ctx, overrides):
    with initialize_config_module(config_module="config", version_base="1.3"):
        cfg = compose("sft_trainer", overrides=overrides)
    return sft.FSDPSFTTrainer(resolve(cfg, SFTConfig, overrides, {}, 2).config, ctx)


def reference(model_dir, micro_batches, val_examples, pad_id):
    """N=1: one plain model, the whole global batch, the plain padded path."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokens = sum(mb.num_loss_tokens for mb in micro_batches)
    loss = sum(sft.token_loss_sum(model, mb) for mb in micro_batches) / tokens
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    with torch.no_grad():
        val = collate(val_examples, pad_id) if val_examples else None
        val_loss = (sft.token_loss_sum(model, val) / val.num_loss_tokens).item() if val is not None else None
    return loss.item(), grads, val_loss


def main(model_dir, single_train, single_val, multi_train, out):
    ctx = init_distributed(env_config.dist_env(), "cpu")
    common = [f"model.partial_pretrain={model_dir}", "trainer.logger=[file]", "trainer.max_val_samples=0",
              "trainer.export_hf_model=false", "trainer.resume_mode=disable", "data.max_length=48", "data.train_batch_size=8", "optim.lr=1e-3",
              # token-budget micro-batches: several per step, of different widths
              "data.use_dynamic_bsz=true", "data.max_token_len_per_gpu=48",
              "ulysses_sequence_parallel_size=2", "use_remove_padding=true"]
    runs = {
        "single": [f"data.train_files={single_train}", f"data.val_files={single_val}", "data.prompt_key=prompt",
                   "data.response_key=response"],
        "multi": [f"data.train_files={multi_train}", "data.val_files=null", "data.multiturn.enable=true"],
    }
    report = {}
    for name, data in runs.items():
        trainer = make_trainer(ctx, [*common, *data, f"trainer.default_local_dir={Path(out).parent / name}"])
        micro_batches = trainer.batches.micro_batches(0, 0)
        ref_loss, ref_grads, ref_val = reference(model_dir, micro_batches, trainer.val_examples, trainer.tokenizer.pad_token_id)
        row = {"micro_batches": len(micro_batches), "widths": [mb.input_ids.shape[1] for mb in micro_batches],
               "dp_size": trainer.sp.dp_size, "sp_size": trainer.sp.size, "ref_loss": ref_loss,
               "packed_default": trainer.feed.layout.packed}
        for layout_name, layout in (("padded", Layout()), ("packed", Layout(packed=True))):
            trainer.feed = dataclasses.replace(trainer.feed, layout=layout)
            trainer.model.train()
            loss, _, _ = trainer.accumulate_gradients(micro_batches)
            grads = {n: p.grad.full_tensor() for n, p in trainer.model.named_parameters()}  # collective
            trainer.optimizer.zero_grad(set_to_none=True)
            row[layout_name] = {
                "loss": loss.item(),
                "max_grad_diff": max((grads[n] - g).abs().max().item() for n, g in ref_grads.items()),
                "max_grad": max(g.abs().max().item() for g in ref_grads.values()),
                "grads_compared": len(set(grads) & set(ref_grads)),
            }
        row["params"] = len(ref_grads)
        if ref_val is not None:
            row["val_loss"], row["ref_val_loss"] = trainer.validation_loss(), ref_val
        report[name] = row
    if ctx.rank == 0:
        Path(out).write_text(json.dumps(report, indent=1))
    teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
