"""PMD-mean learns: on a tiny model and a dense toy reward, the reward rises over a few dozen steps."""

from __future__ import annotations

import pytest

from alignment.cli import build_config
from tests.helpers import toy_recipe

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("baseline", ["mean", "partition"])
def test_pmd_improves_the_reward(tmp_path, tiny_model, baseline):
    recipe = toy_recipe(tmp_path, tiny_model)
    trainer_cls, cfg = build_config(str(recipe), [
        "train.max_steps=30", "train.lr=3e-3", "train.batch_size=4", "train.mini_batches=2",
        "rollout.n=6", "rollout.max_new_tokens=12", f"pmd.baseline={baseline}", f"output_dir={tmp_path / 'run'}",
    ])
    trainer = trainer_cls(cfg)
    trainer.sync_weights()
    before = trainer.evaluate()["eval/reward"]
    rewards = [trainer.step(step)["reward/mean"] for step in range(cfg.train.max_steps)]
    after = trainer.evaluate()["eval/reward"]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    # The vowel fraction of random-init text is ~0.15; a learning policy moves it well above that.
    assert last > first + 0.15, (first, last, rewards)
    assert after > before + 0.15, (before, after)
