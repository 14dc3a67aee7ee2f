"""The algorithms module (alignment/algos.py): registries that refuse what they cannot serve, and
recipes that compose a method from names."""

from __future__ import annotations

import json

import pytest
import torch

from alignment.algos import KL_ESTIMATORS, POLICY_LOSSES, PolicyObjective, Registry, kl_k3
from alignment.config import AlgoConfig, ConfigError


def test_registry_refuses_a_second_function_under_a_name():
    registry = Registry("thing")
    registry.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="thing 'a' is registered already"):
        registry.register("a")(lambda: 2)


def test_lookup_names_the_key_and_the_valid_choices():
    with pytest.raises(ConfigError, match=r"algo.policy_loss: unknown policy loss 'dpo' \(valid: pmd, ppo\)"):
        POLICY_LOSSES.get("dpo", key="algo.policy_loss")


def test_settings_are_bound_from_the_config_section_by_name():
    logp, old = torch.zeros(2, 3), torch.zeros(2, 3)
    mask, advantages = torch.ones(2, 3), torch.tensor([1.0, -1.0])
    bound = POLICY_LOSSES.get("pmd", AlgoConfig(tau=0.5))
    loss, _ = bound(logp, old, advantages, mask)
    direct, _ = POLICY_LOSSES.get("pmd")(logp, old, advantages, mask, tau=0.5)
    assert float(loss) == float(direct) == pytest.approx(0.5 * 0.5 * (1 / 0.5) ** 2 / 3)


def test_kl_estimators_agree_on_their_mean():
    """Under pi, k1 and k3 have KL(pi || ref) as their mean exactly, k2 to second order in log(pi / ref)
    (2.1% over it here); means taken exactly, over the 6 tokens, not sampled."""
    torch.manual_seed(0)
    p = torch.log_softmax(torch.randn(6, dtype=torch.float64), 0)
    q = torch.log_softmax(p + 0.2 * torch.randn(6, dtype=torch.float64), 0)  # near pi, as a policy to its reference
    exact = float((p.exp() * (p - q)).sum())
    means = {name: float((p.exp() * KL_ESTIMATORS.get(name)(p, q)).sum()) for name in ("k1", "k2", "k3")}
    assert means["k1"] == pytest.approx(exact, rel=1e-9) and means["k3"] == pytest.approx(exact, rel=1e-9)
    assert means["k2"] == pytest.approx(exact, rel=0.05)
    assert float(kl_k3(p, q).min()) >= 0 and float(kl_k3(q, p).min()) >= 0  # k3 is never negative


def test_objective_adds_the_kl_loss_only_with_reference_logprobs():
    logp = torch.log(torch.full((1, 2), 0.5))
    ref = torch.log(torch.full((1, 2), 0.25))
    objective = PolicyObjective.from_config(AlgoConfig(policy_loss="ppo", kl_coef=0.1, kl_estimator="k1"))
    plain, stats = objective(logp, logp, torch.tensor([0.0]), torch.ones(1, 2))
    with_kl, kl_stats = objective(logp, logp, torch.tensor([0.0]), torch.ones(1, 2), ref)
    assert "kl" not in stats and kl_stats["kl"] == pytest.approx(float(torch.log(torch.tensor(2.0))))
    assert float(with_kl - plain) == pytest.approx(0.1 * kl_stats["kl"])


def test_grpo_with_pmds_advantage_and_loss_is_pmd(tmp_path, tiny_model):
    """`trainer: grpo` with `algo.advantage: rloo`, `algo.policy_loss: pmd` and no KL loss runs PMD:
    the same rollouts, losses and updates, step for step."""
    from align.cli import build_config
    from tests.support.recipes import toy_recipe

    recipe = toy_recipe(tmp_path, tiny_model)
    runs = {}
    for name, overrides in {"pmd": [], "grpo": ["trainer=grpo", "algo.advantage=rloo", "algo.policy_loss=pmd",
                                                 "algo.kl_coef=0"]}.items():
        trainer_cls, cfg = build_config(str(recipe), [*overrides, f"output_dir={tmp_path / name}",
                                                      "train.max_steps=2"])
        trainer_cls(cfg).train()
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    keys = ["loss", "reward/mean", "pmd/log_ratio", "kl", "grad_norm"]
    assert [[row[k] for k in keys] for row in runs["grpo"] if "loss" in row] == \
           [[row[k] for k in keys] for row in runs["pmd"] if "loss" in row]


def test_a_partial_algo_section_keeps_the_trainers_defaults():
    """A recipe's `algo: {tau: 0.2}` changes tau only: PMD keeps its estimator and loss (not the
    section class's grpo / ppo)."""
    from alignment.config import load_config
    from trainers.pmd import PMDConfig

    assert load_config(PMDConfig, {"algo": {"tau": 0.2}}).algo == AlgoConfig(advantage="rloo", policy_loss="pmd",
                                                                           tau=0.2)


@pytest.mark.parametrize("source", ["recompute", "rollout"])
def test_old_logprobs_come_from_the_trainer_or_the_engine(tmp_path, tiny_model, source):
    """`train.old_logprobs`: recompute gives the later mini-batch one no-grad trainer pass (the first
    is on-policy and uses its own); rollout takes the engine's log-probs as they are, no extra pass."""
    from align.cli import build_config
    from tests.support.recipes import toy_recipe

    trainer_cls, cfg = build_config(str(toy_recipe(tmp_path, tiny_model)), [
        f"output_dir={tmp_path / 'out'}", "train.batch_size=2", "train.mini_batches=2",
        f"train.old_logprobs={source}"])
    trainer = trainer_cls(cfg)
    batches, passes = [], []
    rollout, policy_logprobs = trainer.rollout, trainer.policy_logprobs
    trainer.rollout = lambda step: batches.append(rollout(step)) or batches[-1]
    trainer.policy_logprobs = lambda batch, first=0: passes.append(first) or policy_logprobs(batch, first)
    metrics = trainer.step(0)
    batch = batches[0]
    engine_logp = batch.rollout_logp()
    if source == "rollout":
        assert passes == [] and torch.equal(batch.old_logp, engine_logp)
        assert metrics["rollout/logprob_diff"] == 0.0
    else:
        half = len(batch.mask) // 2
        assert passes == [half]  # one no-grad pass, over the second mini-batch only
        # The trainer's own numerics against the engine's, both fp32 here (the toy recipe's train.bf16:
        # false): a batched pass against a token-by-token decode on packed weights, close, not equal
        # (measured 3.3e-7, 4.5e-7 with AVX2 kernels; 1.2e-3 with train.bf16=true)
        assert 0 < metrics["rollout/logprob_diff"] < 1e-4, metrics["rollout/logprob_diff"]
