"""Reward functions as TRL writes them (`reward.type: python`, `reward.functions`).

Each function is called as TRL's GRPOTrainer calls its `reward_funcs` (`_calculate_rewards`), with
keywords only:

    fn(prompts=[...], completions=[...], completion_ids=[[int]], <every other field of the data row>=[...],
       trainer_state=..., log_metric=..., log_extra=...) -> list[float | None]

- `prompts`: each sample's prompt as in the data (text, or chat messages);
- `completions`: the response texts, or, where the prompts are conversational (chat messages; decided
  on the batch's first prompt, as TRL does), one-message lists `[{"role": "assistant", "content": text}]`;
- `completion_ids`: the sampled token ids of each response;
- the row's other fields under their own names (`Example.extra`, e.g. `solution=`), and `answer=`
  where the rows have one; a field some rows lack is None for those rows;
- `trainer_state`: `.global_step` (trainer steps done) and `.max_steps`, for schedules;
  `log_metric(name, value)`: a scalar logged with the step; `log_extra(column, values)`: accepted and
  dropped (TRL's completions table; samples.jsonl carries each function's values instead).

A function returns one value per sample, or None for a sample it does not score. As in TRL, None is
NaN and the reward is the weighted `nansum` over functions (`reward.weights`, default all 1); a completion
no function scores gets 0, with a warning (TRL 1.16 further leaves it out of its group's baseline).
`rewards/<name>/mean` and `rewards/<name>/std` are each function's `nanmean` / `nanstd` (name: the
function's `__name__`, as TRL names them), and `batch.reward_parts[name]` its per-sample values.

The former `reward.function` (one function called positionally, `fn(prompts, responses, answers)` with
response texts) still works and warns: write `reward.functions` with the keyword convention.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.util
import inspect
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from alignment.config import ConfigError, RewardConfig

if TYPE_CHECKING:
    from alignment.data import Example
    from alignment.online import RolloutBatch

log = logging.getLogger("alignment")


def load_function(spec: str, key: str = "reward.functions") -> Callable:
    """`path/to/file.py:name` or `package.module:name`; `key` names the config key in errors."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(f"{key}: expected 'file.py:name' or 'package.module:name', got {spec!r}")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        if not Path(where).is_file():
            raise ConfigError(f"{key}: file not found: {where}")
        module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ConfigError(f"{key}: cannot import {where} ({e})") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{key}: {where} has no callable {name!r}")
    return fn


def function_name(fn: Callable) -> str:
    """TRL's name for a reward function (`get_callable_name`): partials unwrapped, instances by class."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


@dataclass
class TrainerState:
    """What TRL's `trainer_state` gives a reward schedule: trainer steps done, and the run's total."""

    global_step: int = 0
    max_steps: int = 0


@dataclass
class RewardFunction:
    name: str
    fn: Callable
    spec: str
    positional: bool = False  # reward.function: the former fn(prompts, responses, answers)

    def __str__(self) -> str:
        return f"reward function {self.name!r} ({self.spec})"


def is_conversational(prompt) -> bool:
    """A prompt of chat messages (TRL's `is_conversational` on the prompt)."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def row_columns(samples: list[Example]) -> dict[str, list]:
    """Each data field of the samples' rows by name, one value per sample (None where a row lacks it):
    the row's other fields (`Example.extra`), and `answer` where any row has one."""
    names: dict[str, None] = {}  # in order of first appearance
    for e in samples:
        names.update(dict.fromkeys(k for k in e.extra if k not in ("prompt", "completion", "completion_ids")))
    columns = {name: [e.extra.get(name) for e in samples] for name in names}
    if any(e.answer is not None for e in samples):
        columns["answer"] = [e.answer if e.answer is not None else e.extra.get("answer") for e in samples]
    return columns


def checked_values(function: RewardFunction, values, count: int) -> torch.Tensor:
    """(count,) float32, NaN where the function returned None; a clear error naming the function otherwise."""
    try:
        values = list(values)
    except TypeError:
        raise ValueError(f"{function} must return a list of floats (one per completion), got "
                         f"{type(values).__name__}") from None
    if len(values) != count:
        raise ValueError(f"{function} returned {len(values)} rewards, but {count} were expected (one per "
                         f"prompt-completion pair)")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{function} returned {v!r} for completion {i}: expected a float or None") from None
        if not math.isfinite(v):
            raise ValueError(f"{function} returned a non-finite reward ({v}) for completion {i} (return None "
                             "for a completion it does not score)")
        out.append(v)
    return torch.tensor(out, dtype=torch.float32)


class PythonRewards:
    """`reward.functions` weighted and summed, as a BatchReward (the rollout batch in, (B,) rewards out);
    each function's values go to `batch.reward_parts`, their mean / std to `batch.stats`."""

    def __init__(self, cfg: RewardConfig, max_steps: int = 0):
        if cfg.function:
            fn = load_function(cfg.function, "reward.function")
            log.warning("reward.function is deprecated: it calls %s positionally as fn(prompts, responses, answers). "
                        "Use reward.functions: [%s], whose functions are called with keywords as TRL's GRPOTrainer "
                        "calls them: fn(prompts=, completions=, completion_ids=, <row fields>=, **kwargs)",
                        cfg.function, cfg.function)
            self.functions = [RewardFunction(function_name(fn), fn, cfg.function, positional=True)]
        else:
            self.functions = [RewardFunction(function_name(fn), fn, spec)
                              for spec, fn in ((s, load_function(s)) for s in cfg.functions)]
        seen: dict[str, str] = {}
        for f in self.functions:
            if f.name in seen:
                raise ConfigError(f"reward.functions: {seen[f.name]} and {f.spec} are both named {f.name!r} (their "
                                  f"metrics rewards/{f.name}/* would collide): rename one")
            seen[f.name] = f.spec
        self.weights = torch.tensor(cfg.weights if cfg.weights is not None else [1.0] * len(self.functions),
                                    dtype=torch.float32)
        self.state = TrainerState(max_steps=max_steps)
        self.steps_done = 0

    def _call(self, function: RewardFunction, batch: RolloutBatch, kwargs: dict) -> torch.Tensor:
        if function.positional:
            values = function.fn([e.prompt for e in batch.samples], list(batch.texts),
                                 [e.answer for e in batch.samples])
        else:
            values = function.fn(**kwargs)
        if inspect.isawaitable(values):  # an async reward function (TRL gathers them; one at a time here)
            values = asyncio.run(_awaited(values))
        return checked_values(function, values, len(batch.samples))

    def __call__(self, batch: RolloutBatch) -> torch.Tensor:
        samples = batch.samples
        step = getattr(batch, "step", -1)  # -1: a held-out batch, which sees the steps done so far
        self.state.global_step = step if step >= 0 else self.steps_done
        self.steps_done = max(self.steps_done, step + 1)
        prompts = [e.prompt for e in samples]
        texts = list(batch.texts)
        conversational = bool(samples) and is_conversational(samples[0].prompt)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        logged: dict[str, list[float]] = {}
        kwargs = {
            **row_columns(samples),
            "prompts": prompts, "completions": completions,
            "completion_ids": [[int(t) for t in ids] for ids in batch.rollouts.response_ids],
            "trainer_state": self.state,
            "log_metric": lambda name, value: logged.setdefault(name, []).append(float(value)),
            "log_extra": lambda column, values: None,
        }
        parts = {f.name: self._call(f, batch, kwargs) for f in self.functions}
        table = torch.stack(list(parts.values()), 1) if samples else torch.zeros(0, len(parts))  # (B, F)
        # TRL's semantics: a None is NaN and the weighted sum skips it (nansum); the per-function metrics
        # are nanmean / nanstd over the samples the function scored.
        rewards = (table * self.weights).nansum(1)
        unscorable = table.isnan().all(1)
        if unscorable.any():
            # Such a completion gets the nansum's 0, as in earlier TRL; TRL 1.16 (installed here) also leaves it
            # out of its group's baseline and zeroes its advantage, which our estimators (finite rewards) do not.
            i = int(unscorable.nonzero()[0])
            log.warning("every reward function returned None for %d of %d completions; they get reward 0. First: "
                        "prompt %r, completion %r", int(unscorable.sum()), len(samples), prompts[i], texts[i])
        for name, values in parts.items():
            batch.reward_parts[name] = values
            scored = values[~values.isnan()]
            batch.stats[f"rewards/{name}/mean"] = float(scored.mean()) if len(scored) else math.nan
            batch.stats[f"rewards/{name}/std"] = float(scored.std()) if len(scored) > 1 else 0.0
        for name, values in logged.items():
            batch.stats[name] = sum(values) / len(values)
        return rewards.to(batch.mask.device)


async def _awaited(awaitable):
    return await awaitable
