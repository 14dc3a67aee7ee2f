"""PMD-mean: policy mirror descent with the log-partition approximated by the mean reward.

Xu, Lu, Yu, Zhao, arXiv 2602.05933 (reference code: horizon-rl/OpenKimi `openkimi/pmd/core_algos.py`).
Per response i of length |y_i|, with sequence log-ratio D_i = sum_t log pi_theta - log pi_old:

    L_i = (tau / 2) * (A_i / tau - D_i)^2 / |y_i|,        batch loss = mean_i L_i

A_i = r_i - b_i. PMD-mean: b_i = leave-one-out mean of the group's other rewards (`algo.advantage:
rloo`). PMD-partition: b_i = tau * log mean_{j != i} exp(r_j / tau) (`algo.advantage: ploo`).
No ratio clipping and no KL loss: the quadratic pulls later off-policy mini-batches back toward the
rollout policy. At D = 0 the gradient is length-normalised leave-one-out REINFORCE. The math is in
alignment/algos.py (`rloo`, `ploo`, `pmd`).

Choices where the paper's text was not available: leave-one-out mean (the code's rloo) rather than
Kimi's full mean; the `seq-mean-token-mean` aggregation; `algo.tau` = 0.1 by default in our
small-model recipe (the paper's 30B figure) rather than the scripts' 0.01, because
with +-1 rewards tau = 0.01 makes A / tau ~ 200 nats and the loss behaves like plain RLOO.
Reward scale and tau trade off: +-1 rewards at tau behave like 0/1 rewards at tau / 2 (the
paper's population table is for 0/1 rewards; tests/test_pmd_loss.py reproduces it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignment.config import AlgoConfig, BaseConfig, ConfigError
from alignment.online import StepTimer
from trainers.grpo import GRPOTrainer


@dataclass
class PMDConfig(BaseConfig):
    trainer: str = "pmd"
    algo: AlgoConfig = field(default_factory=lambda: AlgoConfig(advantage="rloo", policy_loss="pmd"))


class PMDTrainer(GRPOTrainer):
    """GRPO's setup (prompts, reward, policy, engine) with PMD's objective and no reference model."""

    config_class = PMDConfig

    def __init__(self, cfg: PMDConfig):
        if cfg.algo.kl_coef:
            raise ConfigError("algo.kl_coef: PMD has no KL loss (its regression anchors each update to the rollout "
                              "policy); for one, run trainer: grpo with algo.policy_loss=pmd")
        super().__init__(cfg)

    def step(self, step: int) -> dict[str, float]:
        timer = StepTimer()
        batch = self.rollout(step)
        batch.rewards = self.reward(batch)
        batch.advantages = self.advantage(batch.rewards.view(-1, self.cfg.rollout.n)).reshape(-1)  # one per sample
        timer.lap("rollout")
        stats = self.train_policy(batch, self.objective)  # algo.policy_loss: pmd's regression
        timer.lap("train")
        stats["sync/logprob_err"] = self.sync_weights()
        timer.lap("sync")
        return self.step_metrics(batch, stats, timer)
