"""GRPO (`trainer: grpo`): group-relative policy optimisation with any pointwise reward, verl-style.

    align train configs/grpo_chain_sum.yaml

One step: n samples per prompt -> rewards -> A_i = (r_i - mean(r)) / (std(r) + 1e-6) within each
prompt's group (unbiased std, verl's `grpo` estimator) -> `train.mini_batches` optimizer steps of the
clipped surrogate (token-mean) plus a KL loss to the initial policy, `grpo.kl_coef * k3(pi || pi_ref)`
(verl's `use_kl_loss` with `low_var_kl`: exp(ref - logp) - (ref - logp) - 1 per token, clamped to
[-10, 10]; no KL in the reward). The reference is a frozen copy of the initial policy, or with LoRA
the policy with its adapters off; `grpo.kl_coef: 0` loads none.

Think-RM's rule-based RL (trainers/think_rm.py) and pairwise RLHF (trainers/pairwise_rlhf.py) are this
loop with another reward and advantage. Metrics: `kl` (to the reference, the k3 estimate), `clip_frac`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

import trainers.ppo  # noqa: F401 - registers the `ppo` clipped surrogate
from alignment.config import BaseConfig, ConfigError, bounded
from alignment.models import frozen_copy, load_causal_lm, reference_logprobs
from alignment.online import (
    POLICY_LOSSES, OnlineTrainer, RolloutBatch, masked_mean, register_advantage, register_policy_loss,
)


@register_advantage("grpo")
def group_normalised(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(r_i - mean) / (std + eps) over each row (one prompt's group), std unbiased as in verl."""
    return (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + eps)


def low_var_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) on tokens sampled from pi, clamped as verl does."""
    log_ratio = (ref_logp - logp).clamp(-20, 20)
    return (log_ratio.exp() - log_ratio - 1).clamp(-10, 10)


@register_policy_loss("grpo")
def grpo_loss(logp, old_logp, advantages, mask, clip: float, kl_coef: float, ref_logp=None):
    """The clipped surrogate (token-mean) + kl_coef * low_var_kl to the reference (token-mean)."""
    loss, stats = POLICY_LOSSES["ppo"](logp, old_logp, advantages, mask, clip=clip)
    if ref_logp is not None:
        kl = masked_mean(low_var_kl(logp, ref_logp), mask)
        loss = loss + kl_coef * kl
        stats["kl"] = float(kl.detach())
    return loss, stats


@dataclass
class GRPOOptions:
    clip: float = bounded(0.2, gt=0, lt=1)  # policy-ratio clip
    kl_coef: float = bounded(1e-3, ge=0)  # KL loss weight (verl's default; Think-RM used 1e-4); 0: no reference model


@dataclass
class GRPOConfig(BaseConfig):
    trainer: str = "grpo"
    grpo: GRPOOptions = field(default_factory=GRPOOptions)


class GRPOTrainer(OnlineTrainer):
    config_class = GRPOConfig
    advantage = "grpo"
    policy_loss = "grpo"

    def check_config(self) -> None:
        super().check_config()
        if self.cfg.rollout.n < 2:
            raise ConfigError("rollout.n: group-relative advantages need at least 2 samples per prompt")

    def load_policy(self):
        lm = load_causal_lm(self.cfg.model)
        self.reference = frozen_copy(lm) if self.cfg.grpo.kl_coef > 0 and self.cfg.peft.type == "none" else None
        return lm

    def loss_params(self) -> dict:
        return {"clip": self.cfg.grpo.clip, "kl_coef": self.cfg.grpo.kl_coef}

    def loss_inputs(self, batch: RolloutBatch, rows: slice) -> dict[str, torch.Tensor]:
        return {"ref_logp": batch.token_logprobs["ref"][rows]} if "ref" in batch.token_logprobs else {}

    def step(self, step: int) -> dict[str, float]:
        t_start = time.perf_counter()
        batch = self.rollout(step)
        if self.cfg.grpo.kl_coef > 0:  # the reference's log-probs (with LoRA: the adapters switched off)
            r_len = batch.mask.shape[1]
            batch.token_logprobs["ref"] = self.chunked(batch, lambda rows: reference_logprobs(
                self.reference, self.model, batch.rows(rows), r_len, self.cfg.train.bf16))
        advantages = self.advantages(batch).unsqueeze(-1)  # one per sample, broadcast over its tokens
        return self.policy_update(batch, advantages, t_start, time.perf_counter() - t_start)
