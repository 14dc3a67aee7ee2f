"""Pairwise RLHF (`trainer: pairwise_rlhf`): GRPO whose advantages come straight from a generative
RM's pairwise preferences, with no pointwise reward (Think-RM, Hong et al., NeurIPS 2025).

    align train configs/pairwise_rlhf_hhh.yaml

One step: G = rollout.n responses per prompt -> the judge (`reward.judge`: a Think-RM on our engine,
`type: generative_rm`, or any OpenAI-compatible server with `verdict: binary | multiclass`) compares
every unordered pair i < j once, y_i as Assistant A and y_j as B -> preference strengths d_ij > 0
when y_i is better (rewards/generative.py: multiclass -s / 3; binary +-1 / L with L the characters
of the judge's output, `pairwise.length_weight`; unparsable 0), d_ji = -d_ij ->

    A_i = (1/G) sum_j d_ij / sqrt( sum_{k,l} d_kl^2 / (2 G (G - 1)) + 1e-6 )

(registered as `grpo_difference`; with d_ij = r_i - r_j it is GRPO's (r_i - mean) / std) -> the
GRPO update (clipped loss, low_var_kl KL loss; trainers/grpo.py). With `reward.judge.position_swap`
every pair is also judged as (y_j, y_i) and d_ij = (d(i, j) - d(j, i)) / 2, which cancels a judge's
position bias at twice the judge cost (the reference asks once).

A judge call that fails after its retries, or whose output has no verdict, gives d = 0 for that pair
(the reference's rule for unparsable output) and is counted in `genrm/parse_fail_frac`; a step where
every call fails stops the run rather than train on nothing. `reward.type` is a pointwise reward
used for monitoring only (`reward/mean`, `eval/reward`), e.g. a gold reward on a toy task;
`reward.type: none` for none.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignment.config import ConfigError
from alignment.online import ADVANTAGES, RolloutBatch, register_advantage
from rewards import build_reward
from rewards.generative import GenRMFormat, pair_strength
from rewards.judges import Judgement, build_judge
from trainers.grpo import GRPOConfig, GRPOTrainer


@register_advantage("grpo_difference")
def pairwise_group_advantage(strengths: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A_i = mean_j d_ij / RMS(d) per group; `strengths` (prompts, G, G) skew-symmetric -> (prompts, G).
    RMS over the G (G - 1) off-diagonal entries of each group, with the reference's 1/2 factor."""
    g = strengths.shape[-1]
    scale = torch.sqrt((strengths**2).sum((-2, -1)) / (2 * g * (g - 1)) + eps)
    return strengths.sum(-1) / g / scale.unsqueeze(-1)


@dataclass
class PairwiseOptions:
    length_weight: bool = True  # binary verdicts: d = +-1 / (characters of the judge output), else +-1


@dataclass
class PairwiseRLHFConfig(GRPOConfig):
    trainer: str = "pairwise_rlhf"
    pairwise: PairwiseOptions = field(default_factory=PairwiseOptions)


class PairwiseRLHFTrainer(GRPOTrainer):
    config_class = PairwiseRLHFConfig
    advantage = "grpo_difference"

    def check_config(self) -> None:
        super().check_config()
        if self.cfg.reward.judge is None:
            raise ConfigError("reward.judge: required with trainer: pairwise_rlhf (the generative RM that compares "
                              "responses, e.g. type: generative_rm with model: runs/think_rm_rl/final)")

    def build_reward(self):
        """The judge, and the monitoring reward (None with reward.type=none)."""
        self.judge = build_judge(self.cfg.reward.judge)
        if self.cfg.reward.type == "none":
            return None
        if self.cfg.reward.type == "verifiable" and any(e.answer is None and e.entry is None for e in self.train_set):
            raise ConfigError("reward.type=verifiable (the default) monitors answers these prompts do not have: "
                              "set reward.type=none, or a python / remote reward to watch")
        return build_reward(self.cfg.reward)

    def score(self, batch: RolloutBatch) -> torch.Tensor:
        if self.reward_fn is None:
            return torch.zeros(len(batch.texts), device=self.backend.device)
        return super().score(batch)

    def strength(self, judgement: Judgement) -> float:
        if judgement.verdict is None:
            return 0.0
        if isinstance(self.judge.fmt, GenRMFormat):
            return pair_strength(self.judge.fmt, judgement.text, self.cfg.pairwise.length_weight)
        return judgement.verdict  # a label judge: +1 / -1, 0 for a tie

    def advantages(self, batch: RolloutBatch) -> torch.Tensor:
        g = self.cfg.rollout.n
        groups = len(batch.texts) // g
        pairs = [(k, i, j) for k in range(groups) for i in range(g) for j in range(i + 1, g)]
        prompts = [batch.samples[k * g].prompt for k, _, _ in pairs]
        first = [batch.texts[k * g + i] for k, i, _ in pairs]
        second = [batch.texts[k * g + j] for k, _, j in pairs]
        calls = self.judge.judge(prompts, first, second)
        d = [self.strength(c) for c in calls]
        if self.cfg.reward.judge.position_swap:
            swapped = self.judge.judge(prompts, second, first)
            d = [(ab - self.strength(ba)) / 2 for ab, ba in zip(d, swapped)]
            calls += swapped
        failed = sum(c.verdict is None for c in calls)
        if calls and failed == len(calls):
            raise RuntimeError(f"every one of the {len(calls)} judge calls of this step gave no verdict "
                               f"(e.g. {calls[0].reason}); check reward.judge")
        batch.stats["genrm/parse_fail_frac"] = failed / max(len(calls), 1)
        batch.stats["judge/calls"] = float(len(calls))
        strengths = torch.zeros(groups, g, g)
        for (k, i, j), value in zip(pairs, d):
            strengths[k, i, j], strengths[k, j, i] = value, -value
        return ADVANTAGES[self.advantage](strengths).reshape(-1).to(self.backend.device)
