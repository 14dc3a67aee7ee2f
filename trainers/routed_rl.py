"""Routed RL (`trainer: routed_rl`): online RL whose advantages are pairwise preferences, with
uncertain pairs decided by a strong LLM judge (Xu et al., NeurIPS 2025).

    align train configs/routed_rl_hhh.yaml reward.router.policy=budget reward.router.budget=0.2

One step: n responses per prompt -> every pair within a prompt's group scored by the SNGP preference
model in both orders (S_ij = -S_ji, uncertainty U_ij) -> the router sends uncertain pairs to the judge,
whose verdict replaces S_ij (+-2, or 0 for a tie; a failed call keeps the model's score and is
counted) -> A_i = scale * sum_{j != i} S_ij / (n - 1) (`algo.advantage: pairwise_rloo`, the RLOO
advantage with reward differences replaced by preference logits; `pairwise_grpo` also fits) -> the
policy update with `algo.policy_loss` (`ppo`, the clipped surrogate at `algo.clip`: with one
mini-batch the ratio is 1 at the update, plain REINFORCE with the pairwise baseline).

Options (`routed:`): `scale` (c, default 1), `max_advantage` (the reference OpenRLHF fork clamps at
+-10), and `verifier`: with prompts that have checkable answers, responses that fail the
rule-based check are not compared; they lose to every passing response by the judged score (the
reference's IFEval mode). The judge-routing block is `reward:`, e.g. configs/judge_routing.yaml.
There is no pointwise reward here: no `reward/mean` is logged, and held-out evaluation reports
accuracy only (where the prompts have checkable answers).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from alignment.algos import PREFERENCE_ADVANTAGES, PolicyObjective
from alignment.config import AlgoConfig, BaseConfig, ConfigError, bounded
from alignment.data import load_prompts
from alignment.models import load_causal_lm, load_tokenizer
from alignment.online import OnlineTrainer, RolloutBatch, StepTimer, require_groups
from rewards.routing import PairRouter
from rewards.verifiable import accuracy_checks, is_correct


@dataclass
class RoutedOptions:
    scale: float = bounded(1.0, gt=0)  # c in A_i = c * mean_j S_ij
    max_advantage: float = bounded(10.0, gt=0)  # advantages clamped to +-this
    verifier: bool = False  # exclude responses that fail the prompts' rule-based check from pairing


@dataclass
class RoutedRLConfig(BaseConfig):
    trainer: str = "routed_rl"
    routed: RoutedOptions = field(default_factory=RoutedOptions)
    algo: AlgoConfig = field(default_factory=lambda: AlgoConfig(advantage="pairwise_rloo", policy_loss="ppo"))


class RoutedRLTrainer(OnlineTrainer):
    config_class = RoutedRLConfig

    def __init__(self, cfg: RoutedRLConfig):
        super().__init__(cfg)
        if cfg.reward.type != "routed":
            raise ConfigError(f"trainer: routed_rl needs reward.type=routed (a preference model, a judge and a router; "
                              f"see configs/judge_routing.yaml), got reward.type={cfg.reward.type}")
        require_groups(cfg, "pairwise advantages")
        if cfg.algo.kl_coef:
            raise ConfigError("algo.kl_coef: routed RL has no KL loss (no reference model is loaded); set it to 0")
        self.advantage = PREFERENCE_ADVANTAGES.get(cfg.algo.advantage, cfg.algo, "algo.advantage")
        self.objective = PolicyObjective.from_config(cfg.algo)
        self.tokenizer = load_tokenizer(cfg.model)
        self.train_set, self.eval_set = load_prompts(cfg.data, cfg.seed)
        self.router = PairRouter.from_config(cfg.reward, cfg.seed)
        self.eval_checks = accuracy_checks(self.eval_set)
        self.setup_policy(load_causal_lm(cfg.model))

    def step(self, step: int) -> dict[str, float]:
        timer = StepTimer()
        batch = self.rollout(step)
        preferences = self.routed_preferences(batch, step)  # (prompts, n, n), judge verdicts on uncertain pairs
        limit = self.cfg.routed.max_advantage
        batch.advantages = (self.cfg.routed.scale * self.advantage(preferences)).reshape(-1).clamp(-limit, limit)
        timer.lap("rollout")
        stats = self.train_policy(batch, self.objective)
        timer.lap("train")
        stats["sync/logprob_err"] = self.sync_weights()
        timer.lap("sync")
        return self.step_metrics(batch, stats, timer)

    def routed_preferences(self, batch: RolloutBatch, step: int) -> torch.Tensor:
        """Each prompt's antisymmetric n x n pair scores: the preference model's, the judge's where routed."""
        t_start = time.perf_counter()
        n = self.cfg.rollout.n
        bounds = [(a, a + n) for a in range(0, len(batch.texts), n)]
        passed = None
        if self.cfg.routed.verifier:
            passed = [[is_correct(batch.samples[i], batch.texts[i]) for i in range(a, b)] for a, b in bounds]
        scores, stats = self.router.group_scores([batch.samples[a].prompt for a, _ in bounds],
                                                 [batch.texts[a:b] for a, b in bounds], passed, step, global_batch=True)
        stats["router/judge_failures"] *= self.world  # metrics are averaged over ranks: report the step's total
        stats["time/reward_s"] = time.perf_counter() - t_start  # preference model + router + judge (within rollout_s)
        batch.stats.update(stats)
        return torch.stack(scores) if scores else torch.zeros(0, n, n)
