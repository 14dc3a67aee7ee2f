"""PPO (`trainer: ppo`) with a learned critic, GAE and a per-token KL penalty, on the shared engine.

    align train configs/ppo_*.yaml          (any reward: verifiable, python, remote RM)
    Self-Rewarding PPO builds on it: trainers/self_rewarding_ppo.py

One step, OpenRLHF / TRL style:

    roll out n samples per prompt -> sequence score s (the reward function)
    old log-probs (policy), reference log-probs (frozen), values V_t (critic), all before any update
    token rewards  r_t = -kl.coef * (log pi_old - log pi_ref)_t,   r_last += s
    GAE:           delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   R_t = A_t + V_t
    ppo.passes x train.mini_batches optimizer steps of the clipped surrogate (policy) and of the
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModel

from alignment.algos import (
    POLICY_LOSSES, PolicyObjective, clipped_value_loss, explained_variance, gae, kl_penalised_rewards, masked_mean,
    whiten,
)
from alignment.backend import Backend
from alignment.config import BaseConfig, ConfigError, bounded
from alignment.data import load_prompts
from alignment.adapters import apply_peft, hf_model
from alignment.logprobs import autocast
from alignment.models import load_causal_lm, load_tokenizer, reference_model, resolve_path
from alignment.online import OnlineTrainer, StepTimer
from rewards import answers_needed, batch_reward
from rewards.verifiable import accuracy_checks


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
    passes: int = bounded(2, ge=1)  # optimizer passes over each rollout batch (TRL num_ppo_epochs 4, OpenRLHF 1)
    clip: float = bounded(0.2, gt=0, lt=1)  # policy ratio clip
    value_clip: float = bounded(0.2, gt=0)  # critic: values move at most this far from their rollout-time values
    gamma: float = bounded(1.0, ge=0, le=1)  # GAE discount
    lam: float = bounded(0.95, ge=0, le=1)  # GAE lambda
    whiten_advantages: bool = True  # over the global batch's response tokens
    whiten_rewards: bool = False  # sequence scores to zero mean, unit std over the global batch
    critic_lr: float = bounded(1e-5, gt=0)  # the critic's own AdamW learning rate
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
    resume_fixed_keys = OnlineTrainer.resume_fixed_keys + ("ppo.critic_model",)

    def __init__(self, cfg: PPOConfig, policy_path: str | None = None, reward_from_config: bool = True):
        """`policy_path`: the initial policy (default model.path; Self-Rewarding PPO's pi_SFT). Without
        `reward_from_config` the caller sets `self.reward` (SR-PPO's log-ratio of two models)."""
        super().__init__(cfg)
        if cfg.kl.reference == "base" and reward_from_config:
            raise ConfigError("kl.reference=base: plain PPO has no base model (its reference is the initial "
                              "policy, kl.reference=sft); Self-Rewarding PPO (trainer: sr_ppo) has one")
        policy_path = policy_path or cfg.model.path
        self.tokenizer = load_tokenizer(cfg.model)
        self.train_set, self.eval_set = load_prompts(cfg.data, cfg.seed,
                                                     answers_needed(cfg.reward) if reward_from_config else None)
        if reward_from_config:
            self.reward = batch_reward(cfg)
        self.eval_checks = accuracy_checks(self.eval_set)
        lm = load_causal_lm(dataclasses.replace(cfg.model, path=policy_path))
        self.reference = reference_model(lm, cfg.peft)  # kl.reference=sft
        self.objective = PolicyObjective(POLICY_LOSSES.get("ppo", cfg.ppo))  # the clipped surrogate at ppo.clip
        self.setup_policy(lm)
        # The critic: its own backbone (value gradients never move the policy), head zero-initialised,
        # same PEFT options, its own optimizer and learning rate.
        backbone = AutoModel.from_pretrained(resolve_path(cfg.ppo.critic_model or policy_path), dtype=torch.float32,
                                             attn_implementation=cfg.model.attn_implementation)
        self.critic = ValueModel(apply_peft(backbone, cfg.peft, self.total_updates), cfg.train.bf16).eval()
        self.critic_backend = Backend(self.critic, dataclasses.replace(cfg.train, lr=cfg.ppo.critic_lr),
                                      self.mini_batch_rows, self.total_updates)

    @property
    def passes(self) -> int:
        return self.cfg.ppo.passes

    # ---- the step ----------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        cfg, opts = self.cfg, self.cfg.ppo
        timer = StepTimer()
        batch = self.rollout(step)
        batch.rewards = self.reward(batch)  # sequence scores
        mask, r_len = batch.mask, batch.mask.shape[1]
        old_logp = batch.rollout_logp() if cfg.train.old_logprobs == "rollout" else self.policy_logprobs(batch)
        ref_logp = batch.token_logprobs.get(cfg.kl.reference)  # SR-PPO's reward computed them already
        ref_logp = (self.reference_logprobs(batch) if ref_logp is None else ref_logp) * mask
        old_values = self.chunked(batch, lambda rows: self.critic_backend(**batch.rows(rows), response_len=r_len))
        old_values = old_values * mask
        scores = whiten(batch.rewards, torch.ones_like(batch.rewards)) if opts.whiten_rewards else batch.rewards
        token_rewards, kl = kl_penalised_rewards(scores, old_logp, ref_logp, mask, cfg.kl.coef)
        batch.advantages, returns = gae(token_rewards, old_values, mask, opts.gamma, opts.lam)  # per token
        if opts.whiten_advantages:
            batch.advantages = whiten(batch.advantages, mask)
        timer.lap("rollout")

        stats = self.train_policy(batch, self.objective, old_logp=old_logp)
        stats["loss/policy"], stats["ppo/approx_kl"] = stats["loss"], stats.pop("kl")  # drift from the rollout policy
        stats.update(self.train_critic(batch, old_values, returns))
        stats.update({
            "kl": float(masked_mean(kl, mask)),  # to the reference, the k1 estimate on the samples
            "value/mean": float(masked_mean(old_values, mask)),
            "value/explained_variance": explained_variance(old_values, returns, mask),
        })
        timer.lap("train")
        stats["sync/logprob_err"] = self.sync_weights()
        timer.lap("sync")
        return self.step_metrics(batch, stats, timer)

    def train_critic(self, batch, old_values, returns) -> dict[str, float]:
        r_len = batch.mask.shape[1]

        def value_loss(rows, _on_policy):
            values = self.critic_backend(**batch.rows(rows), response_len=r_len)
            clip = self.cfg.ppo.value_clip
            return clipped_value_loss(values, old_values[rows], returns[rows], batch.mask[rows], clip), {}

        stats = self.optimize(self.critic_backend, len(batch.mask), value_loss)
        return {"loss/value": stats["loss"], "value/grad_norm": stats["grad_norm"]}

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
