"""What produces a reward signal.

`batch_reward(cfg)`: the reward an online trainer calls on each rollout batch (the batch in, one float
per sample out): TRL-style reward functions (`reward.type: python`, rewards/functions.py) see the whole
batch (completion ids, the chat format, the data rows); the other types score text through
`build_reward(cfg.reward)` -> fn(examples, responses) -> list[float].
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from alignment.config import BaseConfig, ConfigError, RewardConfig
from alignment.data import Example
from rewards.functions import PythonRewards, load_function  # noqa: F401 - load_function: the public name
from rewards.remote import RemoteReward
from rewards.verifiable import VerifiableReward

if TYPE_CHECKING:
    from alignment.online import BatchReward

RewardFn = Callable[[list[Example], list[str]], list[float]]


class ModelReward:
    """`reward.type: model`: a sequence-classification reward model scored in-process, by the scorer
    `align serve-rm` answers with (rewards/reward_model.py: its own tokenizer and chat template, the
    length it was trained at), `reward.batch_size` pairs per forward."""

    def __init__(self, cfg: RewardConfig):
        from alignment.models import resolve_path
        from rewards.preference_model import is_preference_model
        from rewards.reward_model import RewardScorer

        path = resolve_path(cfg.model, "reward.model")
        if is_preference_model(path):
            raise ConfigError(f"reward.model: {cfg.model} is a pairwise preference model (trainer: preference_model), "
                              "which scores pairs: use it with reward.type=routed (reward.preference_model)")
        self.scorer = RewardScorer.from_dir(path, batch_size=cfg.batch_size)

    def __call__(self, examples: list[Example], responses: list[str]) -> list[float]:
        return self.scorer.score([e.prompt for e in examples], responses)


def answers_needed(cfg: RewardConfig) -> str | None:
    """What needs an `answer` in every prompt row (load_prompts' check), or None."""
    return "reward.type=verifiable" if cfg.type == "verifiable" else None


def build_reward(cfg: RewardConfig) -> RewardFn:
    if cfg.type == "verifiable":
        return VerifiableReward(cfg.correct, cfg.incorrect)
    if cfg.type == "remote":
        return RemoteReward(cfg)
    if cfg.type == "routed":
        raise ConfigError("reward.type=routed scores pairs, not single responses: use it with trainer: routed_rl "
                          "(or serve it with align serve-rm --routing)")
    if cfg.type == "none":
        raise ConfigError("reward.type=none gives no reward: only trainer: pairwise_rlhf (whose judge compares the "
                          "responses) accepts it")
    if cfg.type == "model":
        return ModelReward(cfg)
    raise ConfigError("reward.type=python: its functions score rollout batches; build it with batch_reward(cfg)")


def batch_reward(cfg: BaseConfig) -> BatchReward:
    """The reward of an online trainer's recipe: TRL-style functions on the batch, or a text reward."""
    from alignment.online import TextReward  # the online toolbox only where a trainer asks

    if cfg.reward.type == "python":
        return PythonRewards(cfg.reward, max_steps=cfg.train.max_steps)
    return TextReward(build_reward(cfg.reward))
