"""Supervised fine-tuning of a Hugging Face causal LM with FSDP2.

    python -m trainer.fsdp_sft_trainer [--config-name NAME] [key=value ...]
    torchrun --nproc_per_node=N -m trainer.fsdp_sft_trainer [...]

With no arguments it trains the bundled offline demo. During each validation, rank 0 generates
samples from a gathered full copy of the model and logs them to the console and the trackers.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import hydra
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from config import env as env_config
from config.loading import redact, resolve, to_dict
from config.schema import SFTConfig
from trainer.checkpoint import Checkpointer, HFAssets
from trainer.cli import (
    announce_config, exit_now, finish_run, normalize_config_path, preempted_exit, setup_logging, user_errors_exit,
)
from trainer.data import IGNORE, MicroBatch, SFTBatches, collate, load_sft_examples, validation_micro_batches
from trainer.distributed import DistContext, all_reduce_sum, init_distributed, teardown
from trainer.faults import PreemptionWatch, check_shared_run_dir
from trainer.history import SampleHistory
from trainer.report import LiveReport
from trainer.optim import build_optimizer, build_scheduler
from trainer.progress import progress
from trainer.samples import SampleLogger, prompt_id, sample_seed
from trainer.token_cache import Ranks
from trainer.tracking import TrackerContext, Tracking, check_available
from workers import liger, sequence_parallel
from workers.fsdp import (
    ShardingSpec,
    build_sharded_model,
    compile_layers,
    full_grad_norm,
    param_count,
    resolve_dtypes,
)
from workers.generation import Generated, GenerationSettings, generate
from workers.liger import liger_token_loss_sum
from workers.lora import LoraSpec, check_fits, trainable_summary_line
from workers.model import import_external_lib, lm_head_rows, load_config, load_stop_ids, load_tokenizer
from workers.packing import Layout, choose_layout, model_inputs
from workers.sequence_parallel import SequenceParallel
from workers.replica import ModelReplica

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
    """setup (in __init__) → fit() → finish(). Each periodic action decides itself whether this
    step is its step, so the loop in `fit` stays short."""

    def __init__(self, cfg: SFTConfig, dist_ctx: DistContext, from_env: Optional[dict[str, str]] = None):
        self.cfg = cfg
        self.dist = dist_ctx
        self.device = dist_ctx.device
        self.run_dir = Path(cfg.trainer.default_local_dir)
        self.from_env = from_env or {}
        check_shared_run_dir(self.run_dir)  # before anything is loaded: every rank, within seconds
        self.preemption = PreemptionWatch()

        # Cheap things that can be wrong come first: trackers, tokenizer, data. Then the model.
        check_available(cfg.trainer.logger)
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
        # Tokenized once into the token cache (local rank 0 of each node writes), then memory-mapped.
        cache_dir = d.cache_dir or env_config.token_cache_dir(env_config.environ())
        ranks = Ranks(dist_ctx.rank, dist_ctx.local_rank, dist_ctx.world_size)
        train = load_sft_examples(d.train_files, "data.train_files", self.tokenizer, d, d.train_max_samples, cache_dir, ranks)
        self.val_examples = (
            load_sft_examples(d.val_files, "data.val_files", self.tokenizer, d, d.val_max_samples, cache_dir, ranks)
            if d.val_files else []
        )
        # The ranks of a sequence-parallel group hold the same micro-batches.
        self.batches = SFTBatches(train, cfg.data, cfg.trainer.seed, self.sp.dp_rank, self.sp.dp_size, self.tokenizer.pad_token_id)
        # total_training_steps is an early exit (as in verl): the schedule still spans every epoch.
        self.schedule_steps = self.batches.steps_per_epoch * cfg.trainer.total_epochs
        self.total_steps = min(self.schedule_steps, cfg.trainer.total_training_steps or self.schedule_steps)

        torch.manual_seed(cfg.trainer.seed)
        self.lora = LoraSpec.from_model_config(cfg.model)
        if self.lora is not None:
            check_fits(self.lora, self.model_config, cfg.model.trust_remote_code)
        self.param_dtype, reduce_dtype = resolve_dtypes(cfg.model.fsdp_config.param_dtype, cfg.model.fsdp_config.reduce_dtype, self.device)
        self.model = self._build_model(ShardingSpec(
            self.param_dtype, reduce_dtype, cfg.model.fsdp_config.cpu_offload, cfg.model.fsdp_config.reshard_after_forward,
            cfg.model.fsdp_config.fsdp_size,
        ))
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.schedule_steps)
        if self.lora is not None and dist_ctx.is_primary:
            log.info("LoRA (%s): %s", self.lora.describe(), trainable_summary_line(self.model, self.optimizer))

        self.checkpointer = Checkpointer(
            self.run_dir, cfg.trainer.save_freq, cfg.trainer.max_ckpt_to_keep, dist_ctx.rank, dist_ctx.world_size, cfg.trainer.checkpoint,
            HFAssets(self.model_config, self.tokenizer, cfg.model.partial_pretrain, cfg.model.trust_remote_code,
                     cfg.model.attn_implementation, self.lora),
        )
        self.step, self.epoch, self.batch_in_epoch, self.skipped_steps = 0, 0, 0, 0
        self.checkpointer.clean_partial()
        self._resume()

        self.tracking = Tracking(
            # metrics.jsonl ("file") is the run's own record, which the report reads: always on.
            [*cfg.trainer.logger, "file"],
            TrackerContext(self.run_dir, cfg.trainer.project_name, cfg.trainer.experiment_name, env_config.tracker_env()),
            is_primary=dist_ctx.is_primary,
        )
        history = SampleHistory(self.run_dir, cfg.samples.alerts, resume_step=self.step) if cfg.samples.history and dist_ctx.is_primary else None
        report = LiveReport(self.run_dir, self.total_steps, self.tracking) if cfg.samples.report and dist_ctx.is_primary else None
        self.sample_logger = SampleLogger(self.tracking, history, report, cfg.generation.max_print_chars)
        self.replica = ModelReplica(
            self.model_config, cfg.generation.gather_dtype, cfg.generation.gather_device, self.device, self.param_dtype,
            cfg.model.attn_implementation, cfg.model.trust_remote_code, self.lora,
        )
        self.sample_batches = self._sample_batches()
        self._last_validated = -1

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
        log.info("model: %s, %.2fM parameters, sharded over %d rank(s), compute %s%s", type(model).__name__,
                 param_count(model) / 1e6, self.dist.world_size, self.param_dtype,
                 f", sequences split over {self.sp.size} ranks (Ulysses), data-parallel {self.sp.dp_size}"
                 if self.sp.size > 1 else "")
        return model

    def _resume(self) -> None:
        path = self.checkpointer.agree_on_resume(self.cfg.trainer.resume_mode, self.cfg.trainer.resume_from_path)
        if path is None:
            return
        state = self.checkpointer.load(path, self.model, self.optimizer, self.scheduler)
        self.step, self.epoch, self.batch_in_epoch = state["global_step"], state["epoch"], state["batch_in_epoch"]
        self.skipped_steps = state.get("skipped_steps", 0)
        log.info("resumed from %s: step %d, epoch %d, batch %d", path, self.step, self.epoch, self.batch_in_epoch)

    def _sample_batches(self) -> list[MicroBatch]:
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
        chosen = list(distinct.values())
        size = self.cfg.data.micro_batch_size_per_gpu
        return [collate(chosen[i : i + size], self.tokenizer.pad_token_id) for i in range(0, len(chosen), size)]

    # ------------------------------------------------------------------ loop
    def fit(self) -> None:
        if self.dist.is_primary:
            self.tracking.log_config(redact(to_dict(self.cfg)))
        steps_per_epoch = self.batches.steps_per_epoch
        bar = progress(self.total_steps, self.step, "train", enabled=self.dist.is_primary)
        while self.step < self.total_steps:
            metrics = self.train_step(self.batches.micro_batches(self.epoch, self.batch_in_epoch))
            self.step += 1
            epoch_end = self.batch_in_epoch + 1 == steps_per_epoch
            self.epoch, self.batch_in_epoch = (self.epoch + 1, 0) if epoch_end else (self.epoch, self.batch_in_epoch + 1)
            last = self.step == self.total_steps
            bar.update(1)
            if self.step % self.cfg.trainer.log_freq == 0 or last:
                metrics = {k: float(v) for k, v in metrics.items()}
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
                self.tracking.log_metrics(metrics, self.step)
            if self.should_validate(epoch_end, last):
                self.validate()
            if self.checkpointer.should_save(self.step, last):
                self.save_checkpoint()
            if not last and self.preemption.requested():
                bar.close()
                self.preemption.checkpoint_and_stop(self.step, self.checkpointer, self.save_checkpoint, self.tracking)
        bar.close()
        self.finish()

    def train_step(self, micro_batches: list[MicroBatch]) -> dict[str, Any]:
        start = time.perf_counter()
        self.model.train()
        loss_total, real_tokens, padded_tokens = self.accumulate_gradients(micro_batches)
        grad_norm = full_grad_norm(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad))
        # Both are global (a sum and a norm over all ranks): a NaN on one rank skips the step on every rank.
        if torch.isfinite(grad_norm) and torch.isfinite(loss_total):
            self.optimizer.step()
            self.scheduler.step()
        else:
            self.skipped_steps += 1
            log.warning("step %d: non-finite %s on some rank; update skipped on every rank (%d so far)", self.step + 1,
                        "loss" if not torch.isfinite(loss_total) else "gradient norm", self.skipped_steps)
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "train/loss": loss_total,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/grad_norm": grad_norm,
            "train/tokens_per_second": real_tokens / (time.perf_counter() - start),
            "train/padding_fraction": 1.0 - real_tokens / padded_tokens.clamp(min=1.0),
            "train/peak_memory_mb": peak_memory_mb(self.device),
            "train/skipped_steps": self.skipped_steps,
            "train/epoch": self.epoch,
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
    def should_validate(self, epoch_end: bool, last: bool) -> bool:
        if not self.val_examples:
            return False
        freq = self.cfg.trainer.test_freq
        return epoch_end or last or (freq > 0 and self.step % freq == 0)

    def validate(self) -> dict[str, float]:
        if self._last_validated == self.step:
            return {}
        self._last_validated = self.step
        metrics = {"val/loss": self.validation_loss()}
        self.tracking.log_metrics(metrics, self.step)
        if self.sample_batches:
            self.log_validation_samples()
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

    def generate_samples(self, batch: MicroBatch, model: Optional[torch.nn.Module] = None) -> dict[str, list]:
        """Generate from the prompt part of each example (never its reference response).

        Runs on the primary rank with the gathered full model (`model`, refreshed by the caller);
        one batched `generate` call per validation batch.
        """
        model = model if model is not None else self.replica.model
        prompt_ids = [e.prompt_ids for e in batch.examples]
        seeds = [sample_seed(self.cfg.trainer.seed, prompt_id(p)) for p in prompt_ids]
        generated = generate(model, self.tokenizer, prompt_ids, self.generation_settings(), seeds, stop_ids=self.stop_ids)
        return {
            "prompts": [e.prompt_text for e in batch.examples],
            "generations": [g.text for g in generated],
            "references": [e.reference for e in batch.examples],
            "generated": generated,
            "seeds": seeds,
        }

    def log_validation_samples(self) -> None:
        """All ranks take part in the gather; rank 0 alone generates; the others wait.

        The gather is a collective, so it stays outside the `try`: a rank failing inside it must
        end the run, not go on to the barrier while the others are in the next all-gather (a hang).
        What rank 0 then does alone may fail and only warn."""
        start = time.perf_counter()
        model = self.replica.refresh(self.model)
        try:
            if self.dist.is_primary:
                gather_s = time.perf_counter() - start
                prompts: list[str] = []
                generated: list[Generated] = []
                references: list[Optional[str]] = []
                seeds: list[int] = []
                for batch in self.sample_batches:
                    out = self.generate_samples(batch, model)
                    prompts += out["prompts"]
                    generated += out["generated"]
                    references += out["references"]
                    seeds += out["seeds"]
                generation_s = time.perf_counter() - start - gather_s
                settings = self.generation_settings()
                log.debug("validation samples: gather %.3fs, generation %.3fs, %s", gather_s, generation_s, settings.describe())
                self.sample_logger.log(
                    self.step, "validation", "val", "validation", prompts, generated, references, settings, seeds, generation_s
                )
        except Exception as err:  # noqa: BLE001 - samples are optional; training goes on
            log.warning("validation sample generation failed at step %d: %s: %s", self.step, type(err).__name__, err)
        dist.barrier()

    # ------------------------------------------------------------------ checkpoints and the end
    def save_checkpoint(self) -> Path:
        state = {
            "global_step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "skipped_steps": self.skipped_steps,
        }
        path = self.checkpointer.save(self.step, self.model, self.optimizer, self.scheduler, state)
        log.info("saved checkpoint %s", path)
        return path

    def finish(self) -> None:
        self.preemption.restore()  # SIGTERM means "stop now" again, as before the run (the API's callers)
        if self.cfg.trainer.export_hf_model:
            merged = self.run_dir / "hf_model_merged" if self.cfg.model.lora_export_merged else None
            self.checkpointer.export_hf_model(self.model, self.run_dir / "hf_model", merged)
        finish_run(self.run_dir, self.tracking, self.sample_logger.report, self.dist.is_primary)


# ---------------------------------------------------------------------- entry point
def run(cfg: DictConfig, cli_overrides: Sequence[str]) -> None:
    denv = env_config.dist_env()
    with user_errors_exit(denv.rank):
        setup_logging(env_config.log_level(env_config.environ()), denv.rank)
        resolved = resolve(cfg, SFTConfig, cli_overrides, env_config.environ(), denv.world_size)
        announce_config(resolved, denv.rank)
        t = resolved.config.trainer
        ctx = init_distributed(denv, t.device, t.collective_timeout_seconds)
        trainer = FSDPSFTTrainer(resolved.config, ctx, resolved.from_env)
    with preempted_exit(denv.rank), user_errors_exit(denv.rank, during_training=True):
        trainer.fit()
    teardown()


@hydra.main(config_path="pkg://config", config_name="sft_trainer", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg, HydraConfig.get().overrides.task)


def main() -> None:
    sys.argv = normalize_config_path(sys.argv, Path.cwd())
    _hydra_main()
    exit_now()


if __name__ == "__main__":
    main()
