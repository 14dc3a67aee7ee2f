"""PMD-mean learns: on a tiny model and a dense toy reward, the reward rises over a few dozen steps.

The float trajectory of RL differs between CPU kinds (kernels round differently, sampled tokens then
differ), so the assertions are on the average of two seeds with a margin measured across seeds and
kernel sets, not on one machine's curve.
"""

from __future__ import annotations

import pytest

from align.cli import build_config
from tests.support.tiny_models import tiny_llama
from tests.support.recipes import toy_recipe

pytestmark = pytest.mark.slow
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory):
    # A larger init scale makes the random model's next-token distribution peaked (entropy ~5 nats
    # instead of ~ln 49152 = 10.8), as a real LM's is, so RL can reshape it in a few dozen steps.
    return tiny_llama(tmp_path_factory.mktemp("peaked"), init_range=0.3)


BASELINE_ESTIMATORS = {"mean": "rloo", "partition": "ploo"}  # PMD-mean, PMD-partition


def reward_gains(folder, model, baseline: str, seed: int) -> tuple[float, float]:
    """(mean reward of the last 5 steps - of the first 5, held-out greedy reward after - before)."""
    recipe = toy_recipe(folder, model)
    trainer_cls, cfg = build_config(str(recipe), [
        "train.max_steps=30", "train.lr=1e-2", "train.batch_size=4", "train.mini_batches=2",
        "rollout.n=6", "rollout.max_new_tokens=12", "algo.tau=0.01", f"algo.advantage={BASELINE_ESTIMATORS[baseline]}",
        f"output_dir={folder / 'run'}", f"seed={seed}",
    ])
    trainer = trainer_cls(cfg)
    trainer.sync_weights()
    before = trainer.evaluate()["eval/reward"]
    rewards = [trainer.step(step)["reward/mean"] for step in range(cfg.train.max_steps)]
    after = trainer.evaluate()["eval/reward"]
    return sum(rewards[-5:]) / 5 - sum(rewards[:5]) / 5, after - before


@pytest.mark.parametrize("baseline", ["mean", "partition"])
def test_pmd_improves_the_reward(tmp_path, peaked_model, baseline):
    gains = [reward_gains(tmp_path / str(seed), peaked_model, baseline, seed) for seed in SEEDS]
    train_gain = sum(g[0] for g in gains) / len(gains)
    eval_gain = sum(g[1] for g in gains) / len(gains)
    # The vowel fraction starts near 0.32. Measured gains for seeds 0, 1, 2, 3 (AMD EPYC, torch 2.13):
    #                   training (last 5 - first 5 steps)     held-out greedy (after - before)
    #   mean, default   0.180 0.141 0.160 0.127               0.182 0.142 0.150 0.203
    #   mean, avx2      0.175 0.156 0.160 0.137               0.191 0.150 0.161 0.119
    #   part., default  0.139 0.088 0.133 0.079               0.134 0.140 0.129 0.114
    #   part., avx2     0.123 0.173 0.130 0.095               0.009 0.190 0.134 0.101
    # Two-seed averages are >= 0.106 (training) and >= 0.100 (held-out), twice the thresholds and more;
    # a policy that does not learn scores 0 +- 0.02 on either. (lr 3e-3, as before, gained only
    # 0.02-0.13 with one seed: 0.04 on this machine's kernels against 0.13 on another's.)
    assert train_gain > 0.05, gains
    assert eval_gain > 0.03, gains
