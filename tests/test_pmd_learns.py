"""PMD-mean learns: on a tiny model and a dense toy reward, the reward rises over a few dozen steps."""

from __future__ import annotations

import pytest

from alignment.cli import build_config
from tests.conftest import tiny_llama
from tests.helpers import toy_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory):
    # A larger init scale makes the random model's next-token distribution peaked (entropy ~5 nats
    # instead of ~ln 49152 = 10.8), as a real LM's is, so RL can reshape it in a few dozen steps.
    return tiny_llama(tmp_path_factory.mktemp("peaked"), init_range=0.3)


@pytest.mark.parametrize("baseline", ["mean", "partition"])
def test_pmd_improves_the_reward(tmp_path, peaked_model, baseline):
    recipe = toy_recipe(tmp_path, peaked_model)
    trainer_cls, cfg = build_config(str(recipe), [
        "train.max_steps=30", "train.lr=3e-3", "train.batch_size=4", "train.mini_batches=2",
        "rollout.n=6", "rollout.max_new_tokens=12", "pmd.tau=0.01", f"pmd.baseline={baseline}",
        f"output_dir={tmp_path / 'run'}",
    ])
    trainer = trainer_cls(cfg)
    trainer.sync_weights()
    before = trainer.evaluate()["eval/reward"]
    rewards = [trainer.step(step)["reward/mean"] for step in range(cfg.train.max_steps)]
    after = trainer.evaluate()["eval/reward"]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    # The vowel fraction starts near 0.32; a learning policy raises it (0.45 measured for 30 steps).
    assert last > first + 0.06, (first, last, rewards)
    assert after > before + 0.06, (before, after)
