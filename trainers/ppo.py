"""PPO (`trainer: ppo`) with a learned critic, GAE and a per-token KL penalty, on the shared engine.

    align train configs/ppo_*.yaml          (any reward: verifiable, python, remote RM)
    Self-Rewarding PPO builds on it: trainers/self_rewarding_ppo.py

One step, OpenRLHF / TRL style:

    roll out n samples per prompt -> sequence score s (the reward function)
    old log-probs (policy), reference log-probs (frozen), values V_t (critic), all before any update
    token rewards  r_t = -kl.coef * (log pi_old - log pi_ref)_t,   r_last += s
    GAE:           delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   R_t = A_t + V_t
    ppo.epochs x train.mini_batches optimizer steps of the clipped surrogate (policy) and of the
    clipped value loss (critic)

The critic is a separate model (the policy's backbone, or `ppo.critic_model`, with a zero-initialised
scalar head), not a value head on the policy: value-loss gradients then never move the policy
(TRL's shared-head PPOv1 needed a vf_coef to balance them), the critic has its own learning rate,
and a LoRA policy keeps its reference for free (adapters off). It costs a second backbone, as in
OpenRLHF and TRL's PPO trainers. It gets the same `peft` options (AdaLoRA included) and its own
optimizer; it is checkpointed under `checkpoints/step-N/critic/`.

Metrics: `kl` (per-token KL to the reference, k1 estimate on the samples), `clip_frac`,
`loss/policy`, `loss/value`, `entropy`, `value/explained_variance`, `ppo/approx_kl` (drift from
the rollout policy during the updates); `reward/mean` is the sequence score before the KL penalty.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from transformers import AutoModel

from alignment.backend import Backend
from alignment.config import BaseConfig, ConfigError, bounded
from alignment.models import apply_peft, autocast, frozen_copy, hf_model, load_causal_lm, reference_logprobs, resolve_path
from alignment.online import (
    OnlineTrainer, RolloutBatch, kl_k3, masked_mean, register_advantage, register_policy_loss,
)


# ---- the math, registered by name -------------------------------------------------------------
@register_advantage("gae")
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


@register_policy_loss("ppo")
def ppo_clip_loss(logp, old_logp, advantages, mask, clip: float):
    """Clipped surrogate, token-mean: max(-A r, -A clip(r, 1-eps, 1+eps)) with r = pi / pi_old."""
    ratio = (logp - old_logp).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    return loss, {"clip_frac": float(clip_frac)}


def kl_penalised_rewards(scores, logp, ref_logp, mask, coef: float):
    """(token rewards, per-token KL): -coef * (log pi - log pi_ref) at every response token (the k1
    estimate on tokens sampled from pi), plus the sequence score at the last token."""
    kl = (logp - ref_logp) * mask
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


# ---- the critic -------------------------------------------------------------------------------
class ValueModel(torch.nn.Module):
    """A causal LM's backbone with a scalar head: V at each position that predicts a response token."""

    def __init__(self, backbone: torch.nn.Module, bf16: bool):
        super().__init__()
        self.backbone = backbone
        self.bf16 = bf16
        self.value_head = torch.nn.Linear(hf_model(backbone).config.hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)  # start at V = 0: no made-up baseline
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, position_ids, response_len: int):
        with autocast(self.bf16):
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=False).last_hidden_state
        return self.value_head(hidden[:, -response_len - 1: -1].float()).squeeze(-1)


# ---- config -----------------------------------------------------------------------------------
@dataclass
class PPOOptions:
    epochs: int = bounded(2, ge=1)  # optimizer passes over each rollout batch (TRL num_ppo_epochs 4, OpenRLHF 1)
    clip: float = bounded(0.2, gt=0, lt=1)  # policy ratio clip
    value_clip: float = bounded(0.2, gt=0)  # critic: values move at most this far from their rollout-time values
    gamma: float = bounded(1.0, ge=0, le=1)
    lam: float = bounded(0.95, ge=0, le=1)
    whiten_advantages: bool = True  # over the global batch's response tokens
    whiten_rewards: bool = False  # sequence scores to zero mean, unit std over the global batch
    critic_lr: float = bounded(1e-5, gt=0)
    critic_model: str | None = None  # critic backbone; None: the policy's initial model


@dataclass
class KLOptions:
    coef: float = bounded(0.05, ge=0)  # per-token penalty (TRL's default)
    # sft: the initial policy (a frozen copy, or the LoRA policy with adapters off);
    # base: the pretrained model of Self-Rewarding PPO (model.path there)
    reference: Literal["sft", "base"] = "sft"


@dataclass
class PPOConfig(BaseConfig):
    trainer: str = "ppo"
    ppo: PPOOptions = field(default_factory=PPOOptions)
    kl: KLOptions = field(default_factory=KLOptions)


class PPOTrainer(OnlineTrainer):
    config_class = PPOConfig
    policy_loss = "ppo"
    has_base_model = False  # Self-Rewarding PPO has a pretrained base besides the initial policy
    resume_fixed_keys = OnlineTrainer.resume_fixed_keys + ("ppo.critic_model",)

    def __init__(self, cfg: PPOConfig):
        super().__init__(cfg)
        critic_path = resolve_path(cfg.ppo.critic_model or self.policy_path())
        backbone = AutoModel.from_pretrained(critic_path, dtype=torch.float32,
                                             attn_implementation=cfg.model.attn_implementation)
        backbone = apply_peft(backbone, cfg.peft, self.total_updates)
        self.critic = ValueModel(backbone, cfg.train.bf16).eval()  # with PEFT, the fresh head trains in full
        critic_train = dataclasses.replace(cfg.train, lr=cfg.ppo.critic_lr)
        self.critic_backend = Backend(self.critic, critic_train, self.mini_batch_rows)

    @property
    def epochs(self) -> int:
        return self.cfg.ppo.epochs

    def policy_path(self) -> str:
        return self.cfg.model.path

    def load_policy(self):
        """The initial policy, and a frozen copy of it as the KL reference ("sft"); with LoRA the
        reference is free: the policy with its adapters off."""
        lm = load_causal_lm(dataclasses.replace(self.cfg.model, path=self.policy_path()))
        self.reference = frozen_copy(lm) if self.cfg.peft.type == "none" else None
        return lm

    def check_config(self) -> None:
        super().check_config()
        if self.cfg.kl.reference == "base" and not self.has_base_model:
            raise ConfigError("kl.reference=base: plain PPO has no base model (its reference is the initial "
                              "policy, kl.reference=sft); Self-Rewarding PPO (trainer: sr_ppo) has one")

    def reference_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        if self.cfg.kl.reference in batch.token_logprobs:  # computed with the reward already
            return batch.token_logprobs[self.cfg.kl.reference]
        return reference_logprobs(self.reference, self.model, batch.inputs, batch.mask.shape[1], self.cfg.train.bf16)

    def values(self, batch: RolloutBatch) -> torch.Tensor:
        r_len = batch.mask.shape[1]
        return self.chunked(batch, lambda rows: self.critic_backend(**batch.rows(rows), response_len=r_len))

    # ---- the step ----------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        cfg, opts = self.cfg, self.cfg.ppo
        t_start = time.perf_counter()
        batch = self.rollout(step)
        mask = batch.mask
        old_logp = self.policy_logprobs(batch)
        ref_logp = self.reference_logprobs(batch) * mask
        old_values = self.values(batch) * mask

        scores = whiten(batch.rewards, torch.ones_like(batch.rewards)) if opts.whiten_rewards else batch.rewards
        token_rewards, kl = kl_penalised_rewards(scores, old_logp, ref_logp, mask, cfg.kl.coef)
        advantages, returns = gae(token_rewards, old_values, mask, opts.gamma, opts.lam)
        if opts.whiten_advantages:
            advantages = whiten(advantages, mask)
        t_rollout = time.perf_counter() - t_start

        def policy_loss(rows, logp, entropy):
            m = mask[rows]
            loss, stats = ppo_clip_loss(logp, old_logp[rows], advantages[rows], m, opts.clip)
            return loss, {"loss/policy": float(loss.detach()), "entropy": float(masked_mean(entropy, m)),
                          "ppo/approx_kl": float(masked_mean(kl_k3(old_logp[rows], logp.detach()), m)), **stats}

        stats = self.train_policy(batch, old_logp, policy_loss)
        stats.update(self.train_critic(batch, old_values, returns))
        stats.update({
            "kl": float(masked_mean(kl, mask)),
            "value/mean": float(masked_mean(old_values, mask)),
            "value/explained_variance": explained_variance(old_values, returns, mask),
        })
        return self.step_metrics(batch, stats, t_start, t_rollout)

    def train_critic(self, batch: RolloutBatch, old_values, returns) -> dict[str, float]:
        losses, norms = [], []
        for _ in range(self.epochs):
            for micro in self.micro_slices(len(batch.mask)):
                for rows in micro:
                    values = self.critic_backend(**batch.rows(rows), response_len=batch.mask.shape[1])
                    loss = clipped_value_loss(values, old_values[rows], returns[rows], batch.mask[rows],
                                              self.cfg.ppo.value_clip)
                    self.critic_backend.backward(loss)
                    losses.append(float(loss.detach()))
                norms.append(self.critic_backend.step())
        return {"loss/value": sum(losses) / len(losses), "value/grad_norm": sum(norms) / len(norms)}

    # ---- the critic's checkpoint -------------------------------------------------------------
    def save_extra(self, folder: Path) -> None:
        from safetensors.torch import save_file

        (folder / "critic").mkdir(exist_ok=True)
        with self.critic_backend.gathered():
            if self.backend.is_main:
                trained = {n: p.detach().clone().contiguous() for n, p in self.critic.named_parameters()
                           if p.requires_grad}
                save_file(trained, folder / "critic" / "model.safetensors")
        self.critic_backend.save_state(folder / "critic")

    def load_extra(self, folder: Path) -> None:
        from safetensors.torch import load_file

        if self.critic_backend.deepspeed is None:
            _, unexpected = self.critic.load_state_dict(load_file(folder / "critic" / "model.safetensors"), strict=False)
            if unexpected:
                raise RuntimeError(f"{folder}/critic: checkpoint does not match the critic ({unexpected})")
        self.critic_backend.load_state(folder / "critic")
