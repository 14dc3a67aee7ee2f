"""Reward model (`trainer: reward_model`): a one-logit sequence classifier on preference pairs.

    align train configs/rm_hhh.yaml rm.loss=r3m rm.lam=0.75

Margin m = r(x, chosen) - r(x, rejected) (minus `rm.margin_scale * strength` when rows carry a
strength, TRL's margin convention). `rm.loss: bt` is Bradley-Terry, -log sigmoid(m); `r3m` adds the
closed-form per-pair outlier variable (alignment/algos.py), logs `r3m/outlier_frac` and writes
outliers.jsonl. Any backbone: an encoder (builtin:all-minilm-l6-v2) or a causal LM with a score
head; chosen and rejected go through one forward. `final/` loads with
AutoModelForSequenceClassification and is what `align serve-rm` serves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from alignment.config import BaseConfig, bounded
from alignment.adapters import apply_peft
from alignment.models import load_reward_model
from alignment.offline import PairwiseTrainer
from rewards.reward_model import MAX_LENGTH_KEY, RewardForward, encode_for_reward


@dataclass
class RMOptions:
    loss: Literal["bt", "r3m"] = "bt"  # bt: Bradley-Terry; r3m: R^3M (sparse outliers, l1-penalised MLE)
    lam: float = 0.75  # R^3M lambda in (0, 1): pairs with margin < log(1/lam - 1) are flagged
    margin_scale: float = bounded(0.0, ge=0)  # > 0: ask for r_chosen - r_rejected > margin_scale * strength
    max_length: int = bounded(512, ge=1)  # tokens of prompt + response


@dataclass
class RewardModelConfig(BaseConfig):
    rm: RMOptions = field(default_factory=RMOptions)


class RewardModelTrainer(PairwiseTrainer):
    config_class = RewardModelConfig
    section = "rm"

    def build_model(self):
        model = load_reward_model(self.cfg.model, self.tokenizer)
        setattr(model.config, MAX_LENGTH_KEY, self.cfg.rm.max_length)  # saved in final/config.json for serving
        head = [name for name in ("score", "classifier") if hasattr(model, name)]
        model = apply_peft(model, self.cfg.peft, self.total_updates, modules_to_save=head)
        self.module = RewardForward(model, self.cfg.train.bf16)
        return model

    def margins(self, pairs):
        prompts = [p.prompt for p in pairs]
        encoded = encode_for_reward(self.tokenizer, prompts + prompts, [p.chosen for p in pairs] +
                                    [p.rejected for p in pairs], self.cfg.rm.max_length)
        rewards = self.backend(**{k: v.to(self.backend.device) for k, v in encoded.items()})
        margins = rewards[: len(pairs)] - rewards[len(pairs):]
        if self.cfg.rm.margin_scale:
            strength = torch.tensor([p.strength or 0 for p in pairs], dtype=margins.dtype, device=margins.device)
            margins = margins - self.cfg.rm.margin_scale * strength
        return margins, int(encoded["attention_mask"].sum())

