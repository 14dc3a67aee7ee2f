"""Every advantage estimator, policy loss, KL estimator and preference loss, registered by name.

One module and one signature per kind (verl's `core_algos.py`); a recipe picks them by name
(`algo.advantage`, `algo.policy_loss`, `algo.kl_estimator`; `rm.loss`, `dpo.loss`, `pm.loss`):

    reward advantages      fn(rewards (prompts, n), *, settings) -> (prompts, n)
    preference advantages  fn(preferences (prompts, n, n), *, settings) -> (prompts, n)
                           preferences[k, i, j] > 0 when response i beats j; skew-symmetric
    policy losses          fn(logp, old_logp, advantages, mask, *, settings) -> (loss, stats)
                           logp (B, T); advantages (B,) per sequence or (B, T) per token
    KL estimators          fn(logp, ref_logp) -> (B, T) per-token KL(pi || ref) on tokens sampled from pi
    preference losses      fn(margins (pairs,), *, settings) -> (mean loss, outlier delta per pair)

Settings are keyword-only parameters; `Registry.get(name, section)` binds them from the config
section's fields of the same names (AlgoConfig: `clip`, `tau`, ...). PPO's critic-based pieces (GAE,
the KL-penalised token rewards, the clipped value loss, whitening) are plain functions at the end:
they need a critic, so no recipe can swap them in elsewhere.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from alignment.config import ConfigError


class Registry:
    """Functions of one kind by name. Registering a name twice raises; an unknown name is a
    ConfigError naming the config key and the valid names."""

    def __init__(self, kind: str):
        self.kind = kind
        self.functions: dict[str, Callable] = {}

    def register(self, *names: str):
        def deco(fn):
            for name in names:
                if name in self.functions:
                    raise ValueError(f"{self.kind} {name!r} is registered already ({self.functions[name].__name__})")
                self.functions[name] = fn
            return fn
        return deco

    def get(self, name: str, settings: Any = None, key: str = "") -> Callable:
        """The function registered as `name`, its keyword-only settings bound from the fields of the
        same names on `settings` (a config section; a setting it lacks keeps its default)."""
        if name not in self.functions:
            valid = ", ".join(sorted(self.functions))
            raise ConfigError(f"{key or self.kind}: unknown {self.kind} {name!r} (valid: {valid})")
        fn = self.functions[name]
        if settings is None:
            return fn
        bound = {p.name: getattr(settings, p.name) for p in inspect.signature(fn).parameters.values()
                 if p.kind is p.KEYWORD_ONLY and hasattr(settings, p.name)}
        return functools.partial(fn, **bound)


REWARD_ADVANTAGES = Registry("reward advantage estimator")
PREFERENCE_ADVANTAGES = Registry("preference advantage estimator")
POLICY_LOSSES = Registry("policy loss")
KL_ESTIMATORS = Registry("KL estimator")
PREFERENCE_LOSSES = Registry("preference loss")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


# ---- advantages from one reward per sample -------------------------------------------------------
@REWARD_ADVANTAGES.register("grpo")
def group_normalised(rewards: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """(r_i - mean) / (std + eps) over each row (one prompt's group), std unbiased as in verl."""
    return (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + eps)


@REWARD_ADVANTAGES.register("rloo")
def leave_one_out_mean(rewards: torch.Tensor) -> torch.Tensor:
    """A_i = r_i - mean_{j != i} r_j over each row (PMD-mean's baseline, verl's `rloo`)."""
    n = rewards.shape[-1]
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (n - 1)


@REWARD_ADVANTAGES.register("ploo")
def leave_one_out_partition(rewards: torch.Tensor, *, tau: float) -> torch.Tensor:
    """A_i = r_i - tau * log( mean_{j != i} exp(r_j / tau) ) (PMD-partition), with a max shift for stability."""
    n = rewards.shape[-1]
    z = rewards.double() / tau
    eye = torch.eye(n, dtype=torch.bool, device=rewards.device)
    others = z.unsqueeze(-2).expand(*z.shape[:-1], n, n).masked_fill(eye, float("-inf"))  # [.., i, j]
    baseline = tau * (torch.logsumexp(others, -1) - math.log(n - 1))
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32  # never truncate to int
    return (rewards.double() - baseline).to(out_dtype)


# ---- advantages from pairwise preferences ------------------------------------------------------
@PREFERENCE_ADVANTAGES.register("pairwise_rloo")
def mean_preference(preferences: torch.Tensor) -> torch.Tensor:
    """A_i = sum_{j != i} S_ij / (n - 1): RLOO with reward differences replaced by preference logits
    (routed RL, Xu et al. 2025)."""
    n = preferences.shape[-1]
    return preferences.sum(-1) / (n - 1)


@PREFERENCE_ADVANTAGES.register("pairwise_grpo")
def normalised_preference(preferences: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """A_i = mean_j d_ij / RMS(d) per group (Think-RM's pairwise RLHF): RMS over the G (G - 1)
    off-diagonal entries with the reference's 1/2 factor; with d_ij = r_i - r_j it is GRPO's."""
    g = preferences.shape[-1]
    scale = torch.sqrt((preferences**2).sum((-2, -1)) / (2 * g * (g - 1)) + eps)
    return preferences.sum(-1) / g / scale.unsqueeze(-1)


# ---- policy losses -------------------------------------------------------------------------------
def per_token(advantages: torch.Tensor) -> torch.Tensor:
    """(B,) sequence advantages broadcast over the tokens; (B, T) ones as they are."""
    return advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages


@POLICY_LOSSES.register("ppo")
def ppo_clip_loss(logp, old_logp, advantages, mask, *, clip: float):
    """Clipped surrogate, token-mean: max(-A r, -A clip(r, 1-eps, 1+eps)) with r = pi / pi_old."""
    advantages = per_token(advantages)
    ratio = (logp - old_logp).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    return loss, {"clip_frac": float(clip_frac)}


@POLICY_LOSSES.register("pmd")
def pmd_loss(logp, old_logp, advantages, mask, *, tau: float):
    """PMD's regression (Xu et al. 2026): (tau/2) (A/tau - D)^2 / |y| with D the sequence log-ratio
    to the rollout policy, averaged over sequences (seq-mean-token-mean). Needs one advantage per
    sequence."""
    if advantages.dim() != 1:
        raise ConfigError("algo.policy_loss=pmd regresses one advantage per sequence; this trainer's advantages "
                          "are per token")
    delta = ((logp - old_logp) * mask).sum(-1)
    length = mask.sum(-1).clamp(min=1)
    loss = (0.5 * tau * (advantages / tau - delta) ** 2 / length).mean()
    return loss, {"pmd/log_ratio": float(delta.detach().mean()), "pmd/advantage_abs": float(advantages.abs().mean())}


# ---- KL estimators (Schulman's k1, k2, k3) ------------------------------------------------------
@KL_ESTIMATORS.register("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """log pi - log ref: unbiased, high variance, can be negative."""
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """(r - 1) - log r >= 0 with r = ref / pi: unbiased, low variance; clamped as verl's `low_var_kl`."""
    log_ratio = (ref_logp - logp).clamp(-20, 20)
    return (log_ratio.exp() - log_ratio - 1).clamp(-10, 10)


@dataclass
class PolicyObjective:
    """What an online update minimises: a policy loss, plus `kl_coef` x a KL estimator to the
    reference policy when reference log-probs are given (verl's `use_kl_loss`)."""

    loss: Callable
    kl: Callable = None
    kl_coef: float = 0.0

    @classmethod
    def from_config(cls, algo) -> PolicyObjective:
        return cls(POLICY_LOSSES.get(algo.policy_loss, algo, "algo.policy_loss"),
                   KL_ESTIMATORS.get(algo.kl_estimator, key="algo.kl_estimator"), algo.kl_coef)

    def __call__(self, logp, old_logp, advantages, mask, ref_logp=None) -> tuple[torch.Tensor, dict[str, float]]:
        loss, stats = self.loss(logp, old_logp, advantages, mask)
        if ref_logp is not None:
            kl = masked_mean(self.kl(logp, ref_logp), mask)
            loss = loss + self.kl_coef * kl
            stats["kl"] = float(kl.detach())
        return loss, stats


# ---- preference losses on margins (reward models, DPO, the preference model) ----------------------
@PREFERENCE_LOSSES.register("bt", "sigmoid")  # "sigmoid" is DPO's (TRL's) name for it
def bradley_terry(margins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return -F.logsigmoid(margins).mean(), torch.zeros_like(margins.detach())


def r3m_threshold(lam: float) -> float:
    """The margin below which R^3M flags a pair: log(1/lam - 1)."""
    if not 0.0 < lam < 1.0:
        raise ValueError(f"R^3M's lambda must lie in (0, 1), got {lam}")
    return math.log(1.0 / lam - 1.0)


def r3m_delta(margins: torch.Tensor, lam: float) -> torch.Tensor:
    """R^3M's closed-form outlier step at the current margins: max(threshold - m, 0) (no gradient)."""
    return (r3m_threshold(lam) - margins.detach()).clamp_min(0.0)


@PREFERENCE_LOSSES.register("r3m")
def r3m(margins: torch.Tensor, *, lam: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    """R^3M (Bukharin et al., NeurIPS 2024): corrupted labels are a sparse per-pair offset delta on the
    BT logit; per pair, minimise -log sigmoid(m + delta) + lam |delta|. Delta's step has the closed
    form above, so one step computes delta from the detached margin and takes a gradient step with
    it fixed (no per-pair state). The gradient is BT's with each pair's weight sigmoid(-m) clipped at
    lam: pairs the model confidently contradicts stop pulling, and are flagged (delta > 0). lam is
    normalised per pair (the paper's eq. 3.4, lam in (0, 1)), not the theory's 1/n."""
    delta = r3m_delta(margins, lam)
    # lam * |delta| is constant for the parameters' step; it is kept so the loss is the objective's value.
    return (-F.logsigmoid(margins + delta) + lam * delta).mean(), delta


# ---- PPO with a critic ---------------------------------------------------------------------------
def gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """(advantages, returns), each (B, T), for right-padded responses: nothing flows past the last
    token (no bootstrap after EOS or truncation; values and rewards at padding are ignored)."""
    values = values * mask
    token_rewards = token_rewards * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, advantages + values


def kl_penalised_rewards(scores, logp, ref_logp, mask, coef: float):
    """(token rewards, per-token KL): -coef * k1(pi, ref) at every response token, plus the sequence
    score at the last token."""
    kl = kl_k1(logp, ref_logp) * mask
    rewards = -coef * kl
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(last)), last] += scores
    return rewards, kl


def clipped_value_loss(values, old_values, returns, mask, clip: float) -> torch.Tensor:
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped within +-clip of the rollout-time value."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries of the global batch (all ranks); 0 elsewhere. A
    fractional mask weighs the statistics (tests use probabilities as weights)."""
    sums = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    mean = sums[0] / sums[2]
    var = (sums[1] / sums[2] - mean**2).clamp(min=0)
    out = (x - mean.float()) * torch.rsqrt(var.float() + 1e-8)
    return torch.where(mask > 0, out if shift_mean else out + mean.float(), 0.0)


def explained_variance(values, returns, mask) -> float:
    """1 - Var(R - V) / Var(R) over response tokens: 1 is a perfect critic, <= 0 a useless one."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return float(1 - var_d / var_r.clamp(min=1e-8))
