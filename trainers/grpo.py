"""GRPO (`trainer: grpo`): group-relative policy optimisation with any pointwise reward, verl-style.

    align train configs/grpo_chain_sum.yaml

One step: n samples per prompt -> rewards -> A_i = (r_i - mean(r)) / (std(r) + 1e-6) within each
prompt's group (unbiased std, verl's `grpo` estimator) -> `train.mini_batches` optimizer steps of the
clipped surrogate (token-mean) plus a KL loss to the initial policy, `algo.kl_coef * k3(pi || pi_ref)`
(verl's `use_kl_loss` with `low_var_kl`; no KL in the reward). The reference is a frozen copy of the
initial policy, or with LoRA the policy with its adapters off; `algo.kl_coef: 0` loads none.

Estimator, loss and KL estimator are chosen by name (`algo.*`, alignment/algos.py): `algo.advantage:
rloo` with `algo.policy_loss: pmd` is PMD with a KL loss. Think-RM's rule-based RL
(trainers/think_rm.py) is this trainer with judge prompts and a verdict reward. Metrics: `kl` (to the
reference, the k3 estimate), `clip_frac`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignment.algos import REWARD_ADVANTAGES, PolicyObjective
from alignment.config import AlgoConfig, BaseConfig
from alignment.data import load_prompts
from alignment.models import load_causal_lm, load_tokenizer, reference_model
from alignment.online import OnlineTrainer, StepTimer, require_groups
from rewards import answers_needed, batch_reward
from rewards.verifiable import accuracy_checks


@dataclass
class GRPOConfig(BaseConfig):
    trainer: str = "grpo"
    # kl_coef: verl's default (Think-RM used 1e-4)
    algo: AlgoConfig = field(default_factory=lambda: AlgoConfig(advantage="grpo", policy_loss="ppo", kl_coef=1e-3))


class GRPOTrainer(OnlineTrainer):
    config_class = GRPOConfig

    def __init__(self, cfg: GRPOConfig, data=None, reward=None, eval_checks=None, encode=None):
        """By default the recipe's prompts and reward; Think-RM's RL stage passes its judge prompts
        (`data`: train and held-out examples), verdict reward, checks and prompt encoder."""
        super().__init__(cfg)
        require_groups(cfg, "group-relative advantages")
        self.advantage = REWARD_ADVANTAGES.get(cfg.algo.advantage, cfg.algo, "algo.advantage")
        self.objective = PolicyObjective.from_config(cfg.algo)
        self.tokenizer = load_tokenizer(cfg.model)
        self.train_set, self.eval_set = data or load_prompts(cfg.data, cfg.seed, answers_needed(cfg.reward))
        self.reward = reward or batch_reward(cfg)
        self.eval_checks = accuracy_checks(self.eval_set) if eval_checks is None else eval_checks
        lm = load_causal_lm(cfg.model)
        self.reference = reference_model(lm, cfg.peft) if cfg.algo.kl_coef > 0 else None
        self.setup_policy(lm, encode)

    def step(self, step: int) -> dict[str, float]:
        timer = StepTimer()
        batch = self.rollout(step)
        batch.rewards = self.reward(batch)
        batch.advantages = self.advantage(batch.rewards.view(-1, self.cfg.rollout.n)).reshape(-1)  # one per sample
        ref_logp = self.reference_logprobs(batch) if self.cfg.algo.kl_coef > 0 else None
        timer.lap("rollout")
        stats = self.train_policy(batch, self.objective, ref_logp=ref_logp)
        timer.lap("train")
        stats["sync/logprob_err"] = self.sync_weights()
        timer.lap("sync")
        return self.step_metrics(batch, stats, timer)
