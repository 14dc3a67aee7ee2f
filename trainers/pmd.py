"""PMD-mean: policy mirror descent with the log-partition approximated by the mean reward.

Xu, Lu, Yu, Zhao, arXiv 2602.05933 (reference code: horizon-rl/OpenKimi `openkimi/pmd/core_algos.py`).
Per response i of length |y_i|, with sequence log-ratio D_i = sum_t log pi_theta - log pi_old:

    L_i = (tau / 2) * (A_i / tau - D_i)^2 / |y_i|,        batch loss = mean_i L_i

A_i = r_i - b_i. PMD-mean: b_i = leave-one-out mean of the group's other rewards (`baseline: mean`,
verl's `rloo`). PMD-partition: b_i = tau * log mean_{j != i} exp(r_j / tau) (`baseline: partition`).
No ratio clipping and no KL loss: the quadratic pulls later off-policy mini-batches back toward the
rollout policy. At D = 0 the gradient is length-normalised leave-one-out REINFORCE.

Choices where the paper's text was not available (methods.md section 5g): leave-one-out mean (the
code's rloo) rather than Kimi's full mean; the `seq-mean-token-mean` aggregation; tau = 0.1 by
default in our small-model recipe (the paper's 30B figure) rather than the scripts' 0.01, because
with +-1 rewards tau = 0.01 makes A / tau ~ 200 nats and the loss behaves like plain RLOO.
Reward scale and tau trade off: +-1 rewards at tau behave like 0/1 rewards at tau / 2 (the
population table in methods.md is for 0/1 rewards; tests/test_pmd_loss.py reproduces it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from alignment.config import BaseConfig, ConfigError, bounded
from alignment.online import OnlineTrainer, register_advantage, register_policy_loss


@register_advantage("rloo")
def leave_one_out_mean(rewards: torch.Tensor) -> torch.Tensor:
    """A_i = r_i - mean_{j != i} r_j over each row (one prompt's group)."""
    n = rewards.shape[-1]
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (n - 1)


@register_advantage("ploo")
def leave_one_out_partition(rewards: torch.Tensor, tau: float) -> torch.Tensor:
    """A_i = r_i - tau * log( mean_{j != i} exp(r_j / tau) ), with a max shift for stability."""
    n = rewards.shape[-1]
    z = rewards.double() / tau
    eye = torch.eye(n, dtype=torch.bool, device=rewards.device)
    others = z.unsqueeze(-2).expand(*z.shape[:-1], n, n).masked_fill(eye, float("-inf"))  # [.., i, j]
    baseline = tau * (torch.logsumexp(others, -1) - math.log(n - 1))
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32  # never truncate to int
    return (rewards.double() - baseline).to(out_dtype)


@register_policy_loss("pmd")
def pmd_loss(logp, old_logp, advantages, mask, tau: float):
    """(tau/2) (A/tau - D)^2 / |y|, averaged over sequences (seq-mean-token-mean)."""
    delta = ((logp - old_logp) * mask).sum(-1)
    length = mask.sum(-1).clamp(min=1)
    loss = (0.5 * tau * (advantages / tau - delta) ** 2 / length).mean()
    return loss, {"pmd/log_ratio": float(delta.detach().mean()), "pmd/advantage_abs": float(advantages.abs().mean())}


@dataclass
class PMDSection:
    tau: float = bounded(0.1, gt=0)
    baseline: Literal["mean", "partition"] = "mean"


@dataclass
class PMDConfig(BaseConfig):
    trainer: str = "pmd"
    pmd: PMDSection = field(default_factory=PMDSection)


class PMDTrainer(OnlineTrainer):
    config_class = PMDConfig
    policy_loss = "pmd"

    def check_config(self) -> None:
        super().check_config()
        if self.cfg.rollout.n < 2:
            raise ConfigError("rollout.n: PMD's leave-one-out baselines need at least 2 samples per prompt")
        self.advantage = "rloo" if self.cfg.pmd.baseline == "mean" else "ploo"

    def advantage_params(self) -> dict:
        return {} if self.advantage == "rloo" else {"tau": self.cfg.pmd.tau}

    def loss_params(self) -> dict:
        return {"tau": self.cfg.pmd.tau}
