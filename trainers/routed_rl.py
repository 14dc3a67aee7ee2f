"""Routed RL (`trainer: routed_rl`): online RL whose advantages are pairwise preferences, with
uncertain pairs decided by a strong LLM judge (Xu et al., NeurIPS 2025).

    align train configs/routed_rl_chain_sum.yaml reward.router.policy=budget reward.router.budget=0.2

One step: n responses per prompt -> every pair within a prompt's group scored by the SNGP preference
model in both orders (S_ij = -S_ji, uncertainty U_ij) -> the router sends uncertain pairs to the judge,
whose verdict replaces S_ij (+-2, or 0 for a tie; a failed call keeps the model's score and is
counted) -> A_i = scale * sum_{j != i} S_ij / (n - 1), the RLOO advantage with reward differences
replaced by preference logits -> the shared policy update with the registered `ppo` clipped loss
(with one mini-batch the ratio is 1 at the update: plain REINFORCE with the pairwise baseline).

Options (`routed:`): `scale` (c, default 1), `max_advantage` (the reference OpenRLHF fork clamps at
+-10), `clip`, and `verifier`: with prompts that have checkable answers, responses that fail the
rule-based check are not compared; they lose to every passing response by the judged score (the
reference's IFEval mode). The judge-routing block is `reward:` (DESIGN.md), e.g.
configs/judge_routing.yaml. There is no pointwise reward here: `reward/mean` is the mean advantage
(0 by antisymmetry), and held-out evaluation reports accuracy only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

import trainers.ppo  # noqa: F401 - registers the `ppo` policy loss
from alignment.config import BaseConfig, ConfigError, bounded
from alignment.online import ADVANTAGES, OnlineTrainer, RolloutBatch, register_advantage
from rewards.routing import PairRouter, pairwise_advantage
from rewards.verifiable import is_correct

register_advantage("pairwise")(pairwise_advantage)


@dataclass
class RoutedOptions:
    scale: float = bounded(1.0, gt=0)  # c in A_i = c * mean_j S_ij
    max_advantage: float = bounded(10.0, gt=0)  # advantages clamped to +-this
    clip: float = bounded(0.2, gt=0, lt=1)  # policy-ratio clip (matters with train.mini_batches > 1)
    verifier: bool = False  # exclude responses that fail the prompts' rule-based check from pairing


@dataclass
class RoutedRLConfig(BaseConfig):
    trainer: str = "routed_rl"
    routed: RoutedOptions = field(default_factory=RoutedOptions)


class RoutedRLTrainer(OnlineTrainer):
    config_class = RoutedRLConfig
    advantage = "pairwise"
    policy_loss = "ppo"
    current_step = 0

    def check_config(self) -> None:
        super().check_config()
        if self.cfg.reward.type != "routed":
            raise ConfigError(f"trainer: routed_rl needs reward.type=routed (a preference model, a judge and a router; "
                              f"see configs/judge_routing.yaml), got reward.type={self.cfg.reward.type}")
        if self.cfg.rollout.n < 2:
            raise ConfigError("rollout.n: pairwise advantages need at least 2 samples per prompt")

    def build_reward(self) -> PairRouter:
        return PairRouter.from_config(self.cfg.reward, self.cfg.seed)

    def loss_params(self) -> dict:
        return {"clip": self.cfg.routed.clip}

    def score(self, batch: RolloutBatch) -> torch.Tensor:
        """Each sample's advantage, from its group's routed pair scores (the registered estimator)."""
        t_start = time.perf_counter()
        index = batch.rollouts.prompt_index
        starts = [i for i in range(len(index)) if i == 0 or index[i] != index[i - 1]]
        bounds = list(zip(starts, starts[1:] + [len(index)]))
        groups = [batch.texts[a:b] for a, b in bounds]
        passed = None
        if self.cfg.routed.verifier:
            passed = [[is_correct(batch.samples[i], batch.texts[i]) for i in range(a, b)] for a, b in bounds]
        scores, stats = self.reward_fn.group_scores([batch.samples[a].prompt for a, _ in bounds], groups, passed,
                                                    self.current_step, global_batch=True)
        stats["router/judge_failures"] *= self.world  # metrics are averaged over ranks: report the step's total
        stats["time/reward_s"] = time.perf_counter() - t_start  # preference model + router + judge (within rollout_s)
        batch.stats.update(stats)
        estimator = ADVANTAGES[self.advantage]
        advantages = torch.cat([estimator(s, self.cfg.routed.scale) if len(s) > 1 else torch.zeros(len(s))
                                for s in scores]) if scores else torch.zeros(0)
        limit = self.cfg.routed.max_advantage
        return advantages.clamp(-limit, limit).to(self.backend.device)

    def step(self, step: int) -> dict[str, float]:
        self.current_step = step
        t_start = time.perf_counter()
        batch = self.rollout(step)
        # score() computed A_i with the registered estimator on each group's pair scores
        advantages = batch.rewards.reshape(-1, 1)  # one value per sample, broadcast over its tokens
        return self.policy_update(batch, advantages, t_start, time.perf_counter() - t_start)

    def evaluate(self) -> dict[str, float]:
        metrics = super().evaluate()
        metrics.pop("eval/reward", None)  # single greedy responses have no pairs to compare
        return metrics

