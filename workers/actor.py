"""The RL actor and critic on FSDP shards: rollout batches, log-probs, values, and updates.
(Over 400 lines: the forwards and the two updates share one micro-batching and one loss
normalisation, whose lockstep and exactness are read together.)

Every forward here runs on a sharded model and is a collective, so every rank runs the same
number of them: each rank holds the same number of sequences (whole prompt groups) and splits
them into the same number of micro- and mini-batches.

Losses are normalised by a global count (tokens or sequences of the mini-batch, summed over
ranks once), so the update does not depend on how the batch is split: into micro-batches of a
fixed number of sequences, or of a token budget (`MicroBatching.max_tokens`, verl's
use_dynamic_bsz), where the ranks agree on one count with an all-reduce first.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from config.schema import ConfigError
from workers import core_algos
from workers.fsdp import full_grad_norm
from workers.generation import Generated
from workers import prompt_cache
from workers.micro_batches import balanced_groups, token_budget_groups
from workers.model import activation_checkpointing, cache_arguments, cache_keyword, lm_head_rows


@dataclass
class RolloutBatch:
    """One rank's sequences: left-padded prompts (width P) then right-padded responses (width R)."""

    input_ids: torch.Tensor  # [N, P + R]
    attention_mask: torch.Tensor  # [N, P + R]
    position_ids: torch.Tensor  # [N, P + R]
    response_mask: torch.Tensor  # [N, R] float: 1 on generated tokens (EOS included)
    group_index: torch.Tensor  # [N] which prompt each response answers
    prompt_width: int
    old_log_prob: Optional[torch.Tensor] = None  # [N, R]
    ref_log_prob: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    token_level_rewards: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    returns: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor | slice) -> "RolloutBatch":
        tensors = {
            f.name: getattr(self, f.name)[index]
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **tensors)

    def to(self, device: torch.device) -> "RolloutBatch":
        tensors = {f.name: getattr(self, f.name).to(device) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **tensors)

    def lengths(self) -> tuple[list[int], list[int]]:
        """Each row's prompt tokens and response tokens."""
        prompts = self.attention_mask[:, : self.prompt_width].sum(-1)
        return prompts.tolist(), self.response_mask.sum(-1).long().tolist()

    def trimmed(self) -> "RolloutBatch":
        """The same rows without the columns none of them uses: prompt padding left of the
        longest prompt, response padding right of the longest response. Positions and masks of
        the tokens are unchanged, so a forward gives the same values on fewer columns."""
        prompts, responses = self.lengths()
        p, r = max(1, max(prompts)), max(1, max(responses))
        P = self.prompt_width
        tensors = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if isinstance(t, torch.Tensor) and t.dim() == 2:
                tensors[f.name] = t[:, P - p : P + r] if f.name in _SEQUENCE_FIELDS else t[:, :r]
        return replace(self, prompt_width=p, **tensors)


_SEQUENCE_FIELDS = ("input_ids", "attention_mask", "position_ids")  # [N, P + R]; the other 2-D fields are [N, R]


def build_rollout_batch(generated: Sequence[Generated], group_index: Sequence[int], pad_id: int) -> RolloutBatch:
    prompt_width = max(len(g.prompt_ids) for g in generated)
    response_width = max(1, max(g.num_tokens for g in generated))
    n = len(generated)
    ids = torch.full((n, prompt_width + response_width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    response_mask = torch.zeros((n, response_width), dtype=torch.float32)
    for i, g in enumerate(generated):
        p = len(g.prompt_ids)
        ids[i, prompt_width - p : prompt_width] = torch.tensor(g.prompt_ids)
        mask[i, prompt_width - p : prompt_width] = 1
        if g.token_ids:
            ids[i, prompt_width : prompt_width + g.num_tokens] = torch.tensor(g.token_ids)
            mask[i, prompt_width : prompt_width + g.num_tokens] = 1
            response_mask[i, : g.num_tokens] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return RolloutBatch(ids, mask, position_ids, response_mask, torch.tensor(list(group_index)), prompt_width)


def _response_logits(model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False)
    width = batch.response_mask.shape[1]
    # Position t predicts token t + 1: the response tokens are predicted from P - 1 .. P + R - 2.
    return out.logits[:, batch.prompt_width - 1 : batch.prompt_width - 1 + width]


def response_log_probs(model: torch.nn.Module, batch: RolloutBatch, temperature: float = 1.0,
                       shared_prompts: bool = False) -> torch.Tensor:
    """Log-probabilities of the response tokens under the distribution they were sampled from
    ([N, R], 0 outside `response_mask`).

    Rollouts sample from softmax(logits / T), so the logits are divided by the rollout
    temperature before the log-softmax, for old, reference and current log-probs alike
    (verl's `dp_actor.py` does the same: `logits.div_(temperature)`). T = 1 is left untouched.

    The LM head runs only on the positions that predict a response token (`lm_head_rows`, as
    in SFT): no logits over the vocabulary for prompts, padding or what follows a stop, work
    that grows with the vocabulary (TRL's GRPOTrainer does the same with `logits_to_keep`).

    `shared_prompts` (a group's rows answer one prompt, as in GRPO): each distinct prompt runs
    once and its rows' responses read its keys and values (`_shared_prompt_log_probs`). It is a
    setting, not a property of the batch, because it sets how many forwards (collectives) run:
    every rank must pass the same value.
    """
    if shared_prompts:
        shared = _shared_prompt_log_probs(model, batch, temperature)
        if shared is not None:
            return shared
    width = batch.response_mask.shape[1]
    keep = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    # Position t predicts token t + 1: the response tokens are predicted from P - 1 .. P + R - 2.
    keep[:, batch.prompt_width - 1 : batch.prompt_width - 1 + width] = batch.response_mask.bool()
    with lm_head_rows(model, keep) as only_responses:
        if not only_responses:  # no output embeddings to hook: every position, then the window
            return _log_probs_of(_response_logits(model, batch), batch.input_ids[:, batch.prompt_width :], temperature)
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    use_cache=False)
    targets = batch.input_ids[:, batch.prompt_width :]
    mask = batch.response_mask.bool()
    rows = _log_probs_of(out.logits, targets[mask], temperature)  # [tokens]
    return torch.zeros(mask.shape, dtype=rows.dtype, device=rows.device).masked_scatter(mask, rows)


def _checkpointing_with_grad(model: torch.nn.Module) -> bool:
    return torch.is_grad_enabled() and model.training and activation_checkpointing(model)


def _shared_prompt_log_probs(model: torch.nn.Module, batch: RolloutBatch, temperature: float) -> Optional[torch.Tensor]:
    """`response_log_probs` with each distinct prompt computed once (None: the model has no
    output embeddings to hook, takes no KV cache, or has layers `workers.prompt_cache` cannot
    serve; the caller runs the plain forward).

    GRPO's n responses to a prompt share it token for token, and the prompt is often most of the
    sequence; the plain forward computes it n times. Here forward 1 runs the distinct prompts,
    keeping their keys and values; forward 2 runs every row's response against its prompt's
    (rows picked with `index_select`, so the gradients of all n responses flow back into the one
    prompt computation). The logits are those of the plain forward (tested to rounding) and so
    are the gradients, with activation checkpointing too; the tokens computed go from N·(P+R) to
    G·P + N·R (PrefixGrouper, arXiv:2506.05433, does the same for GRPO with an attention mask).
    The first response token is predicted by the prompt's last position, the others by the
    response's. Two forwards on every rank, whatever the rows: the caller decides by setting,
    and the checks here depend on the model only.
    """
    if model.get_output_embeddings() is None or cache_keyword(model) is None:
        return None
    if not prompt_cache.usable_with(model, _checkpointing_with_grad(model)):
        return None
    cache = prompt_cache.new_prompt_cache(model)
    if cache is None:
        return None
    P, R = batch.prompt_width, batch.response_mask.shape[1]
    first, inverse = prompt_cache.prompt_groups(batch.group_index)
    prompts = batch.input_ids[first, :P]
    if not torch.equal(prompts[inverse], batch.input_ids[:, :P]):
        raise RuntimeError("shared_prompts: rows with the same group_index have different prompts")
    mask = batch.response_mask.bool()
    last_position = torch.zeros((len(first), P), dtype=torch.bool, device=mask.device)
    last_position[:, -1] = True
    with lm_head_rows(model, last_position), prompt_cache.caches_through_checkpoints(model):
        prompt_logits = model(input_ids=prompts, attention_mask=batch.attention_mask[first, :P],
                              position_ids=batch.position_ids[first, :P], **cache_arguments(model, cache)).logits
    prefix = prompt_cache.PrefixCache.rows_of(cache, model.config, inverse)
    # Response position j predicts token j + 1; the last position predicts nothing.
    predicts = torch.zeros_like(mask)
    predicts[:, :-1] = mask[:, 1:]
    with lm_head_rows(model, predicts), prompt_cache.caches_through_checkpoints(model):
        rest = model(input_ids=batch.input_ids[:, P:], attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids[:, P:], **cache_arguments(model, prefix)).logits
    targets = batch.input_ids[:, P:]
    first_token = _log_softmax(prompt_logits, temperature)[inverse].gather(-1, targets[:, :1]).squeeze(-1)
    first_token = torch.where(mask[:, 0], first_token, torch.zeros_like(first_token))
    rows = _log_probs_of(rest, targets[:, 1:][mask[:, 1:]], temperature)
    later = torch.zeros((len(mask), R - 1), dtype=rows.dtype, device=rows.device).masked_scatter(mask[:, 1:], rows)
    return torch.cat([first_token.unsqueeze(1), later], dim=1)


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def _log_probs_of(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    return _log_softmax(logits, temperature).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


# The value head's model: one output per token and no dropout, so training-mode values match the
# eval-mode ones they are clipped against (HF's token-classification head keeps dropout 0.1 by
# default). verl sets the same in its critic worker (fsdp_workers.py, _build_critic_model_optimizer).
CRITIC_MODEL_KWARGS = {"num_labels": 1, "classifier_dropout": 0.0, "hidden_dropout": 0.0}


def response_values(critic: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """A token-classification model with one label: the value of the state before each token."""
    return _response_logits(critic, batch).float().squeeze(-1)


@dataclass(frozen=True)
class MicroBatching:
    """How one rank's sequences are cut into forwards: `size` sequences each, or, with
    `max_tokens` (verl's use_dynamic_bsz), as many as fit that many tokens counted as the forward
    computes them (rows × (longest prompt + longest response) of the micro-batch, which is
    trimmed to those widths). `key` is the budget's config key, for the error naming it."""

    size: int
    max_tokens: Optional[int] = None
    key: str = "max_tokens"


def micro_batch_rows(batch: RolloutBatch, how: MicroBatching) -> list[torch.Tensor]:
    """Collective with a token budget. The rows of each micro-batch of `batch`.

    Fixed size: runs of `size` rows. Token budget: each rank finds the fewest micro-batches its
    rows fit in, the ranks take the largest of those counts (every forward of a sharded model is
    a collective, so all run as many: verl's `rearrange_micro_batches(..., same_micro_num_in_dp=True)`
    does the same all-reduce MAX), then each rank cuts its rows into that many, balanced
    (`workers.micro_batches.balanced_groups`). A sequence longer than the budget stops every rank
    with the same one-line error (the config check catches it first when the lengths are known)."""
    n = len(batch)
    if how.max_tokens is None:
        return [torch.arange(i, min(i + how.size, n)) for i in range(0, n, how.size)]
    prompts, responses = batch.lengths()
    lengths = (prompts, [max(1, r) for r in responses])  # a response of no token still takes a column
    longest = max(p + r for p, r in zip(*lengths))
    need = torch.tensor([len(token_budget_groups(range(n), lengths, how.max_tokens)),
                         longest if longest > how.max_tokens else 0], dtype=torch.long)
    if dist.is_initialized():
        dist.all_reduce(need, op=dist.ReduceOp.MAX)
    count, too_long = need.tolist()
    if too_long:
        raise ConfigError(f"{how.key}={how.max_tokens}: smaller than a sequence of {too_long} tokens (prompt + response); "
                          "it must hold the longest sequence (data.max_prompt_length + rollout.max_new_tokens)")
    groups = balanced_groups(range(n), lengths, how.max_tokens, count)
    return [torch.tensor(sorted(g), dtype=torch.long) for g in groups]


def micro_batches(batch: RolloutBatch, how: MicroBatching) -> list[tuple[torch.Tensor, RolloutBatch]]:
    """(rows, micro-batch) pairs; token-budget micro-batches are trimmed to their own widths."""
    if how.max_tokens is None:
        return [(rows, batch.select(slice(int(rows[0]), int(rows[-1]) + 1))) for rows in micro_batch_rows(batch, how)]
    return [(rows, batch.select(rows.to(batch.input_ids.device)).trimmed()) for rows in micro_batch_rows(batch, how)]


@torch.no_grad()
def forward_in_micro_batches(fn: Callable, model: torch.nn.Module, batch: RolloutBatch, how: MicroBatching | int) -> torch.Tensor:
    """`fn(model, micro)` ([rows, R'] per micro-batch) for every row of `batch`, in its order: [N, R],
    0 right of a trimmed micro-batch's responses. `how`: a MicroBatching or a micro-batch size."""
    how = MicroBatching(how) if isinstance(how, int) else how
    was_training = model.training
    model.eval()
    out: Optional[torch.Tensor] = None
    for rows, micro in micro_batches(batch, how):
        values = fn(model, micro)
        if out is None:
            out = values.new_zeros((len(batch), batch.response_mask.shape[1]))
        out[rows.to(values.device), : values.shape[1]] = values
    model.train(was_training)
    return out


def _global_count(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def loss_denominator(mode: str, mask: torch.Tensor, device: torch.device) -> float:
    """Global tokens (token-mean) or global sequences (seq-mean-*) of a mini-batch."""
    local = float(mask.sum()) if mode == "token-mean" else float(mask.shape[0])
    return _global_count(local, device)


@dataclass
class UpdateSettings:
    micro_batch_size: int
    ppo_epochs: int
    mini_batches: int
    clip_grad: float
    world_size: int
    seed: int  # shuffles mini-batches reproducibly
    shared_prompts: bool = False  # `response_log_probs`: rows of a group share one prompt forward
    max_tokens: Optional[int] = None  # token-budget micro-batches (MicroBatching.max_tokens) instead of micro_batch_size
    max_tokens_key: str = "actor.ppo_max_token_len_per_gpu"  # named when a sequence does not fit

    @property
    def micro_batching(self) -> MicroBatching:
        return MicroBatching(self.micro_batch_size, self.max_tokens, self.max_tokens_key)


def on_policy(settings: UpdateSettings) -> bool:
    """One optimizer step on the rollout (one mini-batch, one epoch): the policy that sampled is
    the one being updated, so the old log-probs equal the current ones and need no forward."""
    return settings.ppo_epochs == 1 and settings.mini_batches == 1


def _mini_batches(n: int, count: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if count > 1 else torch.arange(n)
    return [chunk for chunk in order.chunk(count) if len(chunk)]


def _optimizer_step(model, optimizer, scheduler, clip_grad: float) -> tuple[torch.Tensor, bool]:
    grad_norm = full_grad_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad))
    finite = bool(torch.isfinite(grad_norm))  # the norm is global: every rank decides alike
    if finite:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def update_policy(
    actor: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    batch: RolloutBatch,
    policy_loss: Callable,
    loss_cfg: core_algos.PolicyLossConfig,
    kl_coef: float,
    kl_estimator: str,
    settings: UpdateSettings,
    step: int,
    *,
    temperature: float,
) -> dict[str, float]:
    """`temperature`: the rollout's, as for the old log-probs the ratios compare against.
    `batch.old_log_prob` None: the update is on-policy (`on_policy`), the ratio is 1."""
    device = batch.input_ids.device
    generator = torch.Generator().manual_seed(settings.seed * 7919 + step)
    sums: dict[str, float] = {}
    counts = 0
    skipped = 0
    actor.train()
    for _ in range(settings.ppo_epochs):
        for index in _mini_batches(len(batch), settings.mini_batches, generator):
            mini = batch.select(index)
            denominator = loss_denominator(loss_cfg.loss_agg_mode, mini.response_mask, device)
            for _, micro in micro_batches(mini, settings.micro_batching):
                log_prob = response_log_probs(actor, micro, temperature, settings.shared_prompts)
                # On-policy (no old log-probs: one mini-batch, one epoch) the sampling policy is the
                # current one, so the ratio is exactly 1: its detached log-probs stand in (as TRL does).
                old = micro.old_log_prob if micro.old_log_prob is not None else log_prob.detach()
                pg_loss, metrics = policy_loss(old, log_prob, micro.advantages, micro.response_mask, loss_cfg, denominator)
                loss = pg_loss
                if kl_coef > 0:
                    kl = core_algos.kl_penalty(log_prob, micro.ref_log_prob, kl_estimator)
                    kl_loss = core_algos.agg_loss(kl, micro.response_mask, loss_cfg.loss_agg_mode, denominator,
                                                  max_response_length=loss_cfg.max_response_length)
                    loss = loss + kl_coef * kl_loss
                    metrics["kl_loss"] = kl_loss.detach()
                # FSDP averages gradients over ranks; the loss is already a global mean.
                (loss * settings.world_size).backward()
                metrics["pg_loss"] = pg_loss.detach()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                counts += 1
            grad_norm, finite = _optimizer_step(actor, optimizer, scheduler, settings.clip_grad)
            skipped += not finite
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
    steps = settings.ppo_epochs * settings.mini_batches
    grad_norm_sum = sums.pop("grad_norm", 0.0)  # already global: the same on every rank
    out = {f"actor/{k}": v for k, v in global_means(sums, counts, steps, shares=("pg_loss", "kl_loss"), device=device).items()}
    out["actor/grad_norm"] = grad_norm_sum / steps
    out["actor/skipped_updates"] = float(skipped)
    return out


def global_means(sums: dict[str, float], counts: int, steps: int, shares: Sequence[str], device: torch.device) -> dict[str, float]:
    """Collective. The logged value of each metric over all ranks, so it does not change with the
    number of GPUs. `shares` are each rank's share of a globally normalised loss (summed over its
    micro-batches): their sum over ranks is the loss, averaged over the `steps` optimizer steps.
    The others are per-micro-batch means: averaged over every rank's micro-batches."""
    keys = sorted(sums)  # the same keys on every rank (same loss functions), in the same order
    totals = torch.tensor([sums[k] for k in keys] + [float(counts)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(totals)
    values = totals.tolist()
    all_counts = max(values[-1], 1.0)
    return {k: v / steps if k in shares else v / all_counts for k, v in zip(keys, values)}


def update_critic(
    critic: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    cliprange_value: float,
    loss_agg_mode: str,
    settings: UpdateSettings,
    step: int,
) -> dict[str, float]:
    device = batch.input_ids.device
    generator = torch.Generator().manual_seed(settings.seed * 104729 + step)
    loss_sum, clipfrac_sum, counts, grad_norm_sum = 0.0, 0.0, 0, 0.0
    critic.train()
    for _ in range(settings.ppo_epochs):
        for index in _mini_batches(len(batch), settings.mini_batches, generator):
            mini = batch.select(index)
            denominator = loss_denominator(loss_agg_mode, mini.response_mask, device)
            for _, micro in micro_batches(mini, settings.micro_batching):
                values = response_values(critic, micro)
                # The rank's response width, not a trimmed micro-batch's: the same normaliser for every split.
                loss, metrics = core_algos.value_loss(values, micro.returns, micro.values, micro.response_mask,
                                                      cliprange_value, loss_agg_mode, denominator,
                                                      max_response_length=batch.response_mask.shape[1])
                (loss * settings.world_size).backward()
                loss_sum += float(loss.detach())
                clipfrac_sum += float(metrics["vf_clipfrac"])
                counts += 1
            grad_norm, _ = _optimizer_step(critic, optimizer, None, settings.clip_grad)
            grad_norm_sum += float(grad_norm)
    steps = settings.ppo_epochs * settings.mini_batches
    means = global_means({"vf_loss": loss_sum, "vf_clipfrac": clipfrac_sum}, counts, steps, shares=("vf_loss",), device=device)
    return {"critic/vf_loss": means["vf_loss"], "critic/vf_clipfrac": means["vf_clipfrac"], "critic/grad_norm": grad_norm_sum / steps}
