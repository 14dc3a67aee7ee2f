"""Self-Rewarding PPO (`trainer: sr_ppo`): alignment from demonstrations only.

Zhang, Qiu, Hong, et al., COLM 2025 (arXiv 2510.21090). The whole pipeline is
one recipe (configs/sr_ppo_smollm2.yaml):

    stage 1  SFT of the base model (`model.path`) on demonstrations (`sft.data`), into
             <output_dir>/sft/final (skipped when `sr_ppo.sft_model` names a model; reused on resume)
    stage 2  PPO (trainers/ppo.py) from pi_SFT on prompts (`data.*`, which may be unseen), with the
             "coherent" reward of two frozen models, summed over the response tokens and placed at
             the last token:  r(x, y) = log pi_SFT(y|x) - log pi_base(y|x)

No preference labels and no reward model. Choices where the paper's text was not available, with
our defaults:

- `sr_ppo.length_norm: false`: the paper's sequence sum. A positive mean per-token ratio makes
  the sum grow with length; `srppo/log_ratio_per_token` and `response_length/mean` are logged so
  length hacking shows, and `length_norm: true` divides by the response length.
- `kl.reference: sft` (the usual PPO reference, the initial policy) at `kl.coef` 0.05. With
  `reference: base` and coef 1 the optimum of E[r] - KL(pi || pi_base) is pi_SFT itself (nothing
  to gain); with the SFT reference it is pi_SFT^(1+1/beta) pi_base^(-1/beta), which moves away from
  the base. tests/test_ppo.py checks both on a tabular problem.
- `ppo.whiten_rewards: false`: GAE advantages are whitened already (`ppo.whiten_advantages`).
- The critic starts from pi_SFT's backbone with a zero head; PPO prompts are `data.*`, free to
  differ from the demonstrations' prompts.

pi_SFT costs nothing extra with LoRA (the policy with adapters off); pi_base is always a frozen copy.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignment.config import DataConfig
from alignment.logprobs import reference_logprobs
from alignment.models import frozen, load_causal_lm
from alignment.online import RolloutBatch
from alignment.precision import resolve_bf16
from trainers.ppo import PPOConfig, PPOTrainer
from trainers.sft import SFTConfig, SFTOptions, SFTTrainer

log = logging.getLogger("alignment")


@dataclass
class SFTStage:
    """Stage 1, run when `sr_ppo.sft_model` is not set: SFT of `model.path` on demonstrations."""

    data: DataConfig = field(default_factory=DataConfig)  # {"prompt", "completion"} or {"messages"} rows
    epochs: float = 3.0  # stage 1 (SFT): epochs over the demonstrations
    lr: float = 1e-4  # stage 1: learning rate
    batch_size: int = 8  # stage 1: demonstrations per step
    max_length: int = 512  # stage 1: tokens of prompt + completion


@dataclass
class SRPPOOptions:
    sft_model: str | None = None  # pi_SFT; None: stage 1 trains it into <output_dir>/sft/final
    length_norm: bool = False  # divide the log-ratio by the response length (the paper sums)


@dataclass
class SRPPOConfig(PPOConfig):
    trainer: str = "sr_ppo"
    sr_ppo: SRPPOOptions = field(default_factory=SRPPOOptions)
    sft: SFTStage = field(default_factory=SFTStage)


def train_sft_stage(cfg: SRPPOConfig) -> str:
    """Stage 1 into <output_dir>/sft: reused when its final model exists, resumed when it was cut off."""
    out = Path(cfg.output_dir) / "sft"
    if (out / "final" / "config.json").is_file():
        log.info("stage 1 (SFT) done already: %s", out / "final")
        return str(out / "final")
    stage = cfg.sft
    sft_cfg = SFTConfig(
        trainer="sft", output_dir=str(out), seed=cfg.seed, resume=cfg.resume, model=cfg.model, data=stage.data,
        train=dataclasses.replace(cfg.train, lr=stage.lr, batch_size=stage.batch_size, epochs=stage.epochs,
                                  mini_batches=1, save_every=0, eval_every=0),
        peft=cfg.peft, sft=SFTOptions(max_length=stage.max_length),
    )
    log.info("stage 1: SFT of %s on %s", cfg.model.path, stage.data.path)
    trainer = SFTTrainer(sft_cfg)
    trainer.train()
    del trainer
    return str(out / "final")


class SelfReward:
    """r(x, y) = log pi_SFT(y|x) - log pi_base(y|x), summed over the response tokens (or averaged with
    `length_norm`); the per-token log-probs are kept in the batch for the KL penalty, whichever its
    reference. pi_SFT is PPO's reference (a frozen copy, or the LoRA policy with adapters off)."""

    def __init__(self, trainer: PPOTrainer, base, length_norm: bool):
        self.trainer, self.base, self.length_norm = trainer, base, length_norm

    def __call__(self, batch: RolloutBatch) -> torch.Tensor:
        t = self.trainer
        sft = t.reference_logprobs(batch)
        base = t.chunked(batch, lambda rows: reference_logprobs(self.base, t.model, batch.rows(rows),
                                                                batch.mask.shape[1], t.cfg.train.bf16))
        batch.token_logprobs.update(sft=sft, base=base)
        log_ratio = ((sft - base) * batch.mask).sum(-1)
        length = batch.mask.sum(-1).clamp(min=1)
        batch.stats["srppo/log_ratio_per_token"] = float(log_ratio.sum() / length.sum())
        return log_ratio / length if self.length_norm else log_ratio


class SelfRewardingPPOTrainer(PPOTrainer):
    """PPO (its step, trainers/ppo.py) from pi_SFT, rewarded by SelfReward."""

    config_class = SRPPOConfig
    resume_fixed_keys = PPOTrainer.resume_fixed_keys + ("sr_ppo.sft_model",)

    def __init__(self, cfg: SRPPOConfig):
        cfg.train.bf16 = resolve_bf16(cfg.train.bf16).bf16  # once, for both stages and pi_base
        sft_path = cfg.sr_ppo.sft_model or train_sft_stage(cfg)
        # the policy, its KL reference (pi_SFT) and the critic start from pi_SFT
        super().__init__(cfg, policy_path=sft_path, reward_from_config=False)
        self.reward = SelfReward(self, frozen(load_causal_lm(cfg.model)), cfg.sr_ppo.length_norm)
