"""Pairwise RLHF (`trainer: pairwise_rlhf`): GRPO whose advantages come straight from a generative
RM's pairwise preferences, with no pointwise reward (Think-RM, Hong et al., NeurIPS 2025).

    align train configs/pairwise_rlhf_hhh.yaml

One step: G = rollout.n responses per prompt -> the judge (`reward.judge`: a Think-RM on our engine,
`type: generative_rm`, or any OpenAI-compatible server with `verdict: binary | multiclass`) compares
every unordered pair i < j once, y_i as Assistant A and y_j as B -> preference strengths d_ij > 0
when y_i is better (rewards/generative.py: multiclass -s / 3; binary +-1 / L with L the characters
of the judge's output, `pairwise.length_weight`; unparsable 0), d_ji = -d_ij ->

    A_i = (1/G) sum_j d_ij / sqrt( sum_{k,l} d_kl^2 / (2 G (G - 1)) + 1e-6 )

(`algo.advantage: pairwise_grpo`, alignment/algos.py; with d_ij = r_i - r_j it is GRPO's
(r_i - mean) / std) -> the GRPO update (`algo.policy_loss: ppo`, KL loss at `algo.kl_coef`). With
`reward.judge.position_swap` every pair is also judged as (y_j, y_i) and d_ij = (d(i, j) - d(j, i)) / 2,
which cancels a judge's position bias at twice the judge cost (the reference asks once).

A judge call that fails after its retries, or whose output has no verdict, gives d = 0 for that pair
(the reference's rule for unparsable output) and is counted in `genrm/parse_fail_frac`; a step where
every call fails stops the run rather than train on nothing. `reward.type` is a pointwise reward
used for monitoring only (`reward/mean`, `eval/reward`), e.g. a gold reward on a toy task;
`reward.type: none` for none.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignment.algos import PREFERENCE_ADVANTAGES, PolicyObjective
from alignment.config import AlgoConfig, BaseConfig, ConfigError
from alignment.data import in_both_orders, load_prompts
from alignment.models import load_causal_lm, load_tokenizer, reference_model
from alignment.online import OnlineTrainer, RolloutBatch, StepTimer, require_groups
from rewards import answers_needed, batch_reward
from rewards.generative import GenRMFormat, pair_strength
from rewards.judges import Judgement, build_judge
from rewards.verifiable import accuracy_checks


@dataclass
class PairwiseOptions:
    length_weight: bool = True  # binary verdicts: d = +-1 / (characters of the judge output), else +-1


@dataclass
class PairwiseRLHFConfig(BaseConfig):
    trainer: str = "pairwise_rlhf"
    pairwise: PairwiseOptions = field(default_factory=PairwiseOptions)
    algo: AlgoConfig = field(default_factory=lambda: AlgoConfig(advantage="pairwise_grpo", policy_loss="ppo",
                                                                kl_coef=1e-3))


class PairwiseRLHFTrainer(OnlineTrainer):
    config_class = PairwiseRLHFConfig

    def __init__(self, cfg: PairwiseRLHFConfig):
        super().__init__(cfg)
        require_groups(cfg, "pairwise comparisons")
        if cfg.reward.judge is None:
            raise ConfigError("reward.judge: required with trainer: pairwise_rlhf (the generative RM that compares "
                              "responses, e.g. type: generative_rm with model: runs/think_rm_rl/final)")
        self.advantage = PREFERENCE_ADVANTAGES.get(cfg.algo.advantage, cfg.algo, "algo.advantage")
        self.objective = PolicyObjective.from_config(cfg.algo)
        self.tokenizer = load_tokenizer(cfg.model)
        self.train_set, self.eval_set = load_prompts(cfg.data, cfg.seed)
        self.judge = build_judge(cfg.reward.judge)
        if cfg.reward.type != "none":  # monitoring only
            if answers_needed(cfg.reward) and any(e.answer is None and e.entry is None for e in self.train_set):
                raise ConfigError("reward.type=verifiable (the default) monitors answers these prompts do not have: "
                                  "set reward.type=none, or a python / remote reward to watch")
            self.reward = batch_reward(cfg)
        self.eval_checks = accuracy_checks(self.eval_set)
        lm = load_causal_lm(cfg.model)
        self.reference = reference_model(lm, cfg.peft) if cfg.algo.kl_coef > 0 else None
        self.setup_policy(lm)

    def step(self, step: int) -> dict[str, float]:
        timer = StepTimer()
        batch = self.rollout(step)
        if self.reward is not None:
            batch.rewards = self.reward(batch)  # monitoring only
        batch.advantages = self.advantage(self.judged_preferences(batch)).reshape(-1)
        ref_logp = self.reference_logprobs(batch) if self.cfg.algo.kl_coef > 0 else None
        timer.lap("rollout")
        stats = self.train_policy(batch, self.objective, ref_logp=ref_logp)
        timer.lap("train")
        stats["sync/logprob_err"] = self.sync_weights()
        timer.lap("sync")
        return self.step_metrics(batch, stats, timer)

    def strength(self, judgement: Judgement) -> float:
        if judgement.verdict is None:
            return 0.0
        if isinstance(self.judge.fmt, GenRMFormat):
            return pair_strength(self.judge.fmt, judgement.text, self.cfg.pairwise.length_weight)
        return judgement.verdict  # a label judge: +1 / -1, 0 for a tie

    def judged_preferences(self, batch: RolloutBatch) -> torch.Tensor:
        """(prompts, G, G) skew-symmetric strengths d_ij, every unordered pair of a group judged once
        (both orders with position_swap)."""
        g = self.cfg.rollout.n
        groups = len(batch.texts) // g
        pairs = [(k, i, j) for k in range(groups) for i in range(g) for j in range(i + 1, g)]
        prompts = [batch.samples[k * g].prompt for k, _, _ in pairs]
        first = [batch.texts[k * g + i] for k, i, _ in pairs]
        second = [batch.texts[k * g + j] for k, _, j in pairs]
        if self.cfg.reward.judge.position_swap:
            calls = self.judge.judge(*in_both_orders(prompts, first, second))
            d = [(self.strength(ab) - self.strength(ba)) / 2 for ab, ba in zip(calls[:len(pairs)], calls[len(pairs):])]
        else:
            calls = self.judge.judge(prompts, first, second)
            d = [self.strength(c) for c in calls]
        failed = sum(c.verdict is None for c in calls)
        if calls and failed == len(calls):
            raise RuntimeError(f"every one of the {len(calls)} judge calls of this step gave no verdict "
                               f"(e.g. {calls[0].reason}); check reward.judge")
        batch.stats["genrm/parse_fail_frac"] = failed / max(len(calls), 1)
        batch.stats["judge/calls"] = float(len(calls))
        strengths = torch.zeros(groups, g, g)
        for (k, i, j), value in zip(pairs, d):
            strengths[k, i, j], strengths[k, j, i] = value, -value
        return strengths
