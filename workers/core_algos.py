"""RL maths for the actor and critic: advantage estimators, policy losses, KL penalties,
the PPO value loss and loss aggregation.

Everything here is a pure function of tensors, so the FSDP workers can call it on each
micro-batch and tests can check it on hand-sized examples. Nothing here talks to other
ranks: where a loss must not depend on how a global batch is split over micro-batches
and ranks, the caller all-reduces the global count (tokens or sequences) once and
passes it as `denominator`; each shard's loss then sums to the loss of the whole batch.

Algorithms are chosen by name from two registries (as in verl's
`verl/trainer/ppo/core_algos.py`): `get_adv_estimator("grpo" | "gae" | ...)` and
`get_policy_loss("vanilla" | "gspo")`. A new algorithm is one decorated function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = [
    "LOSS_AGG_MODES", "KL_PENALTY_KINDS", "masked_mean", "masked_whiten", "agg_loss",
    "AdvantageInputs", "AdvantageConfig", "ADV_ESTIMATORS", "register_adv_est",
    "get_adv_estimator", "compute_gae", "PolicyLossConfig", "POLICY_LOSSES",
    "register_policy_loss", "get_policy_loss", "kl_penalty", "value_loss",
]

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_PENALTY_KINDS = ("k1", "k2", "k3", "low_var_kl")


# ----------------------------------------------------------------------------- helpers

SumReduce = Callable[[Tensor], Tensor]  # sums a tensor over all ranks (identity on one rank)


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean of `x` over positions where `mask` is set; 0 (not NaN) where nothing is set."""
    mask = mask.to(x.dtype)
    total = (x * mask).sum() if dim is None else (x * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, reduce: Optional[SumReduce] = None) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked positions, as verl's `masked_whiten`.

    The variance is Bessel-corrected like verl's `masked_var(unbiased=True)`; with a
    single valid position the correction is skipped instead of dividing by zero.
    `shift_mean=False` adds the mean back (rescale only). Padded positions come out 0.
    `reduce` sums a tensor over ranks: the statistics are then those of the global batch (as
    verl's single driver computes them), not of this rank's share.
    """
    reduce = reduce or (lambda t: t)
    mask = mask.to(x.dtype)
    total, n = reduce(torch.stack([(x * mask).sum(), mask.sum()]))
    mean = total / n.clamp(min=1)
    var = reduce((((x - mean) ** 2) * mask).sum().reshape(1))[0] / n.clamp(min=1)
    var = var * torch.where(n > 1, n / (n - 1).clamp(min=1), torch.ones_like(n))
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def agg_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str,
    denominator: float | Tensor | None = None,
    *,
    max_response_length: int | None = None,
) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar.

    - "token-mean": sum(loss * mask) / number of valid tokens (DAPO's token-level loss).
    - "seq-mean-token-sum": per-sequence token sum, then mean over sequences.
    - "seq-mean-token-mean": per-sequence token mean, then mean over sequences (GRPO, GSPO).
    - "seq-mean-token-sum-norm": Dr. GRPO: sum(loss * mask) / (num_seqs * max_response_length).
      The constant `max_response_length` (the generation budget) replaces the per-sequence
      length so long and short answers weigh the same per token; it must be passed,
      because the padded width of a micro-batch changes from batch to batch.

    `denominator`, when given, replaces the local count: the global number of valid tokens
    for "token-mean", the global number of sequences for the "seq-mean-*" modes. Summing
    the shard losses then gives exactly the loss of the unsplit batch.
    A sequence whose mask is all zero contributes 0.
    """
    valid = mask.bool()
    # where(), not multiply: a masked-out inf/NaN (e.g. a log-ratio on padding) must not leak.
    masked = torch.where(valid, loss_mat, torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device))
    num_seqs = max(loss_mat.shape[0], 1) if denominator is None else denominator
    if mode == "token-mean":
        tokens = valid.sum().clamp(min=1).to(loss_mat.dtype) if denominator is None else denominator
        return masked.sum() / tokens
    if mode == "seq-mean-token-sum":
        return masked.sum(-1).sum() / num_seqs
    if mode == "seq-mean-token-mean":
        seq_len = valid.sum(-1).clamp(min=1).to(loss_mat.dtype)
        return (masked.sum(-1) / seq_len).sum() / num_seqs
    if mode == "seq-mean-token-sum-norm":
        if max_response_length is None:
            raise ValueError("loss_agg_mode 'seq-mean-token-sum-norm' needs max_response_length")
        return masked.sum() / (num_seqs * max_response_length)
    raise ValueError(f"unknown loss_agg_mode {mode!r}; expected one of {list(LOSS_AGG_MODES)}")


def _register(registry: dict, kind: str, name: str) -> Callable:
    def decorator(fn: Callable) -> Callable:
        # Two different functions under one name would make the config ambiguous.
        if registry.get(name, fn) is not fn:
            raise ValueError(f"{kind} {name!r} is already registered")
        registry[name] = fn
        return fn
    return decorator


def _lookup(registry: dict, kind: str, name: str) -> Callable:
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; registered: {sorted(registry)}")
    return registry[name]


# ----------------------------------------------------------------------------- advantages

@dataclass
class AdvantageInputs:
    token_level_rewards: Tensor  # [B, T]
    response_mask: Tensor  # [B, T]
    group_index: Tensor  # [B] long: which prompt each response answers
    values: Optional[Tensor] = None  # [B, T], critic values (GAE only)


@dataclass
class AdvantageConfig:
    gamma: float = 1.0
    lam: float = 1.0
    norm_adv_by_std_in_grpo: bool = True
    epsilon: float = 1e-6
    reduce: Optional[SumReduce] = None  # batch-wide whitening (GAE, REINFORCE++) over all ranks


AdvantageFn = Callable[[AdvantageInputs, AdvantageConfig], "tuple[Tensor, Tensor]"]
ADV_ESTIMATORS: dict[str, AdvantageFn] = {}


def register_adv_est(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    return _register(ADV_ESTIMATORS, "advantage estimator", name)


def get_adv_estimator(name: str) -> AdvantageFn:
    return _lookup(ADV_ESTIMATORS, "advantage estimator", name)


@torch.no_grad()
def compute_gae(
    token_level_rewards: Tensor, values: Tensor, response_mask: Tensor,
    gamma: float, lam: float, whiten: bool = True, reduce: Optional[SumReduce] = None,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, right to
    left; V and A after the last valid token are 0. Masked positions are skipped (the running
    V_{t+1} and A_{t+1} are carried over them), as verl does for interleaved observation tokens.
    returns = A + V is taken before whitening; with `whiten` the advantages are then whitened
    over all valid tokens of the batch (verl's `masked_whiten`, shift_mean=True).
    Both outputs are 0 on masked positions.
    """
    valid = response_mask.bool()
    mask = valid.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = token_level_rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        next_adv = torch.where(valid[:, t], adv_t, next_adv)
        advantages[:, t] = adv_t
    advantages = advantages * mask
    returns = (advantages + values) * mask
    if whiten:
        advantages = masked_whiten(advantages, mask, reduce=reduce)
    return advantages, returns


@register_adv_est("gae")
def compute_gae_advantage(inputs: AdvantageInputs, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    if inputs.values is None:
        raise ValueError("advantage estimator 'gae' needs critic values (AdvantageInputs.values)")
    return compute_gae(inputs.token_level_rewards, inputs.values, inputs.response_mask, cfg.gamma, cfg.lam, reduce=cfg.reduce)


@register_adv_est("grpo")
@torch.no_grad()
def compute_grpo_advantage(inputs: AdvantageInputs, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    """GRPO outcome advantage: (score - group mean) / (group std + eps), one value per response.

    score = sum of the response's token rewards; std is the unbiased std (torch.std, as
    verl). With `norm_adv_by_std_in_grpo=False` it is score - mean only (Dr. GRPO).
    A group of one response has no baseline: like verl it gets mean 0 and std 1, so its
    advantage is its raw score (/(1 + eps)). A group whose scores are all equal carries no
    signal and gets exactly 0, not the float residue of score - mean divided by eps.
    """
    mask = inputs.response_mask.to(inputs.token_level_rewards.dtype)
    scores = (inputs.token_level_rewards * mask).sum(-1)
    _, gid = torch.unique(inputs.group_index, return_inverse=True)
    zeros = torch.zeros(int(gid.max()) + 1 if gid.numel() else 0, dtype=scores.dtype, device=scores.device)
    count = zeros.index_add(0, gid, torch.ones_like(scores))
    mean = zeros.index_add(0, gid, scores) / count
    std = (zeros.index_add(0, gid, (scores - mean[gid]) ** 2) / (count - 1).clamp(min=1)).sqrt()
    single = count == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    hi = zeros.scatter_reduce(0, gid, scores, reduce="amax", include_self=False)
    lo = zeros.scatter_reduce(0, gid, scores, reduce="amin", include_self=False)
    flat = (hi == lo) & ~single

    adv = scores - mean[gid]
    if cfg.norm_adv_by_std_in_grpo:
        adv = adv / (std[gid] + cfg.epsilon)
    adv = torch.where(flat[gid], torch.zeros_like(adv), adv)
    adv = adv[:, None] * mask
    return adv, adv


@register_adv_est("reinforce_plus_plus")
@torch.no_grad()
def compute_reinforce_plus_plus_advantage(inputs: AdvantageInputs, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025): discounted reward-to-go, whitened over the batch's valid tokens.

    The reward-to-go is GAE with V = 0 and lam = 1; any KL penalty is expected to be
    folded into `token_level_rewards` by the caller.
    """
    rewards = inputs.token_level_rewards
    returns, _ = compute_gae(rewards, torch.zeros_like(rewards), inputs.response_mask, cfg.gamma, 1.0, whiten=False)
    return masked_whiten(returns, inputs.response_mask, reduce=cfg.reduce), returns


# ----------------------------------------------------------------------------- policy losses

@dataclass
class PolicyLossConfig:
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2  # DAPO's clip-higher uses 0.28; GSPO uses 3e-4 / 4e-4
    clip_ratio_c: float = 3.0  # dual-clip bound for negative advantages (Ye et al. 2020)
    loss_agg_mode: str = "token-mean"
    max_response_length: int | None = None  # only for "seq-mean-token-sum-norm"


PolicyLossFn = Callable[..., "tuple[Tensor, dict[str, Tensor]]"]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    return _register(POLICY_LOSSES, "policy loss", name)


def get_policy_loss(name: str) -> PolicyLossFn:
    return _lookup(POLICY_LOSSES, "policy loss", name)


def _aggregate(pg_losses: Tensor, mask: Tensor, cfg: PolicyLossConfig, denominator) -> Tensor:
    return agg_loss(pg_losses, mask, cfg.loss_agg_mode, denominator, max_response_length=cfg.max_response_length)


@register_policy_loss("vanilla")
def compute_policy_loss_vanilla(
    old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
    cfg: PolicyLossConfig, denominator: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate with token ratios (PPO, GRPO, DAPO clip-higher) plus dual-clip.

    loss_t = max(-A r, -A clip(r, 1 - low, 1 + high)); for A < 0 it is further capped at
    -A * clip_ratio_c, because the PPO max grows without bound as r grows there.
    """
    if cfg.clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1, got {cfg.clip_ratio_c}")
    # Clamped so a stale or badly mismatched token cannot overflow exp().
    log_ratio = (log_prob - old_log_prob).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high)
    loss_ppo = torch.maximum(loss_unclipped, loss_clipped)
    dual_bound = -advantages * cfg.clip_ratio_c
    negative = advantages < 0
    pg_losses = torch.where(negative, torch.minimum(loss_ppo, dual_bound), loss_ppo)

    loss = _aggregate(pg_losses, response_mask, cfg, denominator)
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), response_mask),
            "ppo_kl": masked_mean(-log_ratio, response_mask),
            "pg_clipfrac_lower": masked_mean(((loss_ppo > dual_bound) & negative).float(), response_mask),
        }
    return loss, metrics


@register_policy_loss("gspo")
def compute_policy_loss_gspo(
    old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
    cfg: PolicyLossConfig, denominator: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al. 2025), in its GSPO-token form as in verl.

    s_i = exp(mean over valid t of (log_prob - old_log_prob)) is the length-normalised
    sequence ratio; each token uses s_i,t = sg[s_i] * exp(log_prob_t - sg[log_prob_t]), whose
    value is s_i (so clipping is decided per sequence) and whose gradient w.r.t. log_prob_t
    is s_i. With "seq-mean-token-mean" and one advantage per sequence this is the paper's
    sequence-level objective. The paper has no dual-clip, so pg_clipfrac_lower is 0.
    """
    valid = response_mask.bool()
    log_ratio = torch.where(valid, log_prob - old_log_prob, torch.zeros_like(log_prob))
    seq_len = valid.sum(-1, keepdim=True).clamp(min=1).to(log_prob.dtype)
    # Clamp only the detached sequence value: keeps exp() finite without cutting any token's gradient.
    seq_log_ratio = (log_ratio.sum(-1, keepdim=True) / seq_len).detach().clamp(-20.0, 20.0)
    ratio = torch.exp(seq_log_ratio + log_prob - log_prob.detach())
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high)
    pg_losses = torch.maximum(loss_unclipped, loss_clipped)

    loss = _aggregate(pg_losses, response_mask, cfg, denominator)
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), response_mask),
            "ppo_kl": masked_mean(-log_ratio, response_mask),
            "pg_clipfrac_lower": torch.zeros((), device=loss.device),
        }
    return loss, metrics


# ----------------------------------------------------------------------------- KL and critic

def kl_penalty(log_prob: Tensor, ref_log_prob: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled tokens (Schulman, "Approximating
    KL divergence", 2020). "k1" is unbiased but noisy and can be negative; "k2" is the
    squared log-ratio / 2; "k3" (= "low_var_kl") is unbiased, non-negative and low-variance,
    clamped to [-10, 10] as in verl so one outlier token cannot dominate the loss."""
    if kind == "k1":
        return log_prob - ref_log_prob
    if kind == "k2":
        return 0.5 * (log_prob - ref_log_prob).square()
    if kind in ("k3", "low_var_kl"):
        log_ratio = (ref_log_prob - log_prob).clamp(-20.0, 20.0)
        return (torch.exp(log_ratio) - log_ratio - 1).clamp(-10.0, 10.0)
    raise ValueError(f"unknown kl penalty {kind!r}; expected one of {list(KL_PENALTY_KINDS)}")


def value_loss(
    vpreds: Tensor, returns: Tensor, old_values: Tensor, response_mask: Tensor,
    cliprange_value: float, loss_agg_mode: str = "token-mean",
    denominator: float | Tensor | None = None, *, max_response_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped value loss: 0.5 * max((v - R)^2, (v_clipped - R)^2), with v_clipped kept
    within `cliprange_value` of the rollout-time value, so the critic cannot move far in
    one update; taking the max makes the clip pessimistic rather than a free pass."""
    vpred_clipped = old_values + (vpreds - old_values).clamp(-cliprange_value, cliprange_value)
    loss_unclipped = (vpreds - returns) ** 2
    loss_clipped = (vpred_clipped - returns) ** 2
    loss = 0.5 * agg_loss(
        torch.maximum(loss_unclipped, loss_clipped), response_mask, loss_agg_mode, denominator,
        max_response_length=max_response_length,
    )
    with torch.no_grad():
        clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), response_mask)
    return loss, {"vf_clipfrac": clipfrac}
