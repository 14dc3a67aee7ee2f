"""PPO core against hand-computed values, Self-Rewarding PPO's fixed points on a tabular problem
(Self-Rewarding PPO), and SR-PPO end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from alignment.logging import read_metrics
from tests.support.recipes import run_align
from tests.support.tiny_models import tiny_llama
from tests.support.recipes import COLOURS
from alignment.algos import clipped_value_loss, explained_variance, gae, kl_penalised_rewards, ppo_clip_loss, whiten


def test_gae_matches_hand_computed_values():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2 ends after two tokens: 9s are padding
    adv, ret = gae(rewards[:1], values[:1], mask[:1], gamma=1.0, lam=0.5)
    # delta = (0.1, 0.1, 0.3); A_2 = 0.3, A_1 = 0.1 + 0.5 * 0.3, A_0 = 0.1 + 0.5 * 0.25
    assert adv.flatten().tolist() == pytest.approx([0.225, 0.25, 0.3])
    assert ret.flatten().tolist() == pytest.approx([0.725, 0.85, 1.0])
    adv, ret = gae(rewards[1:], values[1:], mask[1:], gamma=0.9, lam=1.0)
    # No bootstrap past the last token: A_1 = 2 - 1 = 1, A_0 = (0.9 * 1 - 0.5) + 0.9 * 1
    assert adv.flatten().tolist() == pytest.approx([1.3, 1.0, 0.0])
    assert ret.flatten().tolist() == pytest.approx([1.8, 2.0, 0.0])


def test_ppo_losses_match_hand_computed_values():
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.0, 7.0]])
    advantages = torch.tensor([[1.0, 1.0, -2.0, 3.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    old = torch.zeros_like(ratio)
    loss, stats = ppo_clip_loss(ratio.log(), old, advantages, mask, clip=0.2)
    # per token max(-A r, -A clip(r)): -1.2 (clipped), -0.5, 1.6 (clipped), -3
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 1.6 - 3.0) / 4)
    assert stats["clip_frac"] == pytest.approx(0.5)

    values, old_values, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.1]]), torch.tensor([[1.2, 0.0]])
    # token 1: V clipped to 0.7, max((1 - 1.2)^2, (0.7 - 1.2)^2) = 0.25; token 2: within the clip, 0
    assert float(clipped_value_loss(values, old_values, returns, torch.ones(1, 2), clip=0.2)) == pytest.approx(0.0625)

    rewards, kl = kl_penalised_rewards(torch.tensor([2.0]), torch.tensor([[-1.0, -2.0, -5.0]]),
                                       torch.tensor([[-1.5, -1.0, -9.0]]), torch.tensor([[1.0, 1.0, 0.0]]), coef=0.1)
    assert kl.flatten().tolist() == pytest.approx([0.5, -1.0, 0.0])
    assert rewards.flatten().tolist() == pytest.approx([-0.05, 2.1, 0.0])  # the score lands on the last real token

    x, m = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    white = whiten(x, m)
    assert float(white[0, :3].mean()) == pytest.approx(0.0, abs=1e-6) and float(white[0, 3]) == 0.0
    assert float(white[0, 2]) == pytest.approx(1 / (2 / 3) ** 0.5, rel=1e-4)
    assert explained_variance(x, x, m) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(x, 2.0), x, m) == pytest.approx(0.0, abs=1e-6)


def _optimise_tabular(logits0, reward, ref_logp, coef, iterations=300, epochs=4, lr=0.5):
    """KL-regularised policy optimisation of a tabular policy with the PPO pieces, in expectation:
    every output y of every prompt is a one-token response weighted by pi_old(y) (the mask), so
    the clipped surrogate and the whitening are the exact expectations of what sampling estimates."""
    logits = logits0.clone().requires_grad_(True)
    optimiser = torch.optim.SGD([logits], lr=lr)
    # Whitened advantages keep unit scale however close the policy is: a decaying step size settles it.
    decay = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda t: 1 - t / (iterations * epochs))
    for _ in range(iterations):
        old = torch.log_softmax(logits.detach(), -1).reshape(-1, 1)  # rows: (prompt, output) pairs
        weights = old.exp()
        token_rewards, _ = kl_penalised_rewards(reward.reshape(-1), old, ref_logp.reshape(-1, 1), torch.ones_like(old),
                                                coef)
        advantages, _ = gae(token_rewards, torch.zeros_like(old), torch.ones_like(old), gamma=1.0, lam=0.95)
        advantages = whiten(advantages, weights)
        for _ in range(epochs):
            logp = torch.log_softmax(logits, -1).reshape(-1, 1)
            loss, _ = ppo_clip_loss(logp, old, advantages, weights, clip=0.2)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            decay.step()
    return torch.softmax(logits.detach(), -1)


def test_sr_ppo_reward_with_kl_to_base_at_coefficient_one_converges_to_sft():
    """max E[log pi_SFT - log pi_base] - KL(pi || pi_base) is attained at pi_SFT."""
    g = torch.Generator().manual_seed(0)
    base = torch.log_softmax(torch.randn(3, 6, generator=g), -1)
    sft = torch.log_softmax(torch.randn(3, 6, generator=g), -1)
    pi = _optimise_tabular(base, sft - base, base, coef=1.0)  # from the base model
    tv = 0.5 * (pi - sft.exp()).abs().sum(-1)
    assert float(tv.max()) < 1e-2, tv
    assert float(0.5 * (base.exp() - sft.exp()).abs().sum(-1).min()) > 0.2  # it had somewhere to go


def test_sr_ppo_reward_with_kl_to_sft_sharpens_away_from_base():
    """With KL to pi_SFT at beta, the optimum is pi_SFT^(1 + 1/beta) pi_base^(-1/beta), normalised."""
    g = torch.Generator().manual_seed(1)
    base = torch.log_softmax(torch.randn(3, 6, generator=g) * 0.7, -1)
    sft = torch.log_softmax(torch.randn(3, 6, generator=g) * 0.7, -1)
    beta = 2.0
    target = torch.softmax((1 + 1 / beta) * sft - base / beta, -1)
    pi = _optimise_tabular(sft, sft - base, sft, coef=beta)  # from pi_SFT, as the recipe starts
    tv = 0.5 * (pi - target).abs().sum(-1)
    assert float(tv.max()) < 1e-2, tv
    assert float(0.5 * (target - sft.exp()).abs().sum(-1).min()) > 0.05


# ---- end to end ------------------------------------------------------------------------------
def _demos(path, count=24):
    rows = [{"prompt": f"Say a colour ({i}).", "completion": f"The colour is {COLOURS[i % 3]}, of course."}
            for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# slow tier: the fast tier stays under 10 minutes on an AVX2-only CPU (issue 26)
@pytest.mark.slow
def test_sr_ppo_pipeline_raises_the_log_ratio_reward(tmp_path):
    """Stage 1 SFT from a base model, stage 2 PPO on unseen prompts: log pi_SFT - log pi_base rises."""
    base = tiny_llama(tmp_path / "base", seed=3)
    prompts = [{"prompt": f"Name any colour you like, number {i}."} for i in range(32)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    recipe = {
        "trainer": "sr_ppo", "output_dir": str(tmp_path / "run"), "model": {"path": str(base)},
        "sft": {"data": {"path": str(_demos(tmp_path / "demos.jsonl"))}, "epochs": 6, "lr": 3e-3, "batch_size": 8},
        "data": {"path": str(tmp_path / "prompts.jsonl")},
        "rollout": {"n": 4, "max_new_tokens": 8},
        "train": {"max_steps": 14, "lr": 2e-3, "batch_size": 4, "mini_batches": 2, "bf16": False},
        "ppo": {"passes": 2, "critic_lr": 1e-3},
        "kl": {"coef": 0.01, "reference": "sft"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = run_align("train", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "sft" / "final" / "config.json").is_file()  # stage 1 ran
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    for row in rows:
        assert {"kl", "clip_frac", "loss/policy", "loss/value", "entropy", "value/explained_variance",
                "srppo/log_ratio_per_token", "response_length/mean", "reward/mean"} <= set(row)
        assert row["sync/logprob_err"] < 1e-3
    first = sum(r["reward/mean"] for r in rows[:4]) / 4
    last = sum(r["reward/mean"] for r in rows[-4:]) / 4
    assert first > 0  # pi_SFT's own samples: E[log pi_SFT - log pi_base] = KL(pi_SFT || pi_base) > 0
    assert last > first + 1.0, [round(r["reward/mean"], 2) for r in rows]
