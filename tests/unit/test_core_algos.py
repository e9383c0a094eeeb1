"""RL maths in workers/core_algos.py, each checked against numbers worked out by hand here."""

import math

import pytest
import torch

from workers.core_algos import (
    LOSS_AGG_MODES,
    AdvantageConfig,
    AdvantageInputs,
    PolicyLossConfig,
    agg_loss,
    compute_gae,
    get_adv_estimator,
    get_policy_loss,
    kl_penalty,
    masked_mean,
    masked_whiten,
    register_adv_est,
    value_loss,
)

ln = math.log
T = torch.tensor


def approx(x, expected, abs=1e-5):
    """True when tensor/number `x` matches the hand-computed `expected` (number or nested list)."""
    got = torch.as_tensor(x, dtype=torch.float64).flatten().tolist()
    want = torch.as_tensor(expected, dtype=torch.float64).flatten().tolist()
    return len(got) == len(want) and got == pytest.approx(want, abs=abs)


def policy_inputs(log_ratios, advantages, mask=None):
    """old_log_prob = 0, so log_prob is the log-ratio itself; log_prob is a leaf for .grad."""
    log_prob = T(log_ratios, dtype=torch.float32, requires_grad=True)
    old = torch.zeros_like(log_prob)
    adv = T(advantages, dtype=torch.float32)
    mask = torch.ones_like(old) if mask is None else T(mask, dtype=torch.float32)
    return old, log_prob, adv, mask


# ----------------------------------------------------------------------------- PPO / GRPO loss

def test_ppo_clips_both_sides_and_counts_clipfrac():
    # ratios r, advantages A; clip range [0.8, 1.2], dual-clip bound 3 never reached here.
    #   seq 0, A=+1: r=1.5 -> clipped to 1.2 (loss -1.2), r=1.1 -> -1.1, r=0.5 -> min(0.5, 0.8) -> -0.5
    #   seq 1, A=-1: r=0.5 -> max(0.5, 0.8) = 0.8 clipped, r=1.1 -> 1.1, r=1.5 -> max(1.5, 1.2) = 1.5
    old, logp, adv, mask = policy_inputs(
        [[ln(1.5), ln(1.1), ln(0.5)], [ln(0.5), ln(1.1), ln(1.5)]], [[1.0] * 3, [-1.0] * 3]
    )
    loss, m = get_policy_loss("vanilla")(old, logp, adv, mask, PolicyLossConfig())
    assert approx(loss, (-1.2 - 1.1 - 0.5 + 0.8 + 1.1 + 1.5) / 6)  # token-mean = 0.1
    assert approx(m["pg_clipfrac"], 2 / 6)
    assert approx(m["pg_clipfrac_lower"], 0.0)
    # ppo_kl = mean(old - new) = -(ln1.5 + ln1.1 + ln0.5) * 2 / 6
    assert approx(m["ppo_kl"], -2 * (ln(1.5) + ln(1.1) + ln(0.5)) / 6)
    loss.backward()
    # d(-A r)/d log r = -A r, / 6 tokens; clipped tokens get exactly 0.
    assert approx(logp.grad, [[0.0, -1.1 / 6, -0.5 / 6], [0.0, 1.1 / 6, 1.5 / 6]])
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[1, 0].item() == 0.0


@pytest.mark.parametrize(
    "low, high, expected_loss, expected_grad",
    [(0.2, 0.28, -1.25, -1.25), (0.2, 0.2, -1.2, 0.0)],  # DAPO clip-higher vs symmetric
)
def test_clip_higher_is_honoured_for_positive_advantage(low, high, expected_loss, expected_grad):
    old, logp, adv, mask = policy_inputs([[ln(1.25)]], [[1.0]])
    loss, m = get_policy_loss("vanilla")(old, logp, adv, mask, PolicyLossConfig(clip_ratio_low=low, clip_ratio_high=high))
    loss.backward()
    assert approx(loss, expected_loss)
    assert approx(logp.grad, [[expected_grad]])
    assert approx(m["pg_clipfrac"], 0.0 if expected_grad else 1.0)


@pytest.mark.parametrize("low, expected_loss", [(0.2, 0.8), (0.3, 0.75)])
def test_clip_low_is_honoured_for_negative_advantage(low, expected_loss):
    # A = -1, r = 0.75: with low 0.2 the floor is 0.8 -> loss max(0.75, 0.8) = 0.8; with low 0.3 -> 0.75.
    old, logp, adv, mask = policy_inputs([[ln(0.75)]], [[-1.0]])
    loss, _ = get_policy_loss("vanilla")(old, logp, adv, mask, PolicyLossConfig(clip_ratio_low=low, clip_ratio_high=0.28))
    assert approx(loss, expected_loss)


def test_dual_clip_caps_loss_for_very_negative_advantage():
    # A = -5, c = 3. Token 0: r = e^3 ~ 20.09, PPO loss max(5*20.09, 5*1.2) = 100.4 -> capped at 5*3 = 15.
    # Token 1: r = 2.5, PPO loss 12.5 < 15 stays.
    old, logp, adv, mask = policy_inputs([[3.0, ln(2.5)]], [[-5.0, -5.0]])
    loss, m = get_policy_loss("vanilla")(old, logp, adv, mask, PolicyLossConfig(clip_ratio_c=3.0))
    assert approx(loss, (15.0 + 12.5) / 2)
    assert approx(m["pg_clipfrac_lower"], 0.5)
    assert approx(m["pg_clipfrac"], 0.0)
    loss.backward()
    assert approx(logp.grad, [[0.0, 5 * 2.5 / 2]])


def test_policy_loss_passes_denominator_and_agg_mode():
    # Losses -1.1 and 1.1 on valid tokens, third token padded; global token count 10.
    old, logp, adv, mask = policy_inputs([[ln(1.1), ln(1.1), 0.0]], [[1.0, 2.0, 1.0]], [[1, 1, 0]])
    loss, _ = get_policy_loss("vanilla")(old, logp, adv, mask, PolicyLossConfig(), denominator=10)
    assert approx(loss, (-1.1 - 2.2) / 10)
    cfg = PolicyLossConfig(loss_agg_mode="seq-mean-token-sum-norm", max_response_length=4)
    loss, _ = get_policy_loss("vanilla")(old, logp, adv, mask, cfg)
    assert approx(loss, (-1.1 - 2.2) / (1 * 4))


# ----------------------------------------------------------------------------- GSPO

def test_gspo_uses_sequence_ratio_for_value_clipping_and_gradient():
    # Clip range of the paper: [1 - 3e-4, 1 + 4e-4]. seq-mean-token-mean, B = 2.
    # seq 0, A = +2: token log-ratios 0.5, -0.5, 0 -> mean 0 -> s = 1, inside the range, so
    #   NOT clipped although token 0's own ratio e^0.5 = 1.65 is far outside. Loss per token -2.
    # seq 1, A = +1: log-ratios 0.01, 0.03 (third token padded, value 5 ignored) -> mean 0.02,
    #   s = e^0.02 = 1.0202 > 1.0004 -> clipped: loss per token -1.0004, gradient 0.
    old, logp, adv, mask = policy_inputs(
        [[0.5, -0.5, 0.0], [0.01, 0.03, 5.0]], [[2.0] * 3, [1.0] * 3], [[1, 1, 1], [1, 1, 0]]
    )
    cfg = PolicyLossConfig(clip_ratio_low=3e-4, clip_ratio_high=4e-4, loss_agg_mode="seq-mean-token-mean")
    loss, m = get_policy_loss("gspo")(old, logp, adv, mask, cfg)
    assert approx(loss, (-2.0 + -1.0004) / 2)
    assert approx(m["pg_clipfrac"], 2 / 5)  # seq 1's two valid tokens of 5
    assert approx(m["pg_clipfrac_lower"], 0.0)
    assert approx(m["ppo_kl"], -(0.5 - 0.5 + 0.0 + 0.01 + 0.03) / 5)
    loss.backward()
    # d loss / d log_prob_t = -A * s_i / (B * |y_i|) = -2 * 1 / (2 * 3) for seq 0, 0 for the clipped seq.
    assert approx(logp.grad, [[-1 / 3] * 3, [0.0, 0.0, 0.0]])


@pytest.mark.parametrize("high, clipped", [(0.3, False), (0.2, True)])
def test_gspo_sequence_ratio_is_exp_of_mean_log_ratio(high, clipped):
    # One sequence, A = +1, log-ratios 0.1, 0.2, 0.3 -> s = exp(0.2) = 1.2214.
    # high 0.3: s < 1.3, unclipped although token 3's ratio e^0.3 = 1.35 > 1.3; loss -s,
    #   gradient per token -A * s / |y| = -e^0.2 / 3.   high 0.2: s > 1.2 -> loss -1.2, gradient 0.
    old, logp, adv, mask = policy_inputs([[0.1, 0.2, 0.3]], [[1.0] * 3])
    cfg = PolicyLossConfig(clip_ratio_low=0.2, clip_ratio_high=high, loss_agg_mode="seq-mean-token-mean")
    loss, m = get_policy_loss("gspo")(old, logp, adv, mask, cfg)
    loss.backward()
    s = math.exp((0.1 + 0.2 + 0.3) / 3)
    if clipped:
        assert approx(loss, -1.2) and approx(logp.grad, [[0.0] * 3]) and approx(m["pg_clipfrac"], 1.0)
    else:
        assert approx(loss, -s) and approx(logp.grad, [[-s / 3] * 3]) and approx(m["pg_clipfrac"], 0.0)


def test_gspo_respects_configured_agg_mode():
    # Same numbers as above, unclipped (s = 1 for seq 0, A=2; seq 1 clipped at 1.0004, A=1), token-mean:
    old, logp, adv, mask = policy_inputs(
        [[0.5, -0.5, 0.0], [0.01, 0.03, 5.0]], [[2.0] * 3, [1.0] * 3], [[1, 1, 1], [1, 1, 0]]
    )
    cfg = PolicyLossConfig(clip_ratio_low=3e-4, clip_ratio_high=4e-4, loss_agg_mode="token-mean")
    loss, _ = get_policy_loss("gspo")(old, logp, adv, mask, cfg)
    assert approx(loss, (3 * -2.0 + 2 * -1.0004) / 5)


# ----------------------------------------------------------------------------- advantages

GAE_REWARDS = [[0.0, 0.0, 1.0, 5.0]]  # last token is padding: its reward and value must be ignored
GAE_VALUES = [[0.5, 0.6, 0.7, 9.0]]
GAE_MASK = [[1, 1, 1, 0]]
# gamma 0.9, lam 0.8 (gamma * lam = 0.72), V after the last valid token = 0:
#   t=2: delta = 1 + 0.9*0 - 0.7 = 0.3             A2 = 0.3
#   t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03          A1 = 0.03 + 0.72*0.3 = 0.246
#   t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04          A0 = 0.04 + 0.72*0.246 = 0.21712
GAE_ADV = [0.21712, 0.246, 0.3]


def test_gae_by_hand_with_padded_tail():
    adv, ret = compute_gae(T(GAE_REWARDS), T(GAE_VALUES), T(GAE_MASK), gamma=0.9, lam=0.8, whiten=False)
    assert approx(adv, [GAE_ADV + [0.0]])
    assert approx(ret, [[0.21712 + 0.5, 0.246 + 0.6, 0.3 + 0.7, 0.0]])


def test_gae_estimator_whitens_advantages_and_needs_values():
    inputs = AdvantageInputs(T(GAE_REWARDS), T(GAE_MASK), T([0]), values=T(GAE_VALUES))
    adv, ret = get_adv_estimator("gae")(inputs, AdvantageConfig(gamma=0.9, lam=0.8))
    mean = sum(GAE_ADV) / 3
    var = sum((a - mean) ** 2 for a in GAE_ADV) / (3 - 1)  # unbiased, as verl's masked_var
    assert approx(adv, [[(a - mean) / math.sqrt(var + 1e-8) for a in GAE_ADV] + [0.0]], abs=1e-4)
    assert approx(ret, [[0.71712, 0.846, 1.0, 0.0]])
    with pytest.raises(ValueError, match="values"):
        get_adv_estimator("gae")(AdvantageInputs(T(GAE_REWARDS), T(GAE_MASK), T([0])), AdvantageConfig())


def grpo_inputs():
    # Labels need not be contiguous or sorted. Rewards sit on the last valid token.
    #   group 5: scores 1, 0, 0.5   group 2: 0.7 alone
    #   group 9: 0.9, 0.9, 0.9 (all equal; in float32 their sum / 3 is not exactly 0.9)
    rewards = T([[0.0, 1.0], [0.0, 0.0], [0.5, 0.0], [0.0, 0.9], [0.9, 0.0], [0.45, 0.45], [0.0, 0.7]])
    mask = T([[1, 1], [1, 1], [1, 0], [1, 1], [1, 0], [1, 1], [1, 1]], dtype=torch.float32)
    return AdvantageInputs(rewards, mask, T([5, 5, 5, 9, 9, 9, 2]))


def test_grpo_group_normalisation():
    adv, ret = get_adv_estimator("grpo")(grpo_inputs(), AdvantageConfig(epsilon=1e-6))
    # group 5: mean 0.5, unbiased std sqrt((0.25 + 0.25 + 0) / 2) = 0.5
    a = 0.5 / (0.5 + 1e-6)
    # group 2 (size 1): mean 0, std 1 -> 0.7 / (1 + 1e-6)
    single = 0.7 / (1 + 1e-6)
    expected = [[a, a], [-a, -a], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [single, single]]
    assert approx(adv, expected)
    assert torch.equal(adv[3:6], torch.zeros(3, 2))  # equal rewards: exactly 0, no NaN
    assert not torch.isnan(adv).any()
    assert torch.equal(adv, ret)


def test_grpo_without_std_is_dr_grpo():
    adv, _ = get_adv_estimator("grpo")(grpo_inputs(), AdvantageConfig(norm_adv_by_std_in_grpo=False))
    assert approx(adv, [[0.5, 0.5], [-0.5, -0.5], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.7, 0.7]])


def test_grpo_masks_padding():
    rewards = T([[1.0, 0.0], [0.0, 0.0]])
    adv, _ = get_adv_estimator("grpo")(AdvantageInputs(rewards, T([[1, 0], [1, 1]]), T([0, 0])), AdvantageConfig())
    a = 0.5 / (math.sqrt(0.5) + 1e-6)  # mean 0.5, unbiased std sqrt(0.5)
    assert approx(adv, [[a, 0.0], [-a, -a]])


def test_reinforce_plus_plus():
    # gamma 0.5, rewards 0, 1 (+ padded 3): returns-to-go 0 + 0.5*1 = 0.5, 1; whitened: mean 0.75,
    # unbiased var (0.0625 + 0.0625) / 1 = 0.125.
    inputs = AdvantageInputs(T([[0.0, 1.0, 3.0]]), T([[1, 1, 0]]), T([0]))
    adv, ret = get_adv_estimator("reinforce_plus_plus")(inputs, AdvantageConfig(gamma=0.5))
    assert approx(ret, [[0.5, 1.0, 0.0]])
    s = math.sqrt(0.125 + 1e-8)
    assert approx(adv, [[-0.25 / s, 0.25 / s, 0.0]], abs=1e-4)


# ----------------------------------------------------------------------------- aggregation

LOSS = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = T([[1, 1, 1], [1, 1, 0]])


@pytest.mark.parametrize(
    "mode, denominator, expected",
    [
        ("token-mean", None, (1 + 2 + 3 + 4 + 5) / 5),
        ("token-mean", 10, 15 / 10),
        ("seq-mean-token-sum", None, (6 + 9) / 2),
        ("seq-mean-token-sum", 5, 15 / 5),
        ("seq-mean-token-mean", None, (6 / 3 + 9 / 2) / 2),
        ("seq-mean-token-mean", 4, (2 + 4.5) / 4),
        ("seq-mean-token-sum-norm", None, 15 / (2 * 4)),
        ("seq-mean-token-sum-norm", 5, 15 / (5 * 4)),
    ],
)
def test_agg_loss_modes(mode, denominator, expected):
    assert approx(agg_loss(LOSS, MASK, mode, denominator, max_response_length=4), expected)


def test_agg_loss_empty_sequences_and_errors():
    loss = T([[1.0, 2.0, 3.0], [float("inf"), float("nan"), 9.0]])
    mask = T([[1, 1, 1], [0, 0, 0]])
    assert approx(agg_loss(loss, mask, "seq-mean-token-mean"), (2.0 + 0.0) / 2)
    assert approx(agg_loss(loss, mask, "token-mean"), 6 / 3)
    assert approx(agg_loss(loss, torch.zeros(2, 3), "token-mean"), 0.0)
    assert approx(agg_loss(loss, torch.zeros(2, 3), "seq-mean-token-mean"), 0.0)
    with pytest.raises(ValueError, match="max_response_length"):
        agg_loss(LOSS, MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError) as err:
        agg_loss(LOSS, MASK, "sum")
    assert all(m in str(err.value) for m in LOSS_AGG_MODES)


def test_agg_loss_split_invariance():
    loss = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [10.0, 11.0, 12.0]])
    mask = T([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]])
    halves = [(loss[:2], mask[:2]), (loss[2:], mask[2:])]
    # token-mean: 6 valid tokens summing to 1+2+3+4+5+7 = 22
    assert approx(agg_loss(loss, mask, "token-mean"), 22 / 6)
    assert approx(sum(agg_loss(l, m, "token-mean", denominator=6) for l, m in halves), 22 / 6)
    # Without the global count the halves give 15/5 + 7/1 = 10, which is the bug this prevents.
    assert approx(sum(agg_loss(l, m, "token-mean") for l, m in halves), 10.0)
    # seq-mean-token-mean: per-sequence means 2, 4.5, 7, 0 over 4 sequences
    assert approx(agg_loss(loss, mask, "seq-mean-token-mean"), 13.5 / 4)
    assert approx(sum(agg_loss(l, m, "seq-mean-token-mean", denominator=4) for l, m in halves), 13.5 / 4)


def test_masked_helpers():
    x = T([[1.0, 2.0, 3.0, 100.0]])
    m = T([[1, 1, 1, 0]])
    assert approx(masked_mean(x, m), 2.0)
    assert approx(masked_mean(x, m, dim=-1), [2.0])
    # mean 2, unbiased var (1 + 0 + 1) / 2 = 1
    assert approx(masked_whiten(x, m), [[-1.0, 0.0, 1.0, 0.0]], abs=1e-4)
    assert approx(masked_whiten(x, m, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], abs=1e-4)


# ----------------------------------------------------------------------------- KL and critic

def test_kl_penalty_kinds():
    # pi = 0.5, pi_ref = 0.25 and pi = 0.2, pi_ref = 0.6
    logp, ref = T([ln(0.5), ln(0.2)]), T([ln(0.25), ln(0.6)])
    assert approx(kl_penalty(logp, ref, "k1"), [ln(2), -ln(3)])
    assert approx(kl_penalty(logp, ref, "k2"), [0.5 * ln(2) ** 2, 0.5 * ln(3) ** 2])
    # k3 = exp(ref - logp) - (ref - logp) - 1: 0.5 + ln2 - 1 and 3 - ln3 - 1
    k3 = [0.5 + ln(2) - 1, 3 - ln(3) - 1]
    assert approx(kl_penalty(logp, ref, "k3"), k3)
    assert approx(kl_penalty(logp, ref, "low_var_kl"), k3)
    assert approx(kl_penalty(T([0.0]), T([15.0]), "k3"), [10.0])  # e^15 - 16 clamped
    with pytest.raises(ValueError) as err:
        kl_penalty(logp, ref, "k4")
    assert all(k in str(err.value) for k in ("k1", "k2", "k3", "low_var_kl"))


def test_value_loss_takes_larger_of_clipped_and_unclipped():
    # cliprange 0.2:
    #   v=1.0, old=0.5 -> clipped 0.7, R=2:  (1-2)^2 = 1    vs (0.7-2)^2 = 1.69  -> 1.69 (clipped)
    #   v=2.0, old=1.5 -> clipped 1.7, R=2:  0              vs 0.09              -> 0.09 (clipped)
    #   v=0.0, old=0.0 -> clipped 0.0, R=0.5: 0.25          vs 0.25              -> 0.25
    #   v=3.0, old=2.5 -> clipped 2.7, R=2:  1              vs 0.49              -> 1    (unclipped)
    vpreds = T([[1.0, 2.0, 0.0, 3.0]], requires_grad=True)
    loss, m = value_loss(vpreds, T([[2.0, 2.0, 0.5, 2.0]]), T([[0.5, 1.5, 0.0, 2.5]]), torch.ones(1, 4), 0.2)
    assert approx(loss, 0.5 * (1.69 + 0.09 + 0.25 + 1.0) / 4)
    assert approx(m["vf_clipfrac"], 2 / 4)
    loss.backward()
    # clipped tokens have no gradient; unclipped: 0.5 * 2 (v - R) / 4
    assert approx(vpreds.grad, [[0.0, 0.0, (0.0 - 0.5) / 4, (3.0 - 2.0) / 4]])


# ----------------------------------------------------------------------------- registries

def test_registry_errors_list_names():
    with pytest.raises(ValueError) as err:
        get_adv_estimator("ppo2")
    assert "ppo2" in str(err.value) and all(n in str(err.value) for n in ("gae", "grpo", "reinforce_plus_plus"))
    with pytest.raises(ValueError) as err:
        get_policy_loss("dpo")
    assert "dpo" in str(err.value) and "vanilla" in str(err.value) and "gspo" in str(err.value)
    with pytest.raises(ValueError, match="already registered"):
        register_adv_est("grpo")(lambda inputs, cfg: None)


class ThreadAllReduce:
    """Sums a tensor over `n` threads standing in for ranks, in lockstep like dist.all_reduce."""

    def __init__(self, n: int):
        import threading

        self.barrier = threading.Barrier(n)
        self.lock = threading.Lock()
        self.total = None

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        self.barrier.wait()
        with self.lock:
            self.total = t.clone() if self.total is None else self.total + t
        self.barrier.wait()
        out = self.total.clone()
        self.barrier.wait()
        self.total = None
        return out


def test_batch_whitening_over_ranks_equals_whitening_the_whole_batch():
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    rewards, values = torch.randn(6, 5), torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    whole, _ = get_adv_estimator("gae")(AdvantageInputs(rewards, mask, torch.arange(6), values), AdvantageConfig(gamma=0.9, lam=0.8))
    reduce = ThreadAllReduce(2)

    def rank(r):
        rows = slice(3 * r, 3 * r + 3)
        inputs = AdvantageInputs(rewards[rows], mask[rows], torch.arange(3), values[rows])
        return get_adv_estimator("gae")(inputs, AdvantageConfig(gamma=0.9, lam=0.8, reduce=reduce))[0]

    with ThreadPoolExecutor(2) as pool:
        shards = list(pool.map(rank, range(2)))
    assert torch.allclose(torch.cat(shards), whole, atol=1e-5)
    alone = get_adv_estimator("gae")(AdvantageInputs(rewards[:3], mask[:3], torch.arange(3), values[:3]), AdvantageConfig(gamma=0.9, lam=0.8))[0]
    assert not torch.allclose(alone, whole[:3], atol=1e-3)  # whitening one share alone would differ


def test_the_critic_model_has_no_dropout(tiny_model):
    """The value head's train-mode values equal its eval-mode ones (HF's default keeps dropout 0.1)."""
    from transformers import AutoModelForTokenClassification

    from workers.actor import CRITIC_MODEL_KWARGS
    from workers.model import load_pretrained

    ids = torch.arange(3, 19).reshape(2, 8)
    for kwargs, same in ((CRITIC_MODEL_KWARGS, True), ({"num_labels": 1}, False)):
        critic = load_pretrained(str(tiny_model), torch.float32, auto_class=AutoModelForTokenClassification, **kwargs)
        torch.manual_seed(0)
        trained = critic.train()(input_ids=ids).logits
        evaluated = critic.eval()(input_ids=ids).logits
        assert torch.equal(trained, evaluated) is same, kwargs
