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
    "think_rm_sft": "trainers.think_rm:ThinkRMSFTTrainer",
    "think_rm_rl": "trainers.think_rm:ThinkRMRLTrainer",
    "pairwise_rlhf": "trainers.pairwise_rlhf:PairwiseRLHFTrainer",
}


def get_trainer(name: str):
    if name == "think_rm":
        raise ConfigError("trainer: think_rm was split by stage: use trainer: think_rm_sft (warm-up on reasoning) "
                          "or trainer: think_rm_rl (rule-based RL)")
    if not isinstance(name, str) or name not in TRAINERS:
        raise ConfigError(f"trainer: unknown trainer {name!r} (valid: {', '.join(sorted(TRAINERS))})")
    module, cls = TRAINERS[name].split(":")
    return getattr(importlib.import_module(module), cls)
