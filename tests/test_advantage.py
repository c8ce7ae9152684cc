"""Tests for advantage.py: hand-worked numbers (arithmetic in comments), naive float64 loops written
independently of the vectorised code, invariances, masks, KL values/gradients vs autograd, aggregation
modes vs direct formulas, exact gradient accumulation (4 micro-batches == 1 big batch; 2 simulated
data-parallel ranks with gradient averaging), and sample selection (dynamic sampling, SSR, rank trimming)."""

import math
from dataclasses import replace
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import advantage
from advantage import (AdvantageConfig, Args, aggregate, kl_penalty, loss_normalizer, main, policy_loss,
                       rollout_correction, select_samples)

ESTIMATORS = ["reinforce_pp", "reinforce_pp_baseline", "grpo", "dr_grpo", "rloo"]
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def compute_advantages(scores, mask, group_size, cfg=AdvantageConfig(), kl=None, **fields):
    """advantage.compute_advantages with keyword `fields` replacing cfg's (as in estimator="grpo")."""
    return advantage.compute_advantages(scores, mask, group_size, replace(cfg, **fields), kl=kl)


def correction(old, eng, mask, tis="off", tis_cap=2.0, rollout_mask="off", low=0.5, high=2.0):
    """advantage.rollout_correction with these AdvantageConfig options (--advantage.tis, --advantage.rollout-mask)."""
    cfg = AdvantageConfig(tis=tis, tis_cap=tis_cap, rollout_mask=rollout_mask, rollout_mask_low=low,
                          rollout_mask_high=high)
    return rollout_correction(old, eng, mask, cfg)


def length_mask(lengths, T=None):
    T = T or max(lengths)
    return torch.tensor([[1 if t < L else 0 for t in range(T)] for L in lengths], dtype=torch.bool)


# ----------------------------------------------------------------------------- naive float64 references
def naive_group_adv(scores, n, estimator, unbiased=True, eps=1e-6):
    """Per-response advantage with plain Python floats, one group at a time."""
    out = []
    for g0 in range(0, len(scores), n):
        g = scores[g0:g0 + n]
        mean = sum(g) / n
        for i, s in enumerate(g):
            if estimator == "grpo":
                var = sum((x - mean) ** 2 for x in g) / (n - 1 if unbiased else n)
                out.append((s - mean) / (math.sqrt(var) + eps) if max(g) != min(g) else 0.0)
            elif estimator == "dr_grpo":
                out.append(s - mean)
            elif estimator == "rloo":
                others = [x for j, x in enumerate(g) if j != i]
                out.append(s - sum(others) / len(others))
            elif estimator == "reinforce_pp_baseline":
                out.append(s - mean)
            else:
                out.append(s)
    return out


def naive_reinforce(seq_scores, lengths, T, gamma, kl=None, beta=0.0, unbiased=True, eps=1e-8, shift=False):
    """Token rewards -> returns by an explicit backward loop -> whitening over valid tokens."""
    B = len(seq_scores)
    ret = [[0.0] * T for _ in range(B)]
    for i in range(B):
        G = 0.0
        for t in range(T - 1, -1, -1):
            r = 0.0
            if t < lengths[i]:
                r -= beta * (kl[i][t] if kl is not None else 0.0)
                if t == lengths[i] - 1:
                    r += seq_scores[i]
            G = r + gamma * G
            ret[i][t] = G
    vals = [ret[i][t] for i in range(B) for t in range(lengths[i])]
    N = len(vals)
    mu = sum(vals) / N
    var = sum((v - mu) ** 2 for v in vals) / (N - 1 if unbiased else N)
    out = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(lengths[i]):
            out[i][t] = (ret[i][t] - mu) / math.sqrt(var + eps) + (mu if shift else 0.0)
    return out


# ----------------------------------------------------------------------------- estimators: by hand
def test_grpo_by_hand():
    # group 0 = [1, 0, 0]: mean 1/3; deviations 2/3, -1/3, -1/3; unbiased var = (4/9 + 1/9 + 1/9) / 2 = 1/3,
    # std = 0.577350; A = (2/3)/0.577350 = 1.154701, (-1/3)/0.577350 = -0.577350. group 1 = [1,1,1]: 0.
    adv = compute_advantages(torch.tensor([1., 0, 0, 1, 1, 1]), torch.ones(6, 2), 3, estimator="grpo", eps=0.0)
    assert torch.allclose(adv[:, 0], torch.tensor([1.154701, -0.577350, -0.577350, 0, 0, 0]), atol=1e-6)
    assert torch.equal(adv[:, 0], adv[:, 1])
    # biased: var = (6/9)/3 = 2/9, std = 0.471405; A = 0.666667/0.471405 = 1.414214, -0.707107
    adv = compute_advantages(torch.tensor([1., 0, 0]), torch.ones(3, 1), 3, estimator="grpo", eps=0.0,
                             std_unbiased=False)
    assert torch.allclose(adv[:, 0], torch.tensor([1.414214, -0.707107, -0.707107]), atol=1e-6)
    # eps matters: 1/(std + 0.1) with group [2, 0]: mean 1, unbiased std = sqrt((1 + 1)/1) = 1.414214
    # A = 1/(1.414214 + 0.1) = 0.660413
    adv = compute_advantages(torch.tensor([2., 0]), torch.ones(2, 1), 2, estimator="grpo", eps=0.1)
    assert torch.allclose(adv[:, 0], torch.tensor([0.660413, -0.660413]), atol=1e-6)


def test_dr_grpo_and_rloo_by_hand():
    s, m = torch.tensor([1., 0, 0, 0.5, 1, 0]), torch.ones(6, 1)
    # dr_grpo: group 0 mean 1/3 -> [2/3, -1/3, -1/3]; group 1 mean 0.5 -> [0, 0.5, -0.5]
    assert torch.allclose(compute_advantages(s, m, 3, estimator="dr_grpo")[:, 0],
                          torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0.5, -0.5]), atol=1e-7)
    # rloo: 1 - (0+0)/2 = 1; 0 - (1+0)/2 = -0.5; group 1: 0.5 - (1+0)/2 = 0; 1 - 0.25 = 0.75; 0 - 0.75 = -0.75
    assert torch.allclose(compute_advantages(s, m, 3, estimator="rloo")[:, 0],
                          torch.tensor([1, -0.5, -0.5, 0, 0.75, -0.75]), atol=1e-7)


def test_reinforce_pp_by_hand():
    # scores [1, 0], lengths [2, 3], gamma 1: returns [[1, 1, pad], [0, 0, 0]].
    # valid values 1,1,0,0,0: mean 0.4; unbiased var = (2*0.36 + 3*0.16)/4 = 0.3; rsqrt(0.3) = 1.825742
    # whitened: 0.6*1.825742 = 1.095445; -0.4*1.825742 = -0.730297
    adv = compute_advantages(torch.tensor([1., 0]), length_mask([2, 3]), 1, AdvantageConfig(whiten_eps=0.0))
    exp = torch.tensor([[1.095445, 1.095445, 0], [-0.730297, -0.730297, -0.730297]])
    assert torch.allclose(adv, exp, atol=1e-6) and adv[0, 2] == 0
    # shift_mean adds mu = 0.4 back: 1.495445, -0.330297
    adv = compute_advantages(torch.tensor([1., 0]), length_mask([2, 3]), 1,
                             AdvantageConfig(whiten_eps=0.0, shift_mean=True))
    assert torch.allclose(adv[1], torch.tensor([-0.330297] * 3), atol=1e-6) and adv[0, 2] == 0


def test_reinforce_pp_gamma_and_reward_kl_by_hand():
    # one response of 3 tokens (plus a second to make whitening defined), gamma 0.5, beta 0.1, kl = [1, 2, 3]
    # row 0 rewards: [-0.1, -0.2, -0.3 + 1] = [-0.1, -0.2, 0.7]
    #   G2 = 0.7; G1 = -0.2 + 0.5*0.7 = 0.15; G0 = -0.1 + 0.5*0.15 = -0.025
    # row 1 (score 0, length 1, kl 4): G0 = -0.4
    # values -0.025, 0.15, 0.7, -0.4: mean = 0.425/4 = 0.10625
    # dev: -0.13125, 0.04375, 0.59375, -0.50625; sq: 0.017227, 0.001914, 0.352539, 0.256289 -> sum 0.627969
    # var = 0.627969/3 = 0.209323, std = 0.457518
    cfg = AdvantageConfig(gamma=0.5, kl_coef=0.1, kl_in_loss=False, whiten_eps=0.0)
    kl = torch.tensor([[1., 2, 3], [4, float("nan"), float("nan")]])  # NaN on padding must be ignored
    adv = compute_advantages(torch.tensor([1., 0]), length_mask([3, 1]), 1, cfg, kl=kl)
    exp = torch.tensor([[-0.13125, 0.04375, 0.59375], [-0.50625, 0, 0]]) / 0.457518
    exp[1, 1:] = 0
    assert torch.allclose(adv, exp, atol=1e-5)
    with pytest.raises(ValueError, match="kl"):
        compute_advantages(torch.tensor([1., 0]), length_mask([3, 1]), 1, cfg)  # kl missing


def test_reinforce_pp_baseline_by_hand():
    # scores [1, 0 | 0, 0], n = 2, lengths [1, 2, 1, 1] -> centred [0.5, -0.5, 0, 0] on every token:
    # values 0.5, -0.5, -0.5, 0, 0: mean -0.1; dev 0.6, -0.4, -0.4, 0.1, 0.1; sq sum 0.36+0.16+0.16+0.01+0.01 = 0.7
    # var = 0.7/4 = 0.175, std = 0.418330 -> 1.434274, -0.956183, 0.239046 (constant group ends at +0.239, not 0)
    adv = compute_advantages(torch.tensor([1., 0, 0, 0]), length_mask([1, 2, 1, 1]), 2,
                             estimator="reinforce_pp_baseline", whiten_eps=0.0)
    exp = torch.tensor([[1.434274, 0], [-0.956183, -0.956183], [0.239046, 0], [0.239046, 0]])
    assert torch.allclose(adv, exp, atol=1e-6)


# ----------------------------------------------------------------------------- estimators: vs naive loops
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("unbiased", [True, False])
def test_estimators_match_naive_loop(estimator, unbiased):
    rng = random.Random(10 * ESTIMATORS.index(estimator) + unbiased)   # not hash(): str hashes change per process
    n, P, T = 4, 5, 7
    scores = [rng.choice([0.0, 1.0, -0.1, 0.5, rng.gauss(0, 1)]) for _ in range(n * P)]
    scores[:n] = [1.0] * n  # one constant group
    lengths = [rng.randint(1, T) for _ in range(n * P)]
    adv = compute_advantages(torch.tensor(scores), length_mask(lengths, T), n, estimator=estimator,
                             std_unbiased=unbiased, kl_coef=0.0)
    seq = naive_group_adv(scores, n, estimator, unbiased)
    if estimator.startswith("reinforce"):
        exp = naive_reinforce(seq, lengths, T, 1.0, unbiased=unbiased)
    else:
        exp = [[seq[i] if t < lengths[i] else 0.0 for t in range(T)] for i in range(n * P)]
    assert adv.dtype == torch.float32
    assert torch.allclose(adv.double(), torch.tensor(exp, dtype=torch.float64), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("shift", [False, True])
def test_reinforce_pp_with_reward_kl_matches_naive_loop(gamma, shift):
    g = torch.Generator().manual_seed(3)
    B, T = 6, 9
    scores = torch.randint(0, 2, (B,), generator=g).double()
    lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
    kl = torch.rand(B, T, generator=g, dtype=torch.float64)
    cfg = AdvantageConfig(gamma=gamma, kl_coef=0.05, kl_in_loss=False, shift_mean=shift)
    adv = compute_advantages(scores, length_mask(lengths, T), 1, cfg, kl=kl)
    exp = naive_reinforce(scores.tolist(), lengths, T, gamma, kl.tolist(), 0.05, shift=shift)
    assert adv.dtype == torch.float64
    assert torch.allclose(adv, torch.tensor(exp, dtype=torch.float64), atol=1e-12)


# ----------------------------------------------------------------------------- invariances, masks, errors
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_shift_invariance_and_grpo_scale_invariance(estimator):
    g = torch.Generator().manual_seed(0)
    s = torch.rand(12, generator=g, dtype=torch.float64)
    m = torch.ones(12, 3)
    base = compute_advantages(s, m, 4, estimator=estimator)
    shift = torch.tensor([3.0, -7.0, 0.25], dtype=torch.float64).repeat_interleave(4)  # per-group constants
    assert torch.allclose(compute_advantages(s + shift, m, 4, estimator=estimator), base, atol=1e-9)
    if estimator == "grpo":  # eps is tiny vs std, so scaling by 5 changes A by ~eps only
        assert torch.allclose(compute_advantages(5 * s, m, 4, estimator=estimator), base, atol=1e-4)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_masks_respected_and_constant_groups_zero(estimator):
    mask = length_mask([3, 1, 2, 2], 4)
    mask[0, 1] = False  # a hole inside a response
    s = torch.tensor([0.3, 0.3, 1.0, 0.0])  # group 0 constant (0.3 is not exact in binary)
    adv = compute_advantages(s, mask, 2, estimator=estimator, kl_coef=0.0)
    assert torch.isfinite(adv).all() and (adv[~mask] == 0).all()
    if estimator in ("grpo", "dr_grpo", "rloo"):
        assert (adv[:2] == 0).all()  # exactly zero, not rounding noise
    all_equal = compute_advantages(torch.full((4,), 0.1), mask, 2, estimator=estimator, kl_coef=0.0)
    assert (all_equal == 0).all()  # whitening of identical values is 0, never NaN / amplified noise
    # 3 tokens of 0.7: the float64 mean is off by 1 ulp (1.1e-16); without the equal-values guard, whitening
    # with eps 0 would blow that up to O(1) advantages.
    seven = compute_advantages(torch.full((2,), 0.7, dtype=torch.float64), length_mask([2, 1]), 1,
                               estimator="reinforce_pp", kl_coef=0.0, whiten_eps=0.0)
    assert (seven == 0).all()


def test_bad_inputs_raise_naming_the_field():
    m = torch.ones(6, 2)
    for est in ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"]:
        with pytest.raises(ValueError, match="group_size"):
            compute_advantages(torch.ones(6), m, 1, estimator=est)
    with pytest.raises(ValueError, match="group_size"):
        compute_advantages(torch.ones(6), m, 4, estimator="grpo")  # 4 does not divide 6
    with pytest.raises(ValueError, match="scores"):
        compute_advantages(torch.tensor([1., float("nan"), 0, 0, 1, 0]), m, 3, estimator="grpo")
    with pytest.raises(ValueError, match="mask"):
        compute_advantages(torch.ones(6), torch.ones(5, 2), 3, estimator="grpo")
    with pytest.raises(ValueError, match="mask"):
        compute_advantages(torch.ones(6), torch.full((6, 2), 0.5), 3, estimator="grpo")
    with pytest.raises(ValueError, match="mask"):  # whitening over a single token is undefined
        compute_advantages(torch.ones(2), length_mask([1, 0], 2), 1)
    with pytest.raises(ValueError, match="kl_in_loss"):
        AdvantageConfig(estimator="grpo", kl_in_loss=False)
    with pytest.raises(ValueError, match="dual-clip"):
        AdvantageConfig(dual_clip=0.5)
    with pytest.raises(ValueError, match="estimator"):
        AdvantageConfig(estimator="ppo")


# ----------------------------------------------------------------------------- KL
def test_kl_values_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    # delta = 0.5, 0: k1 = 0.5; k2 = 0.125; k3 = e^-0.5 + 0.5 - 1 = 0.606531 - 0.5 = 0.106531
    assert torch.allclose(kl_penalty(logp, ref, "k1"), torch.tensor([0.5, 0.0]))
    assert torch.allclose(kl_penalty(logp, ref, "k2"), torch.tensor([0.125, 0.0]))
    assert torch.allclose(kl_penalty(logp, ref, "k3"), torch.tensor([0.106531, 0.0]), atol=1e-6)
    # verl clamps: delta = -30 -> -delta clamped to 20: e^20 - 20 - 1 > 10 -> 10;  delta = 30 -> e^-20 + 19 -> 10
    assert torch.equal(kl_penalty(torch.tensor([-30.0, 30.0]), torch.zeros(2), "k3"), torch.tensor([10.0, 10.0]))
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(logp, ref, "k4")


def test_k3_and_ppo_extremes_give_finite_values_and_gradients():
    # float32, delta = -100: exp(100) overflows; the verl clamps keep value 10 and gradient 0, not inf/NaN.
    x = torch.tensor([-100.0, -15.0, 100.0], requires_grad=True)
    kl = kl_penalty(x, torch.zeros(3), "k3")
    kl.sum().backward()
    assert torch.equal(kl.detach(), torch.tensor([10.0, 10.0, 10.0]))  # e^15 - 15 - 1 > 10 is clamped too
    assert torch.equal(x.grad, torch.zeros(3))
    logp = torch.tensor([[100.0, -100.0]], requires_grad=True)  # log-ratios far outside +-20
    loss, met = policy_loss(logp, torch.zeros(1, 2), torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2),
                            AdvantageConfig(kl_coef=0.0, dual_clip=3.0))
    loss.backward()
    # t0: A=-1, rho=e^20 -> min(max(e^20, 1.2), 3) = 3; t1: A=1, rho=e^-20 -> max(-e^-20, -0.8) ~ 0
    assert abs(loss.item() - 3.0 / 2) < 1e-6 and torch.isfinite(logp.grad).all()
    assert math.isfinite(met["training/ratio_mean"])


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_gradient_matches_autograd_of_direct_formula(kind):
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(3, 5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    ref = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    direct = {"k1": lambda a, b: a - b, "k2": lambda a, b: (a - b) ** 2 / 2,
              "k3": lambda a, b: torch.exp(b - a) - (b - a) - 1}[kind]
    w = torch.rand(3, 5, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad((kl_penalty(logp, ref, kind) * w).sum(), logp)
    (gd,) = torch.autograd.grad((direct(logp, ref) * w).sum(), logp)
    assert torch.allclose(kl_penalty(logp, ref, kind), direct(logp, ref), atol=1e-12)
    assert torch.allclose(gx, gd, atol=1e-12)
    # hand gradients: d k1 = 1; d k2 = delta; d k3 = 1 - exp(-delta)
    delta = (logp - ref).detach()
    hand = {"k1": torch.ones_like(delta), "k2": delta, "k3": 1 - torch.exp(-delta)}[kind]
    assert torch.allclose(gx, hand * w, atol=1e-12)


# ----------------------------------------------------------------------------- policy loss
def test_ppo_per_token_by_hand():
    # one sequence, 4 tokens, token-mean; eps_low = eps_high = 0.2
    # t0: A=+1, rho=1.5 -> max(-1.5, -1.2) = -1.2 (clipped)
    # t1: A=+1, rho=0.5 -> max(-0.5, -0.8) = -0.5 (not clipped: pessimistic side)
    # t2: A=-1, rho=1.5 -> max(1.5, 1.2) = 1.5 (unclipped branch); with dual clip c=1.2: min(1.5, 1.2) = 1.2
    # t3: A=-2, rho=0.5 -> max(1.0, 1.6) = 1.6 (clipped)
    rho = torch.tensor([[1.5, 0.5, 1.5, 0.5]])
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, -2.0]])
    m = torch.ones(1, 4, dtype=torch.bool)
    loss, met = policy_loss(rho.log(), old, adv, m, AdvantageConfig(kl_coef=0.0))
    assert abs(loss.item() - (-1.2 - 0.5 + 1.5 + 1.6) / 4) < 1e-6  # 1.4/4 = 0.35
    assert met["training/clipfrac"] == 0.5 and met["training/n_tokens"] == 4
    assert abs(met["training/ratio_mean"] - 1.0) < 1e-6  # (1.5+0.5+1.5+0.5)/4
    assert abs(met["training/approx_kl"] - 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2) < 1e-6
    loss, met = policy_loss(rho.log(), old, adv, m, AdvantageConfig(kl_coef=0.0, dual_clip=1.2))
    # dual clip, c=1.2 (>1 required; small to make it bite): t2 -> 1.2; t3: min(1.6, 2.4) = 1.6
    assert abs(loss.item() - (-1.2 - 0.5 + 1.2 + 1.6) / 4) < 1e-6 and met["training/dual_clipfrac"] == 0.25
    # clip-higher: eps_high = 0.6 -> t0 max(-1.5, -1.5) = -1.5
    loss, _ = policy_loss(rho.log(), old, adv, m, AdvantageConfig(kl_coef=0.0, clip_high=0.6))
    assert abs(loss.item() - (-1.5 - 0.5 + 1.5 + 1.6) / 4) < 1e-6


def test_ppo_gradient_by_hand():
    # d/dlogp of -A*rho is -A*rho when unclipped and 0 when the clipped branch wins.
    rho = torch.tensor([[1.5, 0.5, 1.5, 0.5]], dtype=torch.float64)
    logp = rho.log().requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -2.0]], dtype=torch.float64)
    loss, _ = policy_loss(logp, torch.zeros(1, 4), adv, torch.ones(1, 4), AdvantageConfig(kl_coef=0.0))
    loss.backward()
    # t0 clipped -> 0; t1 -> -1*0.5/4 = -0.125; t2 -> +1*1.5/4 = 0.375; t3 clipped -> 0
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.125, 0.375, 0.0]], dtype=torch.float64))


def test_gspo_sequence_ratio_by_hand():
    # Two responses, both with mean log-ratio 0.1 (old_logp = 0): s = e^0.1 = 1.1051709 for both, clip at 1 +- 0.05.
    logp = torch.tensor([[0.1, -0.2, 0.4], [0.3, -0.1, 5.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])                      # row 1's third token is padding
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3], dtype=torch.float64)
    cfg = AdvantageConfig(kl_coef=0.0, ratio="sequence", clip_low=0.05, clip_high=0.05, loss_agg="seq-mean-token-mean")
    loss, m = policy_loss(logp, torch.zeros(2, 3), adv, mask, cfg)
    s = math.exp(0.1)
    # row 0 (A=1): max(-s, -1.05) = -1.05, clipped; row 1 (A=-1): max(s, 1.05) = s. Mean over the two sequences:
    assert loss.item() == pytest.approx((-1.05 + s) / 2, abs=1e-12)
    loss.backward()
    # row 0 clipped: no gradient. Row 1: d/dlogp_t of (1/2) s with s = exp(mean of 2 tokens) is s / 4 per token.
    assert torch.allclose(logp.grad, torch.tensor([[0, 0, 0], [s / 4, s / 4, 0]], dtype=torch.float64), atol=1e-12)
    assert m["training/clipfrac"] == pytest.approx(3 / 5)       # row 0's 3 tokens of 5 valid ones
    assert m["training/ratio_mean"] == pytest.approx(s)          # every valid token carries its sequence's ratio
    # The token ratio on the same batch differs (row 0's tokens have ratios e^0.1, e^-0.2, e^0.4): it is not GSPO.
    token, _ = policy_loss(logp.detach(), torch.zeros(2, 3), adv, mask, replace(cfg, ratio="token"))
    assert abs(token.item() - loss.item()) > 1e-3


def test_gspo_equals_the_sequence_level_objective():
    """GSPO (Zheng 2025, eq. 5-7) written per sequence, in float64, vs policy_loss(ratio='sequence'): value and
    gradient, on a random batch with padding garbage (NaN in old_logp) and an empty response."""
    logp, old, _, adv, m = random_batch()
    adv = adv[:, :1].expand_as(adv) * m                         # GSPO: one advantage per response
    cfg = AdvantageConfig(kl_coef=0.0, ratio="sequence", clip_low=0.1, clip_high=0.15, loss_agg="seq-mean-token-mean")
    x = logp.clone().requires_grad_()
    loss, _ = policy_loss(x, old, adv, m, cfg)
    loss.backward()
    y = logp.clone().requires_grad_()
    terms = []
    for i in range(m.shape[0]):
        if (n := int(m[i].sum())) == 0:
            continue
        s = torch.exp(sum(y[i, t] - old[i, t] for t in range(m.shape[1]) if m[i, t]) / n)
        a = float(adv[i, 0])
        terms.append(torch.maximum(-a * s, -a * s.clamp(1 - 0.1, 1 + 0.15)))
    direct = sum(terms) / len(terms)
    direct.backward()
    assert abs(loss.item() - direct.item()) < 1e-12 and torch.allclose(x.grad, y.grad, atol=1e-12)
    assert x.grad.abs().sum() > 0 and not torch.isnan(x.grad).any()


def direct_agg(l, m, mode, L):
    """Direct formulas, one loop per sequence."""
    seq = []
    for i in range(l.shape[0]):
        toks = [l[i, t] for t in range(l.shape[1]) if m[i, t]]
        if not toks:
            continue
        if mode == "token-mean":
            seq.append(toks)
        elif mode == "seq-mean-token-mean":
            seq.append(sum(toks) / len(toks))
        elif mode == "seq-mean-token-sum":
            seq.append(sum(toks))
        else:
            seq.append(sum(toks) / L)
    if mode == "token-mean":
        flat = [x for s in seq for x in s]
        return sum(flat) / len(flat)
    return sum(seq) / len(seq)


def random_batch(B=8, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
    lengths[2] = 0  # an empty response: counts for nothing
    m = length_mask(lengths, T)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) * m
    old[~m] = float("nan")  # garbage on padding must not leak into loss or gradient
    return logp, old, ref, adv, m


@pytest.mark.parametrize("mode", AGGS)
def test_aggregation_modes_against_direct_formula(mode):
    logp, old, ref, adv, m = random_batch()
    cfg = AdvantageConfig(loss_agg=mode, kl_coef=0.0, dual_clip=3.0, norm_len=m.shape[1])
    loss, met = policy_loss(logp, old, adv, m, cfg)
    rho = (logp - old).exp()
    per_tok = torch.maximum(-adv * rho, -adv * rho.clamp(0.8, 1.2))
    per_tok = torch.where(adv < 0, torch.minimum(per_tok, -3.0 * adv), per_tok)
    assert abs(loss.item() - direct_agg(per_tok, m, mode, m.shape[1])) < 1e-12
    assert loss.item() == met["loss/policy_loss"] and met["loss/kl_loss"] == 0
    # KL in the loss: + beta * the same aggregation of k3
    cfg = AdvantageConfig(loss_agg=mode, kl_coef=0.1, dual_clip=3.0, norm_len=10)
    loss2, met2 = policy_loss(logp, old, adv, m, cfg, ref_logp=ref)
    k3 = torch.exp(ref - logp) - (ref - logp) - 1
    exp_kl = direct_agg(k3, m, mode, 10)
    assert abs(met2["loss/kl_loss"] - exp_kl) < 1e-12
    assert abs(loss2.item() - direct_agg(per_tok, m, mode, 10) - 0.1 * exp_kl) < 1e-12


@pytest.mark.parametrize("mode", AGGS)
def test_four_micro_batches_equal_one_big_batch(mode):
    logp, old, ref, adv, m = random_batch(B=12, T=7, seed=5)
    cfg = AdvantageConfig(loss_agg=mode, kl_coef=0.01, norm_len=7, clip_high=0.28)
    big = logp.clone().requires_grad_()
    loss_big, _ = policy_loss(big, old, adv, m, cfg, ref_logp=ref)
    loss_big.backward()
    acc = logp.clone().requires_grad_()
    chunks = [slice(0, 2), slice(2, 5), slice(5, 9), slice(9, 12)]  # unequal micro-batches
    norm = sum(loss_normalizer(m[c], cfg.loss_agg) for c in chunks)
    total = 0.0
    for c in chunks:
        loss_c, _ = policy_loss(acc[c], old[c], adv[c], m[c], cfg, normalizer=norm, ref_logp=ref[c])
        loss_c.backward()
        total += loss_c.item()
    assert torch.isfinite(acc.grad).all() and acc.grad.abs().sum() > 0
    assert abs(total - loss_big.item()) < 1e-6
    assert torch.allclose(acc.grad, big.grad, atol=1e-6, rtol=0)
    # Two data-parallel ranks, 2 micro-batches each, gradients AVERAGED (FSDP2): loss * world_size.
    W, ranks = 2, [[slice(0, 2), slice(2, 5)], [slice(5, 9), slice(9, 12)]]
    grads = []
    for rank_chunks in ranks:
        x = logp.clone().requires_grad_()
        for c in rank_chunks:
            loss_c, _ = policy_loss(x[c], old[c], adv[c], m[c], cfg, normalizer=norm, ref_logp=ref[c])
            (W * loss_c).backward()
        grads.append(x.grad)
    assert torch.allclose(sum(grads) / W, big.grad, atol=1e-6, rtol=0)


def test_policy_loss_rejects_bad_inputs():
    logp, old, ref, adv, m = random_batch()
    no_kl = AdvantageConfig(kl_coef=0.0)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old, adv[:, :3], m, no_kl)
    with pytest.raises(ValueError, match="ref_logp"):  # default cfg asks for KL in the loss
        policy_loss(logp, old, adv, m)
    bad = logp.clone()
    bad[0, 0] = float("nan")  # a valid token
    with pytest.raises(ValueError, match="non-finite"):
        policy_loss(bad, old, adv, m, no_kl)
    with pytest.raises(ValueError, match="normalizer"):
        policy_loss(logp, old, adv, torch.zeros_like(m), no_kl)
    with pytest.raises(ValueError, match="normalizer"):
        aggregate(logp, m, "token-mean", normalizer=0.0)


# ----------------------------------------------------------------------------- rollout correction
NAN = float("nan")


def mismatch_batch():
    """Log-probs with given ratios rho = pi_old / pi_engine: NaN = a token the engine did not sample (a Forced
    Rethinking trigger); the mask's zeros are padding, holding ratios (3, 7, 0.1) that must change nothing."""
    rho = torch.tensor([[2.0, 0.5, NAN, 3.0], [1.44, NAN, 7.0, 0.1], [1.1, 1.1, 1.1, 1.1]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    old = torch.full((3, 4), math.log(0.5), dtype=torch.float64)
    return old, old - rho.log(), mask


def test_rollout_correction_hand_worked():
    """Truncated importance weights: pi_old / pi_engine = 0.5 / 0.25 = 2 and 0.2 / 0.4 = 0.5; a token the engine did
    not sample (NaN) counts as 1; padding gets 0 (and its ratio 0.9 / 0.1 = 9 is left out of the product)."""
    old = torch.log(torch.tensor([[0.5, 0.2, 0.3, 0.9], [0.5, 0.4, 0.3, 0.9]]))
    eng = torch.log(torch.tensor([[0.25, 0.4, float("nan"), 0.1], [0.25, 0.4, 0.3, 0.1]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])      # the 4th token is padding
    w = lambda kind, cap=1.5: correction(old, eng, mask, tis=kind, tis_cap=cap)[0]
    assert torch.allclose(w("token"), torch.tensor([[1.5, 0.5, 1.0, 0.0], [1.5, 1.0, 1.0, 0.0]]))  # 2 capped at 1.5
    # sequence: row 0: 2 * 0.5 * 1 = 1; row 1: 2 * 1 * 1 = 2 -> capped at 1.5
    assert torch.allclose(w("sequence"), torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.5, 1.5, 1.5, 0.0]]))
    assert torch.allclose(w("sequence", cap=4.0)[1, :3], torch.tensor([2.0, 2.0, 2.0]))
    assert torch.equal(w("off"), mask)
    # sums over the 6 valid tokens: token, cap 1.5: 1.5 + 0.5 + 1 + 1.5 + 1 + 1 = 6.5, 2 tokens above the cap
    assert correction(old, eng, mask, "token", 1.5)[1] == pytest.approx(
        {"training/tis_weight": 6.5, "training/tis_capped": 2, "training/rollout_masked": 0})


def test_rollout_mask_token_is_icepop():
    """rollout_mask token (IcePop), band [0.6, 1.5], on mismatch_batch. Row 0: rho 2 and 0.5 leave the band (w = 0),
    the unsampled token counts as rho 1 (kept); row 1: 1.44 and the unsampled token are kept; row 2: 1.1 x 4 kept.
    With tis token and C = 5 >= high, w is IcePop's M(rho) = rho inside the band, 0 outside:
    [[0, 0, 1, 0], [1.44, 1, 0, 0], [1.1, 1.1, 1.1, 1.1]]. Sums over the 9 valid tokens: truncated weights
    2 + 0.5 + 1 + 1.44 + 1 + 4 x 1.1 = 10.34, none above 5, 2 masked. Without tis, w is the 0/1 mask."""
    old, eng, mask = mismatch_batch()
    w, sums = correction(old, eng, mask, "token", 5.0, "token", 0.6, 1.5)
    assert torch.allclose(w, torch.tensor([[0, 0, 1, 0], [1.44, 1, 0, 0], [1.1] * 4], dtype=torch.float64))
    assert sums == pytest.approx({"training/tis_weight": 10.34, "training/tis_capped": 0, "training/rollout_masked": 2})
    w, _ = correction(old, eng, mask, "off", 2.0, "token", 0.6, 1.5)
    assert torch.equal(w, torch.tensor([[0, 0, 1, 0], [1, 1, 0, 0], [1] * 4], dtype=torch.float64))


def test_rollout_mask_sequence_is_masked_is():
    """rollout_mask sequence (masked IS), band [0.7, 1.45], tis sequence, C = 1.2, on mismatch_batch. Row 0:
    prod 2 x 0.5 x 1 = 1 is inside (though 2 and 0.5 would leave a token band; with its padding's 3 it would be 3):
    w = 1; row 1: 1.44 x 1 = 1.44 inside: w = min(1.44, 1.2) = 1.2, capped; row 2: 1.1^4 = 1.4641 > 1.45, so all
    4 tokens are masked although each 1.1 is inside. w = [[1, 1, 1, 0], [1.2, 1.2, 0, 0], [0, 0, 0, 0]]; sums:
    weights 3 x 1 + 2 x 1.2 + 4 x 1.2 = 10.2, capped 2 + 4 = 6, masked 4."""
    old, eng, mask = mismatch_batch()
    w, sums = correction(old, eng, mask, "sequence", 1.2, "sequence", 0.7, 1.45)
    assert torch.allclose(w, torch.tensor([[1, 1, 1, 0], [1.2, 1.2, 0, 0], [0] * 4], dtype=torch.float64))
    assert sums == pytest.approx({"training/tis_weight": 10.2, "training/tis_capped": 6, "training/rollout_masked": 4})


def test_rollout_mask_geometric_means_over_sampled_tokens():
    """rollout_mask geometric, band [0.8, 1.25], no tis, on mismatch_batch. Row 0: over its two sampled tokens
    exp((log 2 + log 0.5) / 2) = 1: kept (with its padding's 3: (2 x 0.5 x 3)^(1/3) = 1.44, masked); row 1: one
    sampled token, 1.44 > 1.25: masked (counting the unsampled token as rho 1 would give sqrt(1.44) = 1.2, kept);
    row 2: 1.1: kept. w = [[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], 2 tokens masked."""
    old, eng, mask = mismatch_batch()
    w, sums = correction(old, eng, mask, "off", 2.0, "geometric", 0.8, 1.25)
    assert torch.equal(w, torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float64))
    assert sums["training/rollout_masked"] == 2


def test_rollout_correction_options_are_refused_naming_the_flag():
    """AdvantageConfig refuses them, so a Python caller and a command line (tyro reports it) see the same words."""
    high = "--advantage.rollout-mask-high"
    for bad, words in (({"tis": "geometric"}, "--advantage.tis 'geometric': must be one of ('off', 'token', 'seq"),
                       ({"rollout_mask": "icepop"}, "--advantage.rollout-mask 'icepop': must be one of"),
                       ({"tis_cap": 0.5}, "--advantage.tis-cap 0.5: must be >= 1"),
                       ({"rollout_mask_low": 0.0}, f"--advantage.rollout-mask-low 0.0: with {high} 2.0"),
                       ({"rollout_mask_low": 1.2, "rollout_mask_high": 1.5}, f"-low 1.2: with {high} 1.5"),
                       ({"rollout_mask_high": 0.9}, f"-low 0.5: with {high} 0.9"),
                       ({"rollout_mask_low": 1.0, "rollout_mask_high": 1.0}, f"-low 1.0: with {high} 1.0")):
        with pytest.raises(ValueError) as e:
            AdvantageConfig(**bad)
        assert words in str(e.value), (bad, str(e.value))
    AdvantageConfig(tis="sequence", tis_cap=1.0, rollout_mask="geometric", rollout_mask_low=0.999,
                    rollout_mask_high=1.001)                             # the edges of what is allowed


def test_masked_weighted_loss_by_hand_in_float64():
    """policy_loss(A * w), w from rollout_correction (tis token, C = 1.5, rollout_mask token, band [0.5, 2]),
    equals the masked, weighted clipped loss summed by hand in float64: sum over kept tokens of
    min(rho, 1.5) * max(-A r, -A clip(r, 0.8, 1.28)) / N, N = every valid token (masked ones stay in the normaliser)."""
    g = torch.Generator().manual_seed(5)
    lengths, T = [6, 4, 1, 5], 6
    logp = -0.1 - torch.rand(4, T, generator=g, dtype=torch.float64)
    old = logp + 0.1 * torch.randn(4, T, generator=g, dtype=torch.float64)
    eng = old + 0.8 * torch.randn(4, T, generator=g, dtype=torch.float64)
    eng[1, 2] = NAN                                                       # a token the engine did not sample
    adv = torch.randn(4, T, generator=g, dtype=torch.float64)
    mask = length_mask(lengths, T)
    w, _ = correction(old, eng, mask, "token", 1.5, "token", 0.5, 2.0)
    loss, _ = policy_loss(logp, old, adv * w, mask, AdvantageConfig(kl_coef=0.0, clip_high=0.28))
    total, masked, capped = 0.0, 0, 0
    for i, n in enumerate(lengths):
        for t in range(n):
            rho = 1.0 if math.isnan(eng[i, t].item()) else math.exp(old[i, t].item() - eng[i, t].item())
            if not 0.5 <= rho <= 2.0:
                masked += 1
                continue
            capped += rho > 1.5
            r, a = math.exp(logp[i, t].item() - old[i, t].item()), adv[i, t].item()
            total += min(rho, 1.5) * max(-a * r, -a * min(max(r, 0.8), 1.28))
    assert masked > 0 and capped > 0                      # both the mask and the cap are at work
    assert loss.item() == pytest.approx(total / sum(lengths), rel=1e-12)


# ----------------------------------------------------------------------------- sample selection
def select(scores, adv, mask, n, multiple_of=1, seed=0, **cfg):
    return select_samples(torch.tensor(scores), adv, mask, n, AdvantageConfig(**cfg),
                          torch.Generator().manual_seed(seed), multiple_of)


def test_select_samples_dynamic_sampling_drops_constant_groups():
    # groups of 3: [1,1,1] constant, [0,1,0] kept, [0.3]*3 constant, [1,0,0] kept
    scores = [1., 1, 1, 0, 1, 0, 0.3, 0.3, 0.3, 1, 0, 0]
    m = torch.ones(12, 2)
    adv = compute_advantages(torch.tensor(scores), m, 3, estimator="grpo")
    assert select(scores, adv, m, 3, dynamic_sampling=True) == [3, 4, 5, 9, 10, 11]
    assert select(scores, adv, m, 3) == list(range(12))  # off: everything
    assert select(scores, adv, m, 3, multiple_of=4, dynamic_sampling=True) == [3, 4, 5, 9]  # 6 -> 4, from the end
    assert select(scores, adv, m, 3, multiple_of=5) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert select(scores, adv, m, 3, multiple_of=7, dynamic_sampling=True) == []  # 6 < 7 ranks: nothing
    with pytest.raises(ValueError, match="group_size"):  # a group of one is always constant
        select([1., 0], torch.ones(2, 1), torch.ones(2, 1), 1, dynamic_sampling=True)
    assert select([1., 0], torch.ones(2, 1), torch.ones(2, 1), 1) == [0, 1]  # n = 1 is fine without it


def test_select_samples_ssr_keeps_only_nonzero_advantages():
    # per-row mean over valid tokens: r0 (2+0)/2 = 1; r1 (1-1)/2 = 0 (token-level non-zero, mean zero);
    # r2 1e-9 (rounding noise, <= 1e-8); r3 no valid token (99 sits on padding); r4 -0.5; r5 (0+0+3)/3 = 1
    adv = torch.tensor([[2., 0, 0], [1, -1, 0], [1e-9, 0, 0], [99, 0, 0], [-.5, -.5, 0], [0, 0, 3]])
    m = length_mask([2, 2, 1, 0, 2, 3], 3)
    scores = [1., 0, 0, 0, 1, 1]
    for seed in range(5):  # the pool is {0, 4, 5}: 3 draws (its size) with replacement, sorted
        sel = select(scores, adv, m, 2, seed=seed, ssr=True)
        assert len(sel) == 3 and set(sel) <= {0, 4, 5} and sel == sorted(sel)
        assert len(select(scores, adv, m, 2, seed=seed, ssr=True, ssr_size=7)) == 7
    assert len(select(scores, adv, m, 2, multiple_of=2, ssr=True)) == 2
    # both rules: groups [1,0] [0,0] [1,1] -> dynamic sampling keeps 0,1; SSR then drops 1 (mean 0)
    assert select(scores, adv, m, 2, dynamic_sampling=True, ssr=True) == [0]
    assert select(scores, torch.zeros(6, 3), m, 2, ssr=True, ssr_size=4) == []  # nothing to learn from
    # alpha weights the draws: mean advantages 1, -0.5, 1 -> p(4) = 0.5/2.5 = 0.2 at alpha 1, 0.25/2.25 at alpha 2
    for alpha, p4 in ((1.0, 0.2), (2.0, 0.25 / 2.25), (0.0, 1 / 3)):
        draws = select(scores, adv, m, 2, ssr=True, ssr_size=6000, ssr_alpha=alpha)
        assert abs(draws.count(4) / 6000 - p4) < 0.02, alpha


def test_select_samples_after_real_advantages():
    # dr_grpo, n = 3: [1, 0, 0.5] mean 0.5 -> [0.5, -0.5, 0]; [1,1,1] -> 0; [0, 0, 1] mean 1/3 -> [-1/3, -1/3, 2/3]
    scores = [1., 0, 0.5, 1, 1, 1, 0, 0, 1]
    m = torch.ones(9, 4)
    adv = compute_advantages(torch.tensor(scores), m, 3, estimator="dr_grpo")
    assert select(scores, adv, m, 3, dynamic_sampling=True) == [0, 1, 2, 6, 7, 8]
    assert set(select(scores, adv, m, 3, ssr=True)) <= {0, 1, 6, 7, 8}  # never response 2 (A = 0)
    assert len(select(scores, adv, m, 3, multiple_of=2, dynamic_sampling=True, ssr=True)) == 4
    # SSR draws its 5 responses from `generator`, which the caller may go on using (train.py shuffles with it)
    g, expected = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    select_samples(torch.tensor(scores), adv, m, 3, AdvantageConfig(ssr=True), g)
    torch.multinomial(torch.ones(5, dtype=torch.float64), 5, replacement=True, generator=expected)
    assert torch.equal(g.get_state(), expected.get_state())


def test_select_samples_rejects_bad_inputs():
    s, m = torch.tensor([1., 0]), torch.ones(2, 3)
    cfg, g = AdvantageConfig(ssr=True), torch.Generator()
    with pytest.raises(ValueError, match="advantages"):
        select_samples(s, torch.ones(2, 2), m, 2, cfg, g)
    with pytest.raises(ValueError, match="mask"):
        select_samples(s, torch.ones(3, 3), torch.ones(3, 3), 2, cfg, g)
    with pytest.raises(ValueError, match="multiple_of"):
        select_samples(s, torch.ones(2, 3), m, 2, cfg, g, multiple_of=0)
    with pytest.raises(ValueError, match="advantages: need finite"):
        select_samples(s, torch.tensor([[1., float("nan"), 0], [0, 0, 0]]), m, 2, cfg, g)
    nan_on_padding = torch.tensor([[1., float("nan")], [-1, 0]])
    assert select_samples(s, nan_on_padding, length_mask([1, 2]), 2, cfg, g) == [0, 1]


def test_ssr_draws():
    """SSR through select_samples, one token per response (so A_i is the response's advantage), no dynamic sampling."""
    adv = torch.tensor([0.0, 2.0, -1.0, 0.0, 1.0, -4.0])

    def ssr(k, alpha, g, a=adv):
        cfg = AdvantageConfig(ssr=True, ssr_size=k, ssr_alpha=alpha)
        return torch.tensor(select_samples(torch.zeros(len(a)), a[:, None], torch.ones(len(a), 1), 1, cfg, g))
    a = ssr(3, 1.0, torch.Generator().manual_seed(7))
    b = ssr(3, 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.tolist() == sorted(a.tolist())  # deterministic, sorted
    assert set(a.tolist()) <= {1, 2, 4, 5}
    many = ssr(50, 1.0, torch.Generator().manual_seed(0)).tolist()   # with replacement: k > K is fine
    assert len(many) == 50 and set(many) <= {1, 2, 4, 5} and len(set(many)) < 50
    # k = 1: P(i) = |A_i| / 8 -> index 5 has p = 0.5, index 2 p = 0.125. 4000 draws, std of freq ~ 0.008.
    g = torch.Generator().manual_seed(1)
    counts = torch.bincount(torch.cat([ssr(1, 1.0, g) for _ in range(4000)]), minlength=6)
    freq = counts.double() / 4000
    assert counts[0] == counts[3] == 0
    assert torch.allclose(freq[[1, 2, 4, 5]], torch.tensor([0.25, 0.125, 0.125, 0.5], dtype=torch.float64),
                          atol=0.04)
    # alpha = 2: p = [4, 1, 1, 16] / 22 -> index 5: 0.727
    counts = torch.bincount(torch.cat([ssr(1, 2.0, g) for _ in range(2000)]), minlength=6)
    assert abs(counts[5].item() / 2000 - 16 / 22) < 0.05
    assert ssr(2, 1.0, g, torch.zeros(4)).tolist() == []   # nothing to draw from: nothing to train on


# ----------------------------------------------------------------------------- CLI
def test_cli_main_prints_table(capsys):
    import tyro
    args = tyro.cli(Args, args="--scores 1 0 0 1 1 1 --group-size 3 --advantage.estimator grpo".split())
    adv = main(args)
    out = capsys.readouterr().out
    assert "+1.1547" in out and "-0.5773" in out and "+0.0000" in out
    assert torch.allclose(adv[:3, 0], torch.tensor([1.1547, -0.5773, -0.5773], dtype=adv.dtype), atol=1e-4)
    main(Args(scores=(1, 0), group_size=1, lengths=(2, 3)))
    assert "+1.0954" in capsys.readouterr().out  # the hand-worked reinforce_pp case above


def test_script_runs_alone():
    root = Path(__file__).resolve().parents[1]
    cli = "--scores 1 0 0.5 1 --group-size 2 --lengths 3 2 4 1 --advantage.estimator rloo".split()
    out = subprocess.run([sys.executable, str(root / "advantage.py"), *cli],
                         capture_output=True, text=True, timeout=120, cwd=root)
    # rloo: [1 - 0, 0 - 1, 0.5 - 1, 1 - 0.5] = [+1, -1, -0.5, +0.5] on every valid token
    assert out.returncode == 0, out.stderr
    assert "+1.0000 +1.0000 +1.0000" in out.stdout and "-0.5000 -0.5000 -0.5000 -0.5000" in out.stdout


def test_dynamic_sampling_whitens_over_the_kept_groups_only():
    """reinforce_pp + dynamic sampling, scores [1, 1 | 1, 0], one token each: the first group is constant and
    dropped, so the whitening statistics are the kept group's: returns [1, 0], mean 0.5, unbiased std sqrt(0.5),
    advantages +-0.7071 (over all four tokens they would be +0.5 and -1.5); the dropped group gets 0."""
    scores, mask = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64), torch.ones(4, 1, dtype=torch.bool)
    cfg = AdvantageConfig(estimator="reinforce_pp", dynamic_sampling=True, whiten_eps=0.0)
    adv = compute_advantages(scores, mask, 2, cfg)
    assert torch.allclose(adv[:, 0], torch.tensor([0.0, 0.0, 0.5 ** 0.5, -(0.5 ** 0.5)], dtype=torch.float64))
    keep = select_samples(scores, adv, mask, 2, cfg, torch.Generator().manual_seed(0))
    assert keep == [2, 3]
    all_constant = compute_advantages(torch.ones(4, dtype=torch.float64), mask, 2, cfg)
    assert torch.equal(all_constant, torch.zeros(4, 1, dtype=torch.float64))      # nothing kept: no whitening error


def test_sequence_ratio_needs_seq_mean_token_mean():
    """GSPO's sequence ratio is defined with seq-mean-token-mean (verl forces it): other aggregations are refused."""
    for agg in ("token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        with pytest.raises(ValueError, match="seq-mean-token-mean"):
            AdvantageConfig(ratio="sequence", loss_agg=agg, norm_len=8)
    AdvantageConfig(ratio="sequence", loss_agg="seq-mean-token-mean")


def test_sum_norm_needs_a_constant_length():
    """Dr.GRPO's L must be a constant: without norm_len the aggregation refuses rather than use a batch's own T."""
    with pytest.raises(ValueError, match="norm_len"):
        aggregate(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), "seq-mean-token-sum-norm")
