"""RL fine-tuning (GRPO, GSPO, PPO) of a Hugging Face causal LM on FSDP2 workers.

    python -m trainer.rl_trainer --config-name grpo_trainer|gspo_trainer|ppo_trainer [key=value ...]
    torchrun --nproc_per_node=N -m trainer.rl_trainer --config-name grpo_trainer [...]

One step: each rank takes its share of the step's prompts (whole groups), generates
`responses_per_prompt` responses per prompt, scores them with every reward function, computes
advantages with the configured estimator and updates the policy (and the PPO critic).

Rollouts run on every rank at once on its own prompts, with the actor's parameters unsharded
for the rollout (`workers.fsdp.unsharded`): no collective per generated token and no
`synced_gpus`, so ranks that finish early do not wait token by token. Memory is one full copy
of the parameters per rank during the rollout, freed afterwards; a gathered copy on rank 0
instead would leave the other ranks idle and serialise all generation on one device.

Qualitative samples (`logging.sample_logging`) come from rank 0's gathered copy, as in SFT.

A reward model (`reward.model`, verl's `reward_model`) is sharded over the ranks like the
reference; every rank scores its own responses with it (a collective forward), and at a sample
event rank 0's generated texts are scored the same way, by every rank (`Run.sample_event`'s
`score`): the sharded model is never run by rank 0 alone.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import DictConfig
from transformers import AutoModelForTokenClassification

from config import env as env_config
from config.loading import resolve
from config.rl_schema import RLConfig, SampleLoggingConfig, lift_flat_sample_logging
from config.schema import ConfigError
from trainer.distributed import DistContext, all_reduce_sum
from trainer.faults import same_inputs_on_every_rank
from trainer.optim import build_optimizer, build_scheduler
from trainer.data.rl_prompts import PromptBatches, RLPrompt, load_rl_prompts, rollout_seed
from trainer.resume_guard import essential_config
from trainer.run import Run, SampleEventSpec, Samples, entry_point
from trainer.sample_prompts import SamplePrompt, SamplingPlan, encode_file_prompts, generate_samples, read_prompts_file
from trainer.samples import prompt_id, sample_seed
from trainer.token_cache import rows_fingerprint
from workers import core_algos
from workers.actor import (
    CRITIC_MODEL_KWARGS,
    MicroBatching,
    RolloutBatch,
    UpdateSettings,
    build_rollout_batch,
    forward_in_micro_batches,
    on_policy,
    response_log_probs,
    response_values,
    update_critic,
    update_policy,
)
from workers.fsdp import ShardingSpec, build_sharded_model, param_count, sharding_spec
from workers.generation import GenerationSettings, encode_prompts
from workers.lora import LoraSpec, adapters_disabled, check_fits, trainable_summary_line
from workers.model import import_external_lib, load_config, load_stop_ids, load_tokenizer
from workers.reward_model import RewardModel, check_reward_model
from workers.rewards import RewardSet, build_reward_set
from workers.rollout_engine import build_engine, check_engine, engine_settings

log = logging.getLogger("trainer.rl")


def check_registries(cfg: RLConfig) -> None:
    """Algorithm names are checked against the registries that own them, before any model."""
    a = cfg.algorithm
    for key, value, names in (
        ("algorithm.adv_estimator", a.adv_estimator, core_algos.ADV_ESTIMATORS),
        ("algorithm.policy_loss", a.policy_loss, core_algos.POLICY_LOSSES),
        ("algorithm.loss_agg_mode", a.loss_agg_mode, core_algos.LOSS_AGG_MODES),
        ("algorithm.kl_estimator", a.kl_estimator, core_algos.KL_PENALTY_KINDS),
    ):
        if value not in names:
            raise ConfigError(f"{key}: got {value!r}, expected one of {', '.join(sorted(names))}")


class SampleSchedule:
    """When qualitative samples are due: every `interval_steps`, at each multiple of
    `percent_of_max_steps` of the run, and (separately) once after training."""

    def __init__(self, cfg: SampleLoggingConfig, max_steps: int):
        self.cfg = cfg
        self.max_steps = max_steps
        self.percent_steps: dict[int, str] = {}
        if cfg.enabled and cfg.percent_of_max_steps:
            for k in range(1, int(math.floor(1 / cfg.percent_of_max_steps + 1e-9)) + 1):
                share = k * cfg.percent_of_max_steps
                self.percent_steps.setdefault(max(1, math.ceil(share * max_steps - 1e-9)), f"{share * 100:g}%")

    def stage(self, step: int) -> Optional[str]:
        """The stage label when samples are due at `step` (the last step is left to post-train)."""
        if not self.cfg.enabled or step >= self.max_steps:
            return None
        if step in self.percent_steps:
            return self.percent_steps[step]
        if self.cfg.interval_steps and step % self.cfg.interval_steps == 0:
            return f"step_{step}"
        return None


class RLTrainer:
    def __init__(self, cfg: RLConfig, dist_ctx: DistContext, rewards: Optional[RewardSet] = None):
        self.cfg = cfg
        self.dist = dist_ctx
        self.device = dist_ctx.device
        self.run = Run(cfg.trainer, cfg.samples, cfg.model, dist_ctx, essential_config(cfg), cfg.eval)
        check_registries(cfg)
        check_engine(cfg.rollout.name)
        self.rewards = rewards or build_reward_set(cfg.reward.functions)
        rm = cfg.reward.model
        if rm.enable:  # its config checked before any model is built; the model itself after the actor
            check_reward_model(rm.path, rm.trust_remote_code)
            self.rewards = self.rewards.with_scored_elsewhere(rm.name, rm.weight)

        import_external_lib(cfg.model.external_lib)
        file_rows = read_prompts_file(cfg.samples.prompts_file) if cfg.samples.prompts_file else None
        self.tokenizer = load_tokenizer(cfg.model.partial_pretrain, cfg.model.trust_remote_code)
        sl = cfg.logging.sample_logging
        self.sample_prompts = (
            encode_file_prompts(file_rows, self.tokenizer) if file_rows is not None else
            [SamplePrompt(t, tuple(ids)) for t, ids in zip(sl.effective_prompts[: sl.effective_num_samples],
                                                           encode_prompts(self.tokenizer, sl.effective_prompts[: sl.effective_num_samples]))]
        )
        self.stop_ids = load_stop_ids(cfg.model.partial_pretrain, self.tokenizer)
        self.model_config = load_config(cfg.model.partial_pretrain, cfg.model.trust_remote_code)
        # Tokenized once into the token cache (local rank 0 of each node writes), then memory-mapped.
        cache_dir, ranks = self.run.token_cache(cfg.data.cache_dir)
        self.prompts = load_rl_prompts(cfg.data.train_files, "data.train_files", self.tokenizer, cfg.data, cache_dir, ranks)
        val = load_rl_prompts(cfg.data.val_files, "data.val_files", self.tokenizer, cfg.data, cache_dir, ranks) if cfg.data.val_files else []
        self.val_prompts = val if cfg.data.max_val_prompts is None else val[: cfg.data.max_val_prompts]
        same_inputs_on_every_rank({"data.train_files": rows_fingerprint(self.prompts), "data.val_files": rows_fingerprint(val)},
                                  self.model_config, self.stop_ids)
        self.validations: list[tuple[int, dict[str, float]]] = []  # (step, val metrics) of this process
        self.batches = PromptBatches(self.prompts, cfg.data.prompts_per_step, cfg.trainer.seed, cfg.data.shuffle,
                                     dist_ctx.rank, dist_ctx.world_size)
        total_steps = self.batches.steps_per_epoch * cfg.trainer.total_epochs
        if cfg.trainer.total_training_steps is not None:
            total_steps = min(total_steps, cfg.trainer.total_training_steps)

        torch.manual_seed(cfg.trainer.seed)
        self.spec = sharding_spec(cfg.model.fsdp_config, self.device)
        self.param_dtype = self.spec.param_dtype
        self.lora = LoraSpec.from_model_config(cfg.model)
        if self.lora is not None:
            check_fits(self.lora, self.model_config, cfg.model.trust_remote_code)
        self.actor = self._build(gradient_checkpointing=cfg.model.enable_gradient_checkpointing, lora=self.lora)
        self.optimizer = build_optimizer(self.actor, cfg.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, total_steps * cfg.actor.ppo_epochs * cfg.actor.mini_batches_per_step)
        if self.lora is not None and dist_ctx.is_primary:
            log.info("LoRA on the actor (%s): %s", self.lora.describe(), trainable_summary_line(self.actor, self.optimizer))
        self.reference = None
        # With LoRA the reference policy is the actor's frozen base with its adapters switched
        # off (`reference_log_probs`): no second copy of the weights is built.
        if cfg.algorithm.kl_coef > 0 and self.lora is None:
            # No gradients: offloading its shards to CPU costs only the copy in at each forward.
            spec = replace(self.spec, cpu_offload=self.spec.cpu_offload or cfg.ref.cpu_offload)
            self.reference = self._build(spec=spec).eval().requires_grad_(False)
        self.critic = self.critic_optimizer = None
        if cfg.algorithm.adv_estimator == "gae":
            checkpointing = cfg.critic.enable_gradient_checkpointing
            # fp32 masters whatever the actor's model_dtype: verl's critic has its own (fp32 by default)
            self.critic = self._build(gradient_checkpointing=cfg.model.enable_gradient_checkpointing if checkpointing is None else checkpointing,
                                      auto_class=AutoModelForTokenClassification, spec=replace(self.spec, master_dtype=torch.float32),
                                      **CRITIC_MODEL_KWARGS)
            self.critic_optimizer = build_optimizer(self.critic, cfg.optim, self.device)
            for group in self.critic_optimizer.param_groups:
                group["lr"] = cfg.critic.lr
        self.reward_model = None
        if rm.enable:
            self.reward_model = RewardModel(rm.path, self.spec, self.device, dist_ctx.world_size,
                                            rm.micro_batch_size_per_gpu or cfg.actor.micro_batch_size_per_gpu, rm.max_length,
                                            rm.trust_remote_code, cfg.model.attn_implementation)
        reference = ", frozen reference" if self.reference else (
            ", reference = the actor's base with adapters disabled" if cfg.algorithm.kl_coef > 0 else "")
        log.info("%s: actor %.2fM parameters over %d rank(s), %s weights, compute %s%s%s%s", cfg.algorithm.name,
                 param_count(self.actor) / 1e6, dist_ctx.world_size,
                 self.spec.master_dtype if self.lora is None else "fp32 adapter", self.param_dtype, reference, ", critic" if self.critic else "",
                 f", reward model {rm.path} ({param_count(self.reward_model.model) / 1e6:.2f}M, weight {rm.weight})"
                 if self.reward_model else "")
        budgets = {f: cfg.token_budget(f) for f in cfg.forwards_run()}
        if any(budgets.values()):  # what verl users set with use_dynamic_bsz, said once
            log.info("token-budget micro-batches (tokens per forward on one rank, padding included): %s",
                     ", ".join(f"{f} {b[0]}" if b else f"{f} by sequences"
                               for f, b in budgets.items()))

        self.run.attach(self.model_config, self.tokenizer, self.lora, total_steps,
                        lambda: (self.actor, self.optimizer, self.scheduler, self._extra()),
                        "auto", "auto", self.param_dtype)
        self.schedule = SampleSchedule(cfg.logging.sample_logging, total_steps)
        # The rollout engine (rollout.name): built once, after the resume; a vLLM engine gets the
        # actor's weights (resumed or not) before its first generation. A collective under torchrun.
        self.engine = build_engine(cfg.rollout.name, self.actor, self.spec, self.tokenizer, self.stop_ids,
                                   engine_settings(cfg.rollout, cfg.model, cfg.data.max_prompt_length, cfg.trainer.seed,
                                                   self.param_dtype, self.model_config), self.lora)

    def _build(self, gradient_checkpointing: bool = False, auto_class=None, spec: Optional[ShardingSpec] = None,
               lora: Optional[LoraSpec] = None, **kwargs) -> torch.nn.Module:
        m = self.cfg.model
        return build_sharded_model(m.partial_pretrain, self.model_config, spec or self.spec, self.device, self.dist.world_size,
                                   m.trust_remote_code, m.attn_implementation, gradient_checkpointing, auto_class, lora,
                                   **kwargs)

    def micro_batching(self, forward: str, size: int) -> MicroBatching:
        """`size` sequences per micro-batch, or the token budget of `forward` (RLConfig.token_budget)."""
        budget = self.cfg.token_budget(forward)
        return MicroBatching(size) if budget is None else MicroBatching(size, *budget)

    def reference_log_probs(self, batch: RolloutBatch, log_probs) -> torch.Tensor:
        """The frozen reference's log-probs: its own model, or with LoRA the actor's base."""
        size = self.cfg.ref.log_prob_micro_batch_size_per_gpu or self.cfg.actor.micro_batch_size_per_gpu
        mbs = self.micro_batching("ref_log_prob", size)
        if self.reference is not None:
            return forward_in_micro_batches(log_probs, self.reference, batch, mbs)
        with adapters_disabled(self.actor):
            return forward_in_micro_batches(log_probs, self.actor, batch, mbs)

    def _extra(self) -> dict:
        return {"critic": (self.critic, self.critic_optimizer)} if self.critic is not None else {}

    # ------------------------------------------------------------------ loop
    def fit(self) -> None:
        run = self.run
        run.begin(self.cfg, self.cfg.algorithm.name)
        if run.step == 0 and self.val_prompts and self.cfg.trainer.val_before_train:
            self.validate()  # the starting point, to compare against
        while not run.done:
            self.batches.seed = run.data_seed(self.cfg.trainer.seed)  # moved by a rollback that reshuffles
            metrics = self.train_step()
            epoch_end = run.advance(self.batches.steps_per_epoch)
            run.log_step(metrics, bar={"reward": "train/reward_mean"})
            if self.val_prompts and run.due(self.cfg.trainer.test_freq, epoch_end):
                self.validate()
            if stage := self.schedule.stage(run.step):
                self.log_samples(stage)
            rollbacks = run.control.rollbacks
            run.end_step(self.save_checkpoint)
            if run.control.rollbacks != rollbacks:
                self.engine.update_weights()  # the rollback restored older weights: the engine must get them
        run.end_loop()
        if self.cfg.logging.sample_logging.enabled:
            self.log_samples("post-train")
        self.finish()

    def train_step(self) -> dict[str, float]:
        start = time.perf_counter()
        cfg = self.cfg
        position = self.run.position
        indices, prompts = self.batches.rank_prompts(position.epoch, position.batch_in_epoch)
        batch, scores = self.rollout(indices, prompts)
        rollout_s = time.perf_counter() - start
        batch = batch.to(self.device)
        mbs = cfg.actor.micro_batch_size_per_gpu
        # A group's responses share their prompt: one forward of it per group (the same on every rank).
        shared = cfg.rollout.responses_per_prompt > 1
        actor = self.micro_batching("actor", mbs)
        settings = UpdateSettings(mbs, cfg.actor.ppo_epochs, cfg.actor.mini_batches_per_step, cfg.optim.clip_grad,
                                  self.dist.world_size, cfg.trainer.seed, shared_prompts=shared,
                                  max_tokens=actor.max_tokens, max_tokens_key=actor.key)
        log_probs = partial(response_log_probs, temperature=cfg.rollout.temperature, shared_prompts=shared)
        if not on_policy(settings):  # on-policy the update uses its own detached log-probs (ratio 1)
            batch.old_log_prob = forward_in_micro_batches(
                log_probs, self.actor, batch, self.micro_batching("old_log_prob", cfg.rollout.log_prob_micro_batch_size_per_gpu or mbs))
        if cfg.algorithm.kl_coef > 0:
            batch.ref_log_prob = self.reference_log_probs(batch, log_probs)
        if self.critic is not None:
            batch.values = forward_in_micro_batches(response_values, self.critic, batch, self.micro_batching("values", mbs))
        log_probs_s = time.perf_counter() - start - rollout_s
        a = cfg.algorithm
        batch.advantages, batch.returns = core_algos.get_adv_estimator(a.adv_estimator)(
            core_algos.AdvantageInputs(batch.token_level_rewards, batch.response_mask, batch.group_index, batch.values),
            core_algos.AdvantageConfig(a.gamma, a.lam, a.norm_adv_by_std_in_grpo, reduce=all_reduce_sum),
        )
        metrics: dict[str, float] = {}
        if self.critic is not None:
            critic = self.micro_batching("critic", mbs)
            metrics.update(update_critic(self.critic, self.critic_optimizer, batch, cfg.critic.cliprange_value, a.loss_agg_mode,
                                         replace(settings, max_tokens=critic.max_tokens, max_tokens_key=critic.key),
                                         position.global_step))
        if self.critic is None or position.global_step >= cfg.critic.warmup_steps:
            loss_cfg = core_algos.PolicyLossConfig(a.clip_ratio_low, a.clip_ratio_high, a.clip_ratio_c, a.loss_agg_mode,
                                                   cfg.rollout.max_new_tokens)
            metrics.update(update_policy(self.actor, self.optimizer, self.scheduler, batch, core_algos.get_policy_loss(a.policy_loss),
                                         loss_cfg, a.kl_coef, a.kl_estimator, settings, position.global_step,
                                         temperature=cfg.rollout.temperature))
        self.engine.update_weights()  # the next rollout samples from the updated policy
        metrics.update(self._reward_metrics("train", scores, batch.response_mask.sum(-1).tolist()))
        step_s = time.perf_counter() - start
        metrics.update({"train/lr": self.scheduler.get_last_lr()[0], "train/rollout_s": rollout_s,
                        "train/step_s": step_s, "train/epoch": float(position.epoch),
                        # The step's phases (advantages and rewards' metrics count with the update);
                        # sample logging is timed when it runs, after the previous step.
                        "timing/rollout_s": rollout_s, "timing/log_probs_s": log_probs_s,
                        "timing/update_s": step_s - rollout_s - log_probs_s,
                        "timing/samples_s": self.run.take_samples_time()})
        return metrics

    def rollout(self, indices: Sequence[int], prompts: Sequence[RLPrompt]) -> tuple[RolloutBatch, list[dict[str, float]]]:
        n = self.cfg.rollout.responses_per_prompt
        r = self.cfg.rollout
        settings = GenerationSettings(r.max_new_tokens, True, r.temperature, r.top_k, r.top_p)
        prompt_ids = [p.prompt_ids for p in prompts for _ in range(n)]
        seeds = [rollout_seed(self.cfg.trainer.seed, self.run.step, i, j) for i in indices for j in range(n)]
        generated = self.engine.generate(prompt_ids, settings, seeds, micro_batch_size=r.micro_batch_size_per_gpu)
        batch = build_rollout_batch(generated, [i for i in range(len(prompts)) for _ in range(n)], self.tokenizer.pad_token_id)
        each = [p for p in prompts for _ in range(n)]
        scores = self._score(each, [g.text for g in generated])
        # The outcome reward sits on the last generated token.
        rewards = torch.zeros_like(batch.response_mask)
        for i, (g, s) in enumerate(zip(generated, scores)):
            rewards[i, max(g.num_tokens - 1, 0)] = self.rewards.total(s)
        batch.token_level_rewards = rewards
        return batch, scores

    def _score(self, prompts: Sequence[RLPrompt], responses: Sequence[str]) -> list[dict[str, float]]:
        """Every reward of each response: the functions', then the reward model's (collective)."""
        scores = [self.rewards.score(p.text, r, p.ground_truth) for p, r in zip(prompts, responses)]
        if self.reward_model is not None:
            name = self.cfg.reward.model.name
            for s, value in zip(scores, self.reward_model.score([p.conversation for p in prompts], responses)):
                s[name] = value
        return scores

    def _score_samples(self, prompts: list[str], responses: list[str]) -> list[dict[str, float]]:
        """Collective, at a sample event: the reward model's scores of rank 0's samples."""
        values = self.reward_model.score([[{"role": "user", "content": p}] for p in prompts], responses)
        return [{self.cfg.reward.model.name: v} for v in values]

    def _reward_metrics(self, prefix: str, scores: list[dict[str, float]], lengths: list[float]) -> dict[str, float]:
        """Means over all ranks: one all-reduce of [sums and counts per reward, total, length]."""
        names = self.rewards.names
        local = []
        for name in names:
            values = [s[name] for s in scores if name in s]
            local += [sum(values), len(values)]
        local += [sum(self.rewards.total(s) for s in scores), len(scores), sum(lengths)]
        totals = all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=self.device)).tolist()
        out = {}
        for k, name in enumerate(names):
            if totals[2 * k + 1] > 0:
                out[f"{prefix}/reward/{name}"] = totals[2 * k] / totals[2 * k + 1]
        count = max(totals[-2], 1.0)
        out[f"{prefix}/reward_mean"] = totals[-3] / count
        out[f"{prefix}/response_length"] = totals[-1] / count
        return out

    # ------------------------------------------------------------------ validation and samples
    def validate(self) -> dict[str, float]:
        """Every rank answers its share of the held-out prompts (greedy by default)."""
        r = self.cfg.rollout
        mine = self.val_prompts[self.dist.rank :: self.dist.world_size]
        settings = GenerationSettings(
            r.max_new_tokens, r.val_do_sample, r.val_temperature or r.temperature,
            r.top_k if r.val_top_k is None else r.val_top_k, r.val_top_p or r.top_p,
        )
        seeds = [sample_seed(self.cfg.trainer.seed, prompt_id(p.prompt_ids)) for p in mine]
        generated = self.engine.generate([p.prompt_ids for p in mine], settings, seeds, micro_batch_size=r.micro_batch_size_per_gpu)
        scores = self._score(mine, [g.text for g in generated])
        metrics = self._reward_metrics("val", scores, [g.num_tokens for g in generated])
        self.run.log_validation(metrics)
        if self.dist.is_primary:
            shown = ", ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in metrics.items() if "/reward/" in k)
            log.info("validation at step %d on %d held-out prompts: %s", self.run.step, len(self.val_prompts), shown)
        self.validations.append((self.run.step, metrics))
        return metrics

    def _log_val_change(self) -> None:
        """One line with what training did to the held-out rewards, first validation to last."""
        if len(self.validations) < 2 or not self.dist.is_primary:
            return
        (first_step, first), (last_step, last) = self.validations[0], self.validations[-1]
        mode = "sampled" if self.cfg.rollout.val_do_sample else "greedy"
        changes = ", ".join(f"{k.split('/')[-1]} {first[k]:.3f} -> {last[k]:.3f}" for k in first if "/reward/" in k and k in last)
        log.info("held-out rewards (%s), step %d -> %d: %s", mode, first_step, last_step, changes)

    def log_samples(self, stage: str) -> None:
        """Qualitative samples from rank 0's gathered copy, scored by every reward function (collective)."""
        self.run.sample_event(self.actor, self.generate_qualitative_samples,
                              SampleEventSpec(stage, "samples", "qualitative", f"qualitative samples ({stage})"),
                              score=self._score_samples if self.reward_model is not None else None)

    def generate_qualitative_samples(self, model: torch.nn.Module) -> Samples:
        """Rank 0, on its gathered copy: k answers per sample prompt (and maybe a greedy one),
        scored by every reward function (against a prompts file's references, where given)."""
        sl = self.cfg.logging.sample_logging
        settings = GenerationSettings(sl.max_new_tokens, sl.do_sample, sl.temperature, 0, sl.top_p)
        samples = generate_samples(model, self.tokenizer, self.sample_prompts, settings,
                                   SamplingPlan(sl.num_samples_per_prompt, sl.also_greedy), self.cfg.trainer.seed, self.stop_ids)
        samples.rewards = [self.rewards.score(t, g.text, ref)
                           for t, g, ref in zip(samples.prompts, samples.generated, samples.references)]
        return samples

    # ------------------------------------------------------------------ checkpoints and the end
    def save_checkpoint(self) -> Path:
        return self.run.save(self.actor, self.optimizer, self.scheduler, self._extra())

    def finish(self) -> None:
        self._log_val_change()
        self.run.finish(self.actor)
        self.engine.close()  # last: vLLM's shutdown tears down the process group it joined


# ---------------------------------------------------------------------- entry point
def resolve_rl(cfg: DictConfig, cli_overrides: Sequence[str], world_size: int):
    return resolve(cfg, RLConfig, cli_overrides, env_config.environ(), world_size, preprocess=lift_flat_sample_logging)


main = entry_point("grpo_trainer", resolve_rl, RLTrainer)

if __name__ == "__main__":
    main()
