"""One file per method; `TRAINERS` maps a recipe's `trainer:` key to its trainer class."""

from __future__ import annotations

import importlib

from alignment.config import ConfigError

TRAINERS = {
    "pmd": "trainers.pmd:PMDTrainer",
    "reward_model": "trainers.reward_model:RewardModelTrainer",
    "dpo": "trainers.dpo:DPOTrainer",
    "sft": "trainers.sft:SFTTrainer",
    "ppo": "trainers.ppo:PPOTrainer",
    "sr_ppo": "trainers.self_rewarding_ppo:SelfRewardingPPOTrainer",
    "preference_model": "trainers.preference_model:PreferenceModelTrainer",
    "routed_rl": "trainers.routed_rl:RoutedRLTrainer",
    "grpo": "trainers.grpo:GRPOTrainer",
    "think_rm": "trainers.think_rm:ThinkRMTrainer",
    "pairwise_rlhf": "trainers.pairwise_rlhf:PairwiseRLHFTrainer",
}


def get_trainer(name: str):
    if not isinstance(name, str) or name not in TRAINERS:
        raise ConfigError(f"trainer: unknown trainer {name!r} (valid: {', '.join(sorted(TRAINERS))})")
    module, cls = TRAINERS[name].split(":")
    return getattr(importlib.import_module(module), cls)
