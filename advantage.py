"""Advantages, KL penalties, the PPO policy loss, its rollout correction and sample selection (stage 3 of the RL loop).

Per-token advantages from one score per response (reward.py) by five estimators, the KL penalty to a frozen reference,
the clipped PPO loss (aggregated so that gradient accumulation and data parallelism give exactly the big-batch
gradient), rollout_correction's weights for the engine's sampling and select_samples. B responses, a group's n
responses adjacent (B = prompts x n); mask (B, T) marks response tokens (1 = valid, right padding); masked positions of
every (B, T) output are exactly 0. No value model (no GAE / critic); whitening spans the whole batch. Run alone:
    python advantage.py --scores 1 0 0 1 1 1 --group-size 3 --advantage.estimator grpo
    python advantage.py --scores 1 0 0.5 1 --group-size 2 --lengths 3 2 4 1 --advantage.estimator reinforce_pp
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args, get_origin, get_type_hints

import torch

Estimator = Literal["reinforce_pp", "reinforce_pp_baseline", "grpo", "dr_grpo", "rloo"]
LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
GROUP_ESTIMATORS = ("reinforce_pp_baseline", "grpo", "dr_grpo", "rloo")
K3_LOG_RATIO_CLAMP = 20.0  # verl (kl_penalty "low_var_kl") clamps (ref - logp) to +-20 before exp ...
K3_VALUE_CLAMP = 10.0  # ... and the k3 value to +-10
PPO_LOG_RATIO_CLAMP = 20.0  # verl clamps log(pi/pi_old) to +-20 so exp() cannot overflow
SSR_ZERO_TOL = 1e-8  # a whitened row can average to rounding noise: SSR counts |A| <= this as zero


@dataclass(frozen=True)
class AdvantageConfig:
    estimator: Estimator = "reinforce_pp"
    """Advantage estimator: reinforce_pp (MAYE), reinforce_pp_baseline, grpo, dr_grpo or rloo."""
    gamma: float = 1.0  # Discount for the REINFORCE++ returns (1.0 = every token gets the sequence score).
    kl_coef: float = 0.001  # KL coefficient beta (0 = no KL, no reference model needed).
    kl_type: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator: k1 = log-ratio, k2 = half squared log-ratio, k3 = low-variance (verl low_var_kl)."""
    kl_in_loss: bool = True
    """Put beta*KL in the loss (MAYE: k3 at 0.001); off = put -beta*KL_t in the token reward (REINFORCE++ only)."""
    shift_mean: bool = False
    """Add the batch mean back after whitening, as MAYE's code does (verl calls this shift_mean=False)."""
    std_unbiased: bool = True
    """Unbiased (n-1) std/variance for grpo's group std and for whitening (verl and MAYE use unbiased)."""
    eps: float = 1e-6  # epsilon in grpo's (s - mean) / (std + eps).
    whiten_eps: float = 1e-8  # epsilon in whitening (x - mean) * rsqrt(var + eps).
    clip_low: float = 0.2  # PPO lower clip: ratio >= 1 - clip_low.
    clip_high: float = 0.2  # PPO upper clip: ratio <= 1 + clip_high (clip-higher, DAPO / EasyR1 use 0.28 / 0.3).
    dual_clip: float = 0.0
    """Dual-clip constant c > 1 bounding the loss of negative advantages at -c*A (0 = off; 3.0 is usual)."""
    ratio: Literal["token", "sequence"] = "token"
    """Importance ratio: token (PPO, GRPO) or sequence (GSPO: clip_low/high ~3e-4/4e-4, seq-mean-token-mean)."""
    loss_agg: LossAgg = "token-mean"
    """Loss aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm (Dr.GRPO)."""
    norm_len: int = 0
    """Constant L of seq-mean-token-sum-norm (Dr.GRPO; 0 = train.py passes --rollout.max-tokens, as TRL does)."""
    tis: Literal["off", "token", "sequence"] = "off"
    """Truncated IS per token or per response (rollout_correction); needless in fp32, where engine and trainer agree."""
    tis_cap: float = 2.0  # The truncation C of --advantage.tis (>= 1; 2 is the usual choice).
    rollout_mask: Literal["off", "token", "sequence", "geometric"] = "off"
    """Weight 0 where pi_old / pi_engine leaves the band: per token (IcePop), response (masked IS) or geometric mean."""
    rollout_mask_low: float = 0.5
    """Lower bound of --advantage.rollout-mask's band (0 < low <= 1; IcePop 0.5, geometric ~0.999)."""
    rollout_mask_high: float = 2.0
    """Upper bound of --advantage.rollout-mask's band (>= 1; verl 2, IcePop 5, geometric ~1.001)."""
    dynamic_sampling: bool = False  # Drop groups whose scores are all equal (DAPO dynamic sampling).
    ssr: bool = False
    """Selective Sample Replay (VL-Rethinker): draw the responses to train on from the non-zero-advantage ones."""
    ssr_alpha: float = 1.0  # Exponent alpha of SSR's sampling weights |A|^alpha (VL-Rethinker: 1).
    ssr_size: int = 0  # Responses SSR draws per step, with replacement (0 = as many as have a non-zero advantage).

    def __post_init__(self):
        def check(ok: bool, field: str, why: str):
            if not ok:
                raise ValueError(f"--advantage.{field.replace('_', '-')} {getattr(self, field)!r}: {why}")

        for field, hint in get_type_hints(AdvantageConfig).items():   # tyro checks a Literal only on a command line
            if get_origin(hint) is Literal:
                check(getattr(self, field) in get_args(hint), field, f"must be one of {get_args(hint)}")
        check(0.0 < self.gamma <= 1.0, "gamma", "must be in (0, 1]")
        # eps = 0 is safe: constant groups are zeroed before dividing.
        for field in ("kl_coef", "eps", "whiten_eps", "clip_high", "norm_len", "ssr_alpha", "ssr_size"):
            check(getattr(self, field) >= 0, field, "must be >= 0")
        check(0.0 <= self.clip_low < 1.0, "clip_low", "must be in [0, 1)")
        check(self.ratio == "token" or self.loss_agg == "seq-mean-token-mean", "ratio", "the sequence ratio (GSPO) is "
              "defined with --advantage.loss-agg seq-mean-token-mean (verl forces it too)")
        check(self.dual_clip == 0.0 or self.dual_clip > 1.0, "dual_clip", "must be 0 (off) or > 1")
        check(self.tis_cap >= 1, "tis_cap", "must be >= 1 (a cap below 1 would down-weight every token)")
        low, high = self.rollout_mask_low, self.rollout_mask_high   # a band without 1 masks where the two agree
        check(0 < low <= 1 <= high and low < high, "rollout_mask_low",
              f"with --advantage.rollout-mask-high {high}: need 0 < low <= 1 <= high, low < high")
        # Group estimators give one number per response: a per-token reward KL has nowhere to go.
        check(self.kl_in_loss or self.kl_coef == 0.0 or self.estimator in ("reinforce_pp", "reinforce_pp_baseline"),
              "kl_in_loss", f"KL in the reward (kl_in_loss=False, kl_coef>0) needs a REINFORCE++ estimator, "
              f"not {self.estimator!r}; use --advantage.kl-in-loss or --advantage.kl-coef 0")


def _check_mask(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """Return mask as bool (B, T); raise naming `mask` if its shape or values are wrong."""
    if mask.dim() != 2 or mask.shape[0] != batch:
        raise ValueError(f"mask: expected shape ({batch}, T), got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask: values must be 0 or 1")
    return mask.bool()


def _check_groups(scores: torch.Tensor, group_size: int, need_group: bool) -> None:
    if scores.dim() != 1:
        raise ValueError(f"scores: expected shape (B,), got {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        bad = torch.nonzero(~torch.isfinite(scores)).flatten().tolist()
        raise ValueError(f"scores: non-finite values at indices {bad[:10]}")
    least = 2 if need_group else 1  # a group-relative advantage needs 2+ responses per prompt
    if group_size < least or scores.numel() % group_size != 0:
        raise ValueError(f"group_size={group_size}: must be >= {least} and divide B={scores.numel()}")


def group_centred(scores: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_i - mean_G(s), constant_i), both (B,). A group of equal scores gets exactly 0: a float mean of n
    equal values can differ from them by one ulp, which std-normalisation would amplify."""
    g = scores.view(-1, group_size)  # (P, n)
    constant = (g.amax(1, keepdim=True) == g.amin(1, keepdim=True)).expand_as(g)  # (P, n)
    centred = torch.where(constant, torch.zeros_like(g), g - g.mean(1, keepdim=True))
    return centred.reshape(-1), constant.reshape(-1)


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1}, G_T = 0 (REINFORCE++, Hu 2025 / OpenRLHF get_cumulative_returns).
    rewards (B, T) are 0 at padding. A loop over T: a closed form with gamma^-t overflows for gamma < 1."""
    out, running = torch.empty_like(rewards), torch.zeros_like(rewards[:, 0])  # running: (B,)
    for t in range(rewards.shape[1] - 1, -1, -1):
        out[:, t] = running = rewards[:, t] + gamma * running
    return out


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, eps: float = 1e-8,
                  shift_mean: bool = False) -> torch.Tensor:
    """(x - mu) * rsqrt(var + eps) over the valid tokens of the whole batch (verl masked_whiten), masked
    positions 0. var divides by N - 1 (unbiased) or N. shift_mean=True adds mu back (MAYE's code; verl's
    shift_mean=False). Equal valid values give exactly 0 (+ mu), not amplified rounding noise."""
    valid = values[mask]  # (N,) valid tokens of the whole batch
    if valid.numel() < (2 if unbiased else 1):
        raise ValueError(f"mask: whitening needs {2 if unbiased else 1}+ valid batch tokens, got {valid.numel()}")
    mean = valid.mean()
    out = torch.zeros_like(values)
    if valid.max() != valid.min():
        out = (values - mean) * torch.rsqrt(valid.var(correction=1 if unbiased else 0) + eps)
    return torch.where(mask, out + mean if shift_mean else out, torch.zeros_like(out))


def compute_advantages(scores: torch.Tensor, mask: torch.Tensor, group_size: int,
                       cfg: AdvantageConfig = AdvantageConfig(), kl: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token advantages (B, T) from per-response scores (B,); masked positions are exactly 0. With s_i the score
    and G the group of n adjacent responses of response i:
      reinforce_pp (REINFORCE++, Hu 2025; MAYE): r_t = -beta*KL_t (only if kl_in_loss=False and beta > 0)
          + s_i on the last valid token; A = whiten(G_t = r_t + gamma G_{t+1}) over all valid batch tokens.
      reinforce_pp_baseline (OpenRLHF reinforce_baseline): reinforce_pp with s_i - mean_G(s) for s_i; after
          whitening a constant group ends at -mu/sigma, not 0 (as in OpenRLHF).
      grpo (Shao 2024; verl): (s_i - mean_G) / (std_G + eps), std unbiased (n-1) unless std_unbiased=False.
      dr_grpo (Liu 2025): s_i - mean_G.     rloo (Ahmadian 2024): s_i - sum_{j!=i} s_j / (n-1).
    grpo / dr_grpo / rloo give exactly 0 to a group of equal scores. `kl` (B, T) (kl_penalty) is needed only
    for reward KL. A response with no valid token gets no advantage but counts in its group's mean.
    Computed in float64; returned as float32 (float64 if scores are float64)."""
    est, n = cfg.estimator, group_size
    out_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    _check_groups(scores, group_size, need_group=est in GROUP_ESTIMATORS or cfg.dynamic_sampling)
    mask = _check_mask(mask, scores.numel())
    s = scores.to(torch.float64)  # (B,)
    centred, constant = group_centred(s, n)  # (B,) each
    if est in ("grpo", "dr_grpo", "rloo"):
        adv = centred * n / (n - 1) if est == "rloo" else centred  # dr_grpo: centred as it is
        if est == "grpo":
            std = s.view(-1, n).std(1, correction=1 if cfg.std_unbiased else 0)  # (P,)
            adv = centred / (std.repeat_interleave(n) + cfg.eps)
        adv = torch.where(constant, torch.zeros_like(adv), adv)  # grpo with eps = 0 would give 0/0
        return torch.where(mask, adv[:, None], torch.zeros((), dtype=adv.dtype)).to(out_dtype)

    # REINFORCE++ family: token rewards -> discounted returns -> batch whitening.
    seq = centred if est == "reinforce_pp_baseline" else s  # (B,)
    if cfg.dynamic_sampling:  # the groups select_samples drops have no say in the whitening, and get 0
        mask = mask & ~constant[:, None]
        if not mask.any():
            return torch.zeros(mask.shape, dtype=out_dtype)
    B, T = mask.shape
    rewards = torch.zeros(B, T, dtype=torch.float64, device=mask.device)
    if not cfg.kl_in_loss and cfg.kl_coef > 0:
        if kl is None or kl.shape != mask.shape or not torch.isfinite(kl[mask]).all():
            raise ValueError(f"kl: reward KL needs a per-token KL of shape {tuple(mask.shape)}, finite on valid "
                             f"tokens; got {None if kl is None else tuple(kl.shape)}")
        rewards = torch.where(mask, -cfg.kl_coef * kl.detach().double(), rewards)  # padding may hold garbage (NaN)
    has_token = mask.any(1)  # (B,) a row with no valid token has no place for its score
    last = torch.where(mask, torch.arange(T, device=mask.device).expand(B, T), -1).amax(1).clamp(min=0)  # (B,)
    rewards[torch.arange(B, device=mask.device), last] += torch.where(has_token, seq, torch.zeros_like(seq))
    returns = discounted_returns(rewards, cfg.gamma)  # (B, T)
    return masked_whiten(returns, mask, cfg.std_unbiased, cfg.whiten_eps, cfg.shift_mean).to(out_dtype)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs, delta = logp - ref_logp:
    k1 = delta;  k2 = delta^2 / 2;  k3 = exp(-delta) + delta - 1 (Schulman 2020, "Approximating KL
    divergence"; verl kl_penalty "kl"/"mse"/"low_var_kl"). As in verl, k3 clamps -delta to [-20, 20] and
    the result to [-10, 10]. Elementwise, no mask: the caller masks (padding may hold anything)."""
    if logp.shape != ref_logp.shape:
        raise ValueError(f"ref_logp: shape {tuple(ref_logp.shape)} != logp shape {tuple(logp.shape)}")
    delta = logp - ref_logp
    if kind in ("k1", "k2"):
        return delta if kind == "k1" else 0.5 * delta.square()
    if kind == "k3":
        neg = (-delta).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)  # log(pi_ref / pi)
        return (neg.exp() - neg - 1).clamp(-K3_VALUE_CLAMP, K3_VALUE_CLAMP)
    raise ValueError(f"kind={kind!r}: must be k1, k2 or k3")


def loss_normalizer(mask: torch.Tensor, loss_agg: str = "token-mean") -> float:
    """This batch's share of policy_loss's `normalizer`: valid tokens (token-mean) or sequences with >= 1 valid
    token (seq-mean-*). Sum it over a mini-batch's micro-batches and all-reduce it over ranks."""
    mask = _check_mask(mask, mask.shape[0])
    return float(mask.sum()) if loss_agg == "token-mean" else float(mask.any(1).sum())


def aggregate(values: torch.Tensor, mask: torch.Tensor, loss_agg: str, normalizer: float | None = None,
              norm_len: int = 0) -> torch.Tensor:
    """Sum-able aggregation of per-token values l (B, T) (verl agg_loss; Dr.GRPO for the -norm mode):
    token-mean:              sum_{i,t} l m / N        N = valid tokens of the global mini-batch
    seq-mean-token-mean:     sum_i (sum_t l m / |o_i|) / S   S = sequences (with >= 1 valid token)
    seq-mean-token-sum:      sum_i (sum_t l m) / S
    seq-mean-token-sum-norm: sum_i (sum_t l m / L) / S       L = norm_len, a constant (Dr.GRPO's oat code and TRL:
                             the generation budget; a batch's own padded T would make it depend on the split)
    normalizer = N or S of the *global* mini-batch (None = this batch's own, loss_normalizer)."""
    if loss_agg not in LossAgg.__args__:
        raise ValueError(f"loss_agg={loss_agg!r}: must be one of {LossAgg.__args__}")
    if loss_agg == "seq-mean-token-sum-norm" and norm_len <= 0:
        raise ValueError("seq-mean-token-sum-norm needs norm_len > 0, Dr.GRPO's constant L (the generation budget)")
    normalizer = loss_normalizer(mask, loss_agg) if normalizer is None else normalizer
    if normalizer <= 0:
        raise ValueError(f"normalizer={normalizer}: must be > 0 (no valid tokens in the mini-batch?)")
    lm = torch.where(mask, values, torch.zeros((), dtype=values.dtype))  # garbage (even NaN) at padding -> 0
    length = {"token-mean": 1, "seq-mean-token-sum": 1, "seq-mean-token-mean": mask.sum(1).clamp(min=1),
              "seq-mean-token-sum-norm": norm_len}[loss_agg]  # each response's token sum is divided by it
    return (lm.sum(1) / length).sum() / normalizer


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cfg: AdvantageConfig = AdvantageConfig(), normalizer: float | None = None,
                ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped PPO surrogate (+ beta * KL) for one micro-batch, aggregated per cfg.loss_agg. Per token
    (Schulman 2017; clip-higher from DAPO; dual clip from Ye 2020 / verl; log-ratio clamped to +-20 as verl):
        l = max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high)),  rho = exp(logp - old_logp);
        with dual_clip = c > 0 and A < 0: l = min(l, -c A).
    ratio="sequence" (GSPO-token, Zheng 2025 eq. 13; verl "gspo"): rho_{i,t} = sg[s_i] pi(y_t) / sg[pi(y_t)], valued
    s_i = exp(mean_t (logp - old_logp)); under seq-mean-token-mean it is GSPO's sequence-level loss and gradient.
    loss = aggregate(l) + kl_coef * aggregate(kl_penalty(logp, ref_logp, kl_type)) when kl_in_loss and
    kl_coef > 0 (MAYE: k3, 0.001); ref_logp is then required (a ValueError, not a silently KL-free loss).
    Exact accumulation: loss = sum(per-unit) / normalizer; with `normalizer` the GLOBAL count (loss_normalizer
    summed over micro-batches and ranks) micro-batch losses SUM to the big-batch loss and their backward()
    calls accumulate exactly its gradient. FSDP2 / DDP AVERAGE gradients over W ranks: scale each loss by W.
    normalizer=None = the local count (one un-split batch). Metrics: loss/* sum like the loss (kl without beta);
    training/{clipfrac, dual_clipfrac, approx_kl = mean (logp - old_logp)^2 / 2, ratio_mean} are means over
    valid tokens, to be averaged weighted by training/n_tokens."""
    for name, x in {"old_logp": old_logp, "advantages": advantages, "mask": mask, "ref_logp": ref_logp}.items():
        if x is not None and x.shape != logp.shape:
            raise ValueError(f"{name}: shape {tuple(x.shape)} != logp shape {tuple(logp.shape)}")
    mask = _check_mask(mask, logp.shape[0])
    use_kl = cfg.kl_in_loss and cfg.kl_coef > 0
    if use_kl and ref_logp is None:  # never train silently without the KL the config asks for
        raise ValueError("ref_logp: required when kl_in_loss and kl_coef > 0 (set kl_coef=0 to train without KL)")
    inputs = (logp, old_logp, advantages) + ((ref_logp,) if use_kl else ())
    if not all(torch.isfinite(x.detach()[mask]).all() for x in inputs):
        raise ValueError("logp/old_logp/advantages/ref_logp: non-finite values on valid tokens")

    adv = advantages.detach()
    log_ratio = logp - old_logp.detach()  # (B, T)
    if cfg.ratio == "sequence":  # every token's ratio is valued s_i; its gradient is that of pi(y_t) alone
        seq_mean = (log_ratio.masked_fill(~mask, 0).sum(1, True) / mask.sum(1, True).clamp(min=1)).detach()  # (B, 1)
        log_ratio = logp - logp.detach() + seq_mean
    log_ratio = log_ratio.clamp(-PPO_LOG_RATIO_CLAMP, PPO_LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    pg1, pg2 = -adv * ratio, -adv * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    pg = torch.maximum(pg1, pg2)  # (B, T) pessimistic bound
    dual = torch.zeros_like(mask)
    if cfg.dual_clip > 0:
        pg3 = -adv * cfg.dual_clip
        dual = (adv < 0) & (pg3 < pg) & mask
        pg = torch.where(adv < 0, torch.minimum(pg, pg3), pg)
    pg_loss = aggregate(pg, mask, cfg.loss_agg, normalizer, cfg.norm_len)
    kl_loss = aggregate(kl_penalty(logp, ref_logp.detach(), cfg.kl_type), mask, cfg.loss_agg, normalizer,
                        cfg.norm_len) if use_kl else torch.zeros((), dtype=pg_loss.dtype, device=pg_loss.device)
    loss = pg_loss + cfg.kl_coef * kl_loss if use_kl else pg_loss
    with torch.no_grad():
        n_tok = max(int(mask.sum()), 1)
        lr = torch.where(mask, log_ratio, 0.0)
        return loss, {"loss/policy_loss": float(pg_loss), "loss/kl_loss": float(kl_loss),
                      "training/clipfrac": float(((pg2 > pg1) & mask).sum()) / n_tok,
                      "training/dual_clipfrac": float(dual.sum()) / n_tok,
                      "training/approx_kl": float((0.5 * lr.square()).sum()) / n_tok,
                      "training/ratio_mean": float(torch.where(mask, ratio, 0.0).sum()) / n_tok,
                      "training/n_tokens": float(mask.sum())}


def rollout_correction(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor,
                       cfg: AdvantageConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """(B, T) weights w of the policy-gradient loss (pass A * w to policy_loss), as the engine samples from pi_engine,
    not the trainer's pi_old: rho_t = pi_old(y_t) / pi_engine(y_t), 1 where the engine did not sample y_t (NaN).
    w = 0 on a rejected token, else the truncated IS weight (1 if tis="off"); with sums over valid tokens of the
    weights (training/tis_weight), those capped (training/tis_capped) and those rejected (training/rollout_masked).
      tis token: min(rho_t, C);  sequence: min(prod_t rho_t, C) on each token of the response;  C = tis_cap
          (Yao et al. 2025, fengyao.notion.site/off-policy-rl; verl docs/algo/rollout_corr.md).
      rollout_mask token: rho_t outside [low, high] (IcePop, Ring-1T, Ling Team 2025: M(k) = k on [0.5, 5], else 0, so
          with tis token and C >= high); sequence: a response whose prod_t rho_t is outside (masked IS, Liu, Li et al.
          2025, "When Speed Kills Stability"); geometric: whose exp(mean_t log rho_t) over sampled tokens is (verl)."""
    reject, low, high = cfg.rollout_mask, cfg.rollout_mask_low, cfg.rollout_mask_high
    valid = _check_mask(mask, old_logp.shape[0])
    sampled = valid & engine_logp.isfinite()
    log_rho = torch.where(sampled, old_logp - engine_logp, 0.0)                        # (B, T)
    log_seq = log_rho.sum(1, keepdim=True).expand_as(log_rho)                          # (B, T) log prod_t rho_t
    ratio = {"off": torch.ones_like(log_rho), "token": log_rho.exp(), "sequence": log_seq.exp(),  # inf caps, rejects
             "geometric": (log_seq / sampled.sum(1, keepdim=True).clamp(min=1)).exp()}  # exp(mean_t log rho_t)
    weight = ratio[cfg.tis].clamp(max=cfg.tis_cap)
    rejected = valid & ((ratio[reject] < low) | (ratio[reject] > high))
    sums = {"training/tis_weight": float(weight[valid].sum()), "training/rollout_masked": float(rejected.sum()),
            "training/tis_capped": float((valid & (ratio[cfg.tis] > cfg.tis_cap)).sum())}
    return torch.where(valid & ~rejected, weight, 0.0), sums


def mismatch_metrics(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far the engine's pi_engine is from the trainer's pi_old, as means over the tokens the engine sampled (NaN
    elsewhere in engine_logp): |log pi_engine - log pi_old| (training/rollout_mismatch) and KL(pi_engine || pi_old)'s
    k1 = log pi_engine - log pi_old and k3 = rho - 1 - log rho, rho = pi_old / pi_engine (kl_penalty's)."""
    sampled = mask * engine_logp.isfinite()                                            # (B, T)
    gaps = {"training/rollout_mismatch": (engine_logp - old_logp).abs(),
            **{f"training/mismatch_{k}": kl_penalty(engine_logp, old_logp, k) for k in ("k1", "k3")}}
    return {k: (x.nan_to_num() * sampled).sum().item() / max(1.0, sampled.sum().item()) for k, x in gaps.items()}


def select_samples(scores: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, group_size: int,
                   cfg: AdvantageConfig, generator: torch.Generator, multiple_of: int = 1) -> list[int]:
    """Ascending indices (repeats possible) of the responses to train on, from scores (B,), advantages, mask (B, T):
    1. cfg.dynamic_sampling (DAPO, Yu 2025): drop every group whose scores are all equal (it has no signal);
       DAPO then generates more prompts to refill the batch, here the batch just shrinks.
    2. cfg.ssr (Selective Sample Replay, VL-Rethinker, Wang 2025): the pool is the responses left whose advantage
       averaged over their valid tokens is non-zero (|A_i| > SSR_ZERO_TOL). Draw cfg.ssr_size of them (0 = the
       pool's size) from `generator`, with replacement, p_i = |A_i|^ssr_alpha / sum_j |A_j|^ssr_alpha (their
       active_sampling). VL-Rethinker also refills the batch from a replay buffer of earlier steps; not done here.
    3. Trim to a multiple of `multiple_of` (data-parallel ranks: all run the same number of passes) from the end."""
    _check_groups(scores, group_size, need_group=cfg.dynamic_sampling)
    mask = _check_mask(mask, scores.numel())
    if advantages.shape != mask.shape or not torch.isfinite(advantages[mask]).all():
        raise ValueError(f"advantages: need finite values, shape {tuple(mask.shape)}; got {tuple(advantages.shape)}")
    if multiple_of < 1:
        raise ValueError(f"multiple_of={multiple_of}: must be >= 1")
    keep = torch.arange(scores.numel())  # (B,)
    if cfg.dynamic_sampling:  # equality, not EasyR1's 0.01 < mean < 0.99, which assumes 0/1 scores
        groups = scores.view(-1, group_size)  # (P, n)
        keep = keep[(groups.amax(1) != groups.amin(1)).repeat_interleave(group_size)]
    if cfg.ssr:
        seq_adv = torch.where(mask, advantages, 0.0).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
        keep = keep[seq_adv[keep].abs() > SSR_ZERO_TOL]                                   # the pool
        if keep.numel():
            p = seq_adv[keep].abs().to(torch.float64) ** cfg.ssr_alpha
            picked = torch.multinomial(p, cfg.ssr_size or keep.numel(), replacement=True, generator=generator)
            keep = keep[picked.sort().values]
    keep = keep.tolist()
    return keep[: len(keep) // multiple_of * multiple_of]


@dataclass(frozen=True)
class Args:
    scores: tuple[float, ...] = (1, 0, 0, 1, 1, 1)
    """Per-response scores (a group's responses adjacent)."""
    group_size: int = 3
    """Responses per prompt n."""
    lengths: tuple[int, ...] = ()
    """Response lengths in tokens, one per score (default: one token each)."""
    advantage: AdvantageConfig = AdvantageConfig()


def main(args: Args) -> torch.Tensor:
    from rich.console import Console
    from rich.table import Table
    scores = torch.tensor(args.scores, dtype=torch.float64)
    lengths = args.lengths or [1] * scores.numel()
    if len(lengths) != scores.numel() or min(lengths) < 0:
        raise SystemExit(f"--lengths: need {scores.numel()} non-negative lengths, got {lengths}")
    mask = torch.arange(max(max(lengths), 1))[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    cfg, note = args.advantage, ""
    if not cfg.kl_in_loss and cfg.kl_coef > 0:  # reward KL needs log-probs, which a command line has not got
        cfg, note = replace(cfg, kl_coef=0.0), ", reward KL not shown (needs log-probs)"
    adv = compute_advantages(scores, mask, args.group_size, cfg)
    table = Table("response", "group", "score", "length", "per-token advantages",
                  title=f"{cfg.estimator} advantages (group size {args.group_size}{note})")
    for i, length in enumerate(lengths):
        table.add_row(str(i), str(i // args.group_size), f"{scores[i].item():g}", str(length),
                      " ".join(f"{a:+.4f}" for a in adv[i, :length].tolist()))
    Console().print(table)
    return adv


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
