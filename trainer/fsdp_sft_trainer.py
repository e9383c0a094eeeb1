"""Supervised fine-tuning of a Hugging Face causal LM with FSDP2.

    python -m trainer.fsdp_sft_trainer [--config-name NAME] [key=value ...]
    torchrun --nproc_per_node=N -m trainer.fsdp_sft_trainer [...]

With no arguments it trains the bundled offline demo. During each validation, rank 0 generates
samples from a gathered full copy of the model and logs them to the console and the trackers.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from config import env as env_config
from config.loading import Resolved, resolve
from config.schema import SFTConfig
from trainer.data import IGNORE, MicroBatch, SFTBatches, load_sft_examples, validation_micro_batches
from trainer.distributed import DistContext, all_reduce_sum
from trainer.faults import same_inputs_on_every_rank
from trainer.optim import build_optimizer, build_scheduler
from trainer.resume_guard import essential_config
from trainer.run import Run, SampleEventSpec, Samples, entry_point
from trainer.sample_prompts import SamplePrompt, SamplingPlan, encode_file_prompts, generate_samples, read_prompts_file
from trainer.token_cache import rows_fingerprint
from workers import liger, sequence_parallel
from workers.fsdp import (
    ShardingSpec,
    build_sharded_model,
    compile_layers,
    full_grad_norm,
    param_count,
    sharding_spec,
)
from workers.generation import GenerationSettings
from workers.liger import liger_token_loss_sum
from workers.lora import LoraSpec, check_fits, trainable_summary_line
from workers.model import import_external_lib, lm_head_rows, load_config, load_stop_ids, load_tokenizer
from workers.packing import Layout, choose_layout, model_inputs
from workers.sequence_parallel import SequenceParallel

log = logging.getLogger("trainer.sft")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass(frozen=True)
class ModelFeed:
    """How micro-batches enter the model: layout (padded or packed), this rank's part of each
    sequence (Ulysses), and which loss runs (the LM head on targets, or liger's fused one)."""

    pad_id: int = 0
    layout: Layout = Layout()
    sp: Optional[SequenceParallel] = None
    liger: bool = False

    @property
    def counts_tokens(self) -> bool:
        return self.sp is None or self.sp.counts_tokens


def token_loss_sum(model: torch.nn.Module, batch: MicroBatch, feed: ModelFeed = ModelFeed()) -> torch.Tensor:
    """Summed cross-entropy over this rank's target tokens of the batch (labels shifted by one)."""
    inputs, targets = model_inputs(batch.input_ids, batch.attention_mask, batch.labels, feed.pad_id, feed.layout, feed.sp)
    if feed.liger:  # its fused linear cross-entropy, never together with lm_head_rows
        return liger_token_loss_sum(model, inputs, targets)
    keep = targets != IGNORE
    with lm_head_rows(model, keep) as only_targets:
        logits = model(**inputs, use_cache=False).logits
    if only_targets and logits.dim() == 2:
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")


class FSDPSFTTrainer:
    """setup (in __init__) → fit() → finish(). The run's services, position and sample event are
    `self.run`'s (trainer/run.py); what is SFT's own is here: data, loss, validation."""

    def __init__(self, cfg: SFTConfig, dist_ctx: DistContext):
        self.cfg = cfg
        self.dist = dist_ctx
        self.device = dist_ctx.device
        self.run = Run(cfg.trainer, cfg.samples, cfg.model, dist_ctx, essential_config(cfg), cfg.eval)

        # Cheap things that can be wrong come first: trackers (in Run), tokenizer, data. Then the model.
        liger.check(cfg.model.use_liger, self.device)
        import_external_lib(cfg.model.external_lib)
        self.tokenizer = load_tokenizer(cfg.model.partial_pretrain, cfg.model.trust_remote_code, cfg.data.chat_template)
        self.stop_ids = load_stop_ids(cfg.model.partial_pretrain, self.tokenizer)
        self.model_config = load_config(cfg.model.partial_pretrain, cfg.model.trust_remote_code)
        sp_size = cfg.model.ulysses_sequence_parallel_size
        sequence_parallel.check_model(sp_size, self.model_config, cfg.model.attn_implementation)
        self.sp = sequence_parallel.setup(sp_size, self.device)  # collective: the (dp, sp) mesh
        self.feed = ModelFeed(self.tokenizer.pad_token_id, self._layout(), self.sp, cfg.model.use_liger)
        d = cfg.data
        file_rows = read_prompts_file(cfg.samples.prompts_file) if cfg.samples.prompts_file else None
        # Tokenized once into the token cache (local rank 0 of each node writes), then memory-mapped.
        cache_dir, ranks = self.run.token_cache(d.cache_dir)
        train = load_sft_examples(d.train_files, "data.train_files", self.tokenizer, d, d.train_max_samples, cache_dir, ranks)
        self.val_examples = (
            load_sft_examples(d.val_files, "data.val_files", self.tokenizer, d, d.val_max_samples, cache_dir, ranks)
            if d.val_files else []
        )
        same_inputs_on_every_rank({"data.train_files": rows_fingerprint(train),
                                   "data.val_files": rows_fingerprint(self.val_examples)}, self.model_config, self.stop_ids)
        # The ranks of a sequence-parallel group hold the same micro-batches.
        self.batches = SFTBatches(train, cfg.data, cfg.trainer.seed, self.sp.dp_rank, self.sp.dp_size, self.tokenizer.pad_token_id)
        # total_training_steps is an early exit (as in verl): the schedule still spans every epoch.
        self.schedule_steps = self.batches.steps_per_epoch * cfg.trainer.total_epochs
        total_steps = min(self.schedule_steps, cfg.trainer.total_training_steps or self.schedule_steps)

        torch.manual_seed(cfg.trainer.seed)
        self.lora = LoraSpec.from_model_config(cfg.model)
        if self.lora is not None:
            check_fits(self.lora, self.model_config, cfg.model.trust_remote_code)
        spec = sharding_spec(cfg.model.fsdp_config, self.device)
        self.param_dtype = spec.param_dtype
        self.model = self._build_model(spec)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.schedule_steps)
        if self.lora is not None and dist_ctx.is_primary:
            log.info("LoRA (%s): %s", self.lora.describe(), trainable_summary_line(self.model, self.optimizer))

        self.run.attach(self.model_config, self.tokenizer, self.lora, total_steps,
                        lambda: (self.model, self.optimizer, self.scheduler, {}),
                        cfg.generation.gather_dtype, cfg.generation.gather_device, self.param_dtype,
                        cfg.generation.max_print_chars)
        self.sample_prompts = (encode_file_prompts(file_rows, self.tokenizer) if file_rows is not None
                               else self._first_validation_prompts())
        self._last_validated: tuple[int, int] = (-1, -1)

    # ------------------------------------------------------------------ setup
    def _layout(self) -> Layout:
        cfg = self.cfg.model
        layout = choose_layout(cfg.use_remove_padding, cfg.attn_implementation, cfg.ulysses_sequence_parallel_size)
        if cfg.use_remove_padding and not layout.packed and self.dist.is_primary:
            log.info("model.use_remove_padding=true: attn_implementation=%s has no varlen kernel (flash-attention "
                     "varlen needs flash_attention_2 on CUDA); this run uses length-grouped token-budget batches "
                     "instead", cfg.attn_implementation)
        return layout

    def _build_model(self, spec: ShardingSpec) -> torch.nn.Module:
        cfg = self.cfg.model
        model = build_sharded_model(
            cfg.partial_pretrain, self.model_config, spec, self.device, self.dist.world_size,
            cfg.trust_remote_code, cfg.attn_implementation, cfg.enable_gradient_checkpointing, lora=self.lora,
            before_sharding=liger.apply if cfg.use_liger else None,
        )
        sequence_parallel.enable(model, self.sp)
        if cfg.compile:
            compile_layers(model)
        log.info("model: %s, %.2fM parameters, sharded over %d rank(s), %s weights, compute %s%s", type(model).__name__,
                 param_count(model) / 1e6, self.dist.world_size, spec.master_dtype if self.lora is None else "fp32 adapter",
                 self.param_dtype,
                 f", sequences split over {self.sp.size} ranks (Ulysses), data-parallel {self.sp.dp_size}"
                 if self.sp.size > 1 else "")
        return model

    def _first_validation_prompts(self) -> list[SamplePrompt]:
        """The first validation examples with distinct prompts, the same ones at every validation
        (like with like). A repeated prompt would get the same seed, so the same sample again."""
        n = self.cfg.trainer.max_val_samples
        if n == 0 or not self.val_examples:
            return []
        distinct = {}
        for e in self.val_examples:
            distinct.setdefault(tuple(e.prompt_ids), e)
            if len(distinct) == n:
                break
        return [SamplePrompt(e.prompt_text, tuple(e.prompt_ids), e.reference) for e in distinct.values()]

    # ------------------------------------------------------------------ loop
    def fit(self) -> None:
        run = self.run
        run.begin(self.cfg, "train")
        while not run.done:
            self.batches.seed = run.data_seed(self.cfg.trainer.seed)  # moved by a rollback that reshuffles
            metrics = self.train_step(self.batches.micro_batches(run.position.epoch, run.position.batch_in_epoch))
            epoch_end = run.advance(self.batches.steps_per_epoch)
            run.log_step(metrics, bar={"loss": "train/loss"})
            if (self.val_examples or self.sample_prompts) and run.due(self.cfg.trainer.test_freq, epoch_end):
                self.validate()
            run.end_step(self.save_checkpoint)
        run.end_loop()
        self.finish()

    def train_step(self, micro_batches: list[MicroBatch]) -> dict[str, Any]:
        start = time.perf_counter()
        position = self.run.position
        self.model.train()
        loss_total, real_tokens, padded_tokens = self.accumulate_gradients(micro_batches)
        grad_norm = full_grad_norm(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad))
        # Both are global (a sum and a norm over all ranks): a NaN on one rank skips the step on every rank.
        if torch.isfinite(grad_norm) and torch.isfinite(loss_total):
            self.optimizer.step()
            self.scheduler.step()
        else:
            position.skipped_steps += 1
            log.warning("step %d: non-finite %s on some rank; update skipped on every rank (%d so far)", position.global_step + 1,
                        "loss" if not torch.isfinite(loss_total) else "gradient norm", position.skipped_steps)
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "train/loss": loss_total,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/grad_norm": grad_norm,
            "train/tokens_per_second": real_tokens / (time.perf_counter() - start),
            "train/padding_fraction": 1.0 - real_tokens / padded_tokens.clamp(min=1.0),
            "train/peak_memory_mb": peak_memory_mb(self.device),
            "train/skipped_steps": position.skipped_steps,
            "train/epoch": position.epoch,
        }

    def accumulate_gradients(self, micro_batches: list[MicroBatch]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward and backward of this rank's micro-batches; returns the global batch's mean loss
        and its real and padded token counts (all ranks)."""
        # The ranks of a sequence-parallel group share their micro-batches: one of them counts.
        local = torch.tensor(
            [sum(mb.num_loss_tokens for mb in micro_batches), sum(mb.num_real_tokens for mb in micro_batches),
             sum(mb.num_padded_tokens for mb in micro_batches)],
            dtype=torch.float64, device=self.device,
        ) * self.feed.counts_tokens
        # One collective: every rank divides by the same global token count, so the loss (and
        # gradient) of a global batch does not depend on how it is split over ranks and micro-batches.
        # The counts stay on the device: no host synchronisation until metrics are logged.
        loss_tokens, real_tokens, padded_tokens = all_reduce_sum(local)
        loss_tokens = loss_tokens.clamp(min=1.0).float()
        loss_total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            loss = token_loss_sum(self.model, mb.to(self.device), self.feed) / loss_tokens
            # FSDP averages gradients over all ranks; the loss is already a global mean (with
            # sequence parallelism, each rank's share of it: their gradients add up).
            (loss * self.dist.world_size).backward()
            loss_total += loss.detach()
        return all_reduce_sum(loss_total), real_tokens, padded_tokens

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict[str, float]:
        step = (self.run.control.rollbacks, self.run.step)  # after a rollback, a step number comes again
        if self._last_validated == step:
            return {}
        self._last_validated = step
        metrics = {"val/loss": self.validation_loss()} if self.val_examples else {}
        self.run.log_validation(metrics)
        if self.sample_prompts:
            self.run.sample_event(self.model, self.generate_validation_samples,
                                  SampleEventSpec("validation", "val", "validation", "validation sample generation"))
        return metrics

    @torch.no_grad()
    def validation_loss(self) -> float:
        self.model.eval()
        batches = validation_micro_batches(
            self.val_examples, self.cfg.data.micro_batch_size_per_gpu, self.sp.dp_rank, self.sp.dp_size, self.tokenizer.pad_token_id
        )
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for mb in batches:
            totals[0] += token_loss_sum(self.model, mb.to(self.device), self.feed).double()
            totals[1] += mb.num_loss_tokens * self.feed.counts_tokens
        all_reduce_sum(totals)
        self.model.train()
        return (totals[0] / totals[1].clamp(min=1)).item()

    def generation_settings(self) -> GenerationSettings:
        g = self.cfg.generation
        return GenerationSettings(g.max_new_tokens, g.do_sample, g.temperature, g.top_k, g.top_p)

    def generate_validation_samples(self, model: torch.nn.Module) -> Samples:
        """Rank 0, on its gathered copy: k answers per sample prompt (and maybe a greedy one),
        one `generate` call per distinct setting and micro-batch."""
        g = self.cfg.generation
        return generate_samples(model, self.tokenizer, self.sample_prompts, self.generation_settings(),
                                SamplingPlan(g.num_samples_per_prompt, g.also_greedy), self.cfg.trainer.seed,
                                self.stop_ids, self.cfg.data.micro_batch_size_per_gpu)

    # ------------------------------------------------------------------ checkpoints and the end
    def save_checkpoint(self) -> Path:
        return self.run.save(self.model, self.optimizer, self.scheduler)

    def finish(self) -> None:
        self.run.finish(self.model)


# ---------------------------------------------------------------------- entry point
def resolve_sft(cfg: DictConfig, cli_overrides: Sequence[str], world_size: int) -> Resolved:
    return resolve(cfg, SFTConfig, cli_overrides, env_config.environ(), world_size)


main = entry_point("sft_trainer", resolve_sft, FSDPSFTTrainer)

if __name__ == "__main__":
    main()
