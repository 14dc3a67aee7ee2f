"""What produces a reward signal. `build_reward(cfg.reward)` -> fn(examples, responses) -> list[float]."""

from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path
from typing import Callable

from alignment.config import ConfigError, RewardConfig
from alignment.data import Example
from rewards.remote import RemoteReward
from rewards.verifiable import VerifiableReward

RewardFn = Callable[[list[Example], list[str]], list[float]]


def load_function(spec: str) -> Callable:
    """`path/to/file.py:name` or `package.module:name`."""
    if ":" not in spec:
        raise ConfigError(f"reward.function: expected 'file.py:name' or 'module:name', got {spec!r}")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        if not Path(where).is_file():
            raise ConfigError(f"reward.function: file not found: {where}")
        module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"reward.function: {where} has no callable {name!r}")
    return fn


class PythonReward:
    """A user function `fn(prompts, responses, answers) -> list[float]` (TRL / OpenRLHF style)."""

    def __init__(self, spec: str):
        self.spec = spec
        self.fn = load_function(spec)

    def __call__(self, examples: list[Example], responses: list[str]) -> list[float]:
        values = self.fn([e.prompt for e in examples], responses, [e.answer for e in examples])
        values = [float(v) for v in values]
        if len(values) != len(responses):
            raise ValueError(f"reward function {self.spec} must return one float per response "
                             f"({len(responses)}), got {len(values)} values")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"reward function {self.spec} returned a non-finite reward: {values}")
        return values


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
    if not cfg.function:
        raise ConfigError("reward.function: required with reward.type=python")
    return PythonReward(cfg.function)
