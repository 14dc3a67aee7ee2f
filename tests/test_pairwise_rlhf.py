"""Pairwise RLHF end to end: a tiny policy, a toy gold reward (the vowel fraction), and a generative
RM behind a real loopback OpenAI-compatible server that answers Think-RM's binary format from the
gold reward. The policy's gold reward rises about as fast as pointwise GRPO trained on the gold reward
itself, and still rises when the judge flips 20 % of its verdicts."""

from __future__ import annotations

import pytest

from align.cli import build_config
from tests.support.tiny_models import tiny_llama
from tests.support.recipes import toy_recipe
from tests.support.judge_server import start_judge_server
from tests.support.toy_rewards import vowels

pytestmark = pytest.mark.slow

STEPS = 30
COMMON = [f"train.max_steps={STEPS}", "train.lr=1e-2", "train.batch_size=4", "train.mini_batches=2",
          "rollout.n=6", "rollout.max_new_tokens=12", "algo.kl_coef=0.0"]


def vowel_rule(response_a: str, response_b: str) -> int:
    """The oracle's verdict: 1 if A has the larger vowel fraction, 2 if B, 0 on a tie."""
    a, b = vowels(None, [response_a, response_b], None)
    return 0 if a == b else (1 if a > b else 2)


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory):
    # As in test_pmd_learns: a peaked random model, so RL can reshape it in a few dozen steps.
    return tiny_llama(tmp_path_factory.mktemp("peaked"), init_range=0.3)


def run(folder, model, trainer: str, extra: list[str]) -> tuple[list[float], float, float, list[dict]]:
    """STEPS steps in process: (reward/mean per step, held-out gold reward before, after, metrics)."""
    trainer_cls, cfg = build_config(str(toy_recipe(folder, model, trainer)), [*COMMON, *extra])
    trainer = trainer_cls(cfg)
    trainer.sync_weights()
    before = trainer.evaluate()["eval/reward"]
    metrics = [trainer.step(step) for step in range(STEPS)]
    after = trainer.evaluate()["eval/reward"]
    return [m["reward/mean"] for m in metrics], before, after, metrics


def gain(rewards: list[float]) -> float:
    return sum(rewards[-5:]) / 5 - sum(rewards[:5]) / 5


def test_pairwise_rlhf_learns_like_grpo_from_a_judge(tmp_path, peaked_model):
    grpo, grpo_before, grpo_after, _ = run(tmp_path / "grpo", peaked_model, "grpo", [])
    judged = {}
    for name, accuracy in (("oracle", 1.0), ("noisy", 0.8)):
        with start_judge_server(accuracy=accuracy, seed=1, rule=vowel_rule)[1] as server:
            judge = [f"reward.judge.base_url={server.base_url}", "reward.judge.model=rule-judge",
                     "reward.judge.verdict=binary", "reward.judge.type=openai", "reward.judge.max_concurrency=8"]
            judged[name] = run(tmp_path / name, peaked_model, "pairwise_rlhf", judge)
            requests = server.requests
        assert requests == STEPS * 4 * 15  # 4 prompts x C(6, 2) pairs, each judged once
    oracle, oracle_before, oracle_after, oracle_metrics = judged["oracle"]
    noisy, _, noisy_after, _ = judged["noisy"]
    assert all(m["genrm/parse_fail_frac"] == 0 for m in oracle_metrics)
    # Measured over seeds 0-3 and two samplers (issue 19), as (training gain, held-out gain): GRPO
    # (0.08-0.27, 0.07-0.27; seed 0 0.08, 0.07 here, 0.15, 0.15 with ATEN_CPU_CAPABILITY=avx2), oracle
    # judge (0.14-0.17, 0.16-0.18), noisy judge (0.11-0.16, 0.12-0.15), seeds 0-2.
    # GRPO on the gold reward: the vowel fraction starts near 0.32 and rises.
    assert gain(grpo) > 0.04 and grpo_after > grpo_before + 0.04, (grpo, grpo_before, grpo_after)
    # The judge's pairwise preferences raise the gold reward about as fast.
    assert gain(oracle) > 0.66 * gain(grpo), (gain(oracle), gain(grpo))
    assert oracle_after > oracle_before + 0.08
    # A judge wrong on 20 % of pairs still moves the policy the right way.
    assert gain(noisy) > 0.05 and noisy_after > oracle_before + 0.05, (noisy, noisy_after)
