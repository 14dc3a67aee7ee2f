"""Reward functions as TRL writes them (`reward.type: python`, `reward.functions`, `reward.weights`),
and `reward.type: model` (a sequence-classification reward model scored in-process)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from alignment.config import BaseConfig, ConfigError, load_config
from alignment.data import Example
from alignment.logging import read_metrics
from alignment.online import RolloutBatch
from alignment.rollout import Rollouts
from rewards import batch_reward
from tests.support import REPO

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]

REWARDS_PY = '''
SEEN = []

def needs_solution(prompts, completions, completion_ids, solution, trainer_state, **kwargs):
    """Asserts TRL's keyword convention and the data row's own field."""
    SEEN.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, solution=solution,
                     step=trainer_state.global_step, max_steps=trainer_state.max_steps, **kwargs))
    assert len(solution) == len(completions) == len(completion_ids) == len(prompts)
    return [1.0 if s is not None and s in (c if isinstance(c, str) else c[0]["content"]) else 0.0
            for s, c in zip(solution, completions)]

def half(completions, solution, log_metric, **kwargs):
    """Scores only rows whose solution is 'b' (None for the rest), and logs the fraction it scored."""
    values = [2.0 if s == "b" else None for s in solution]
    log_metric("half/scored_frac", sum(v is not None for v in values) / len(values))
    return values

def wrong_length(completions, **kwargs):
    return [0.0] * (len(completions) + 1)

def not_finite(completions, **kwargs):
    return [float("nan")] * len(completions)

def not_a_number(completions, **kwargs):
    return ["good"] * len(completions)

def nothing(completions, **kwargs):
    return [None] * len(completions)

async def later(completions, **kwargs):
    return [3.0] * len(completions)

def old_style(prompts, responses, answers):
    return [float(len(r)) for r in responses]
'''


@pytest.fixture
def funcs(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS_PY)
    return str(path)


def reward_of(**values):
    return batch_reward(load_config(BaseConfig, {"train": {"max_steps": 7}, "reward": {"type": "python", **values}}))


def make_batch(samples, texts, step=0):
    ids = [[10 + i, 11, 12] for i in range(len(texts))]
    batch = RolloutBatch(samples, Rollouts(response_ids=ids), texts, {}, torch.ones(len(texts), 3))
    batch.step = step
    return batch


def test_functions_get_trls_keywords_and_the_rows_fields(funcs):
    reward = reward_of(functions=[f"{funcs}:needs_solution"])
    samples = [Example("What is 2+2?", answer="4", extra={"solution": "4", "level": 1}),
               Example("What is 3+3?", extra={"solution": "6"})]
    batch = make_batch(samples, ["It is 4.", "It is 5."], step=3)
    rewards = reward(batch)
    assert rewards.tolist() == [1.0, 0.0]
    seen = reward.functions[0].fn.__globals__["SEEN"][-1]
    assert seen["prompts"] == ["What is 2+2?", "What is 3+3?"]
    assert seen["completions"] == ["It is 4.", "It is 5."]  # text prompts: text completions, as TRL
    assert seen["completion_ids"] == [[10, 11, 12], [11, 11, 12]]
    assert seen["solution"] == ["4", "6"] and seen["level"] == [1, None] and seen["answer"] == ["4", None]
    assert (seen["step"], seen["max_steps"]) == (3, 7)
    assert callable(seen["log_metric"]) and callable(seen["log_extra"])
    assert batch.reward_parts["needs_solution"].tolist() == [1.0, 0.0]
    assert batch.stats["rewards/needs_solution/mean"] == 0.5
    assert batch.stats["rewards/needs_solution/std"] == pytest.approx(math.sqrt(0.5))
    reward(make_batch(samples, ["4", "6"], step=-1))  # a held-out batch sees the steps done
    assert reward.functions[0].fn.__globals__["SEEN"][-1]["step"] == 4


def test_conversational_prompts_get_message_completions_and_think_format_reward_runs(funcs):
    reward = reward_of(functions=["trl.rewards:think_format_reward", f"{funcs}:needs_solution"], weights=[2.0, 1.0])
    samples = [Example(CHAT, extra={"solution": "hi"})] * 2
    batch = make_batch(samples, ["<think>\nfine\n</think>\nhi", "hi"])
    assert reward(batch).tolist() == [3.0, 1.0]
    seen = reward.functions[1].fn.__globals__["SEEN"][-1]
    assert seen["prompts"] == [CHAT, CHAT]
    assert seen["completions"] == [[{"role": "assistant", "content": "<think>\nfine\n</think>\nhi"}],
                                   [{"role": "assistant", "content": "hi"}]]
    assert batch.reward_parts["think_format_reward"].tolist() == [1.0, 0.0]
    assert set(batch.stats) == {f"rewards/{n}/{s}" for n in ("think_format_reward", "needs_solution")
                                for s in ("mean", "std")}


def test_none_is_skipped_by_the_weighted_sum(funcs, caplog):
    reward = reward_of(functions=[f"{funcs}:needs_solution", f"{funcs}:half", f"{funcs}:nothing"],
                       weights=[1.0, 0.5, 3.0])
    samples = [Example("p", extra={"solution": s}) for s in ("a", "b", "b", "c")]
    batch = make_batch(samples, ["a", "b", "x", "x"])
    assert reward(batch).tolist() == [1.0, 2.0, 1.0, 0.0]  # nansum: 1 + 0.5 * 2 where half scored
    half = batch.reward_parts["half"]
    assert half[[1, 2]].tolist() == [2.0, 2.0] and half[[0, 3]].isnan().all()
    assert batch.reward_parts["nothing"].isnan().all()
    assert batch.stats["rewards/half/mean"] == 2.0 and batch.stats["rewards/half/std"] == 0.0
    assert math.isnan(batch.stats["rewards/nothing/mean"])  # never scored: NaN (not logged), as TRL
    assert batch.stats["half/scored_frac"] == 0.5  # log_metric
    with caplog.at_level(logging.WARNING, logger="alignment"):
        assert reward_of(functions=[f"{funcs}:nothing"])(make_batch(samples[:2], ["a", "b"])).tolist() == [0.0, 0.0]
    assert "every reward function returned None for 2 of 2 completions" in caplog.text


def test_async_functions_and_the_former_single_function(funcs, caplog):
    assert reward_of(functions=[f"{funcs}:later"])(make_batch([Example("p")], ["x"])).tolist() == [3.0]
    with caplog.at_level(logging.WARNING, logger="alignment"):
        reward = reward_of(function=f"{funcs}:old_style", weights=[2.0])
    assert "reward.function is deprecated" in caplog.text and "reward.functions" in caplog.text
    batch = make_batch([Example(CHAT)] * 2, ["abc", "de"])
    assert reward(batch).tolist() == [6.0, 4.0]  # positional, with response texts, as before
    assert batch.stats["rewards/old_style/mean"] == 2.5


@pytest.mark.parametrize("name, message", [
    ("wrong_length", r"reward function 'wrong_length' \(.*my_rewards.py:wrong_length\) returned 2 rewards, but 1 "
                     r"were expected"),
    ("not_finite", r"reward function 'not_finite' .* returned a non-finite reward \(nan\) for completion 0"),
    ("not_a_number", r"reward function 'not_a_number' .* returned 'good' for completion 0: expected a float or None"),
])
def test_a_bad_return_names_the_function(funcs, name, message):
    with pytest.raises(ValueError, match=message):
        reward_of(functions=[f"{funcs}:{name}"])(make_batch([Example("p")], ["x"]))


def test_config_errors(funcs, tmp_path):
    cases = [
        ({"functions": [f"{funcs}:half"], "weights": [1.0, 2.0]},
         "reward.weights: 2 weights for 1 reward function: give one weight per function"),
        ({"functions": [f"{funcs}:half"], "function": f"{funcs}:half"}, "set only reward.functions"),
        ({}, "reward.functions: required with reward.type=python"),
        ({"functions": ["nowhere.py:fn"]}, "reward.functions: file not found: nowhere.py"),
        ({"functions": ["no_such_module_xyz:fn"]}, "reward.functions: cannot import no_such_module_xyz"),
        ({"functions": [f"{funcs}:missing"]}, "has no callable 'missing'"),
        ({"functions": ["think_format_reward"]}, "expected 'file.py:name' or 'package.module:name'"),
        ({"function": "nowhere.py:fn"}, "reward.function: file not found"),
        ({"functions": [f"{funcs}:half", f"{funcs}:half"]}, "are both named 'half'"),
    ]
    for values, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
            reward_of(**values)
    with pytest.raises(ConfigError, match=r"reward\.model: required with reward\.type=model"):
        load_config(BaseConfig, {"reward": {"type": "model"}})


def test_model_reward_scores_as_serve_rm_does(rm_dir, scorer):
    """reward.type: model scores in-process with the scorer `align serve-rm` answers with: the same
    numbers, `reward.batch_size` pairs per forward."""
    reward = batch_reward(load_config(BaseConfig, {"reward": {"type": "model", "model": str(rm_dir), "batch_size": 3}}))
    assert reward.fn.scorer.batch_size == 3
    prompts = [CHAT if i % 3 == 0 else f"Question {i}?" for i in range(7)]
    responses = [f"Answer {i}, with some words." for i in range(7)]
    got = reward(make_batch([Example(p) for p in prompts], responses))
    assert got.tolist() == pytest.approx(scorer.score(prompts, responses), abs=1e-5)
    assert len(set(round(v, 4) for v in got.tolist())) > 3  # the scores tell responses apart


def test_grpo_run_logs_each_function(tmp_path, tiny_model, funcs):
    """A real 1-step GRPO run: the functions see the data rows' fields, the weighted sum is the reward,
    and each function's mean / std are logged."""
    from align.cli import main
    from tests.support.recipes import toy_recipe

    rows = [{"prompt": f"Say the letter {s}.", "solution": s} for s in "ab"]  # each step takes both
    data = tmp_path / "letters.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = toy_recipe(tmp_path, tiny_model, trainer="grpo", data={"path": str(data), "eval_path": None},
                        rollout={"n": 2, "max_new_tokens": 4},
                        train={"max_steps": 1, "batch_size": 2, "mini_batches": 1, "log_samples_every": 0},
                        reward={"type": "python", "function": None,
                                "functions": [f"{funcs}:half", str(REPO / "tests/support/toy_rewards.py") + ":vowels"],
                                "weights": [0.5, 1.0]})
    assert main(["train", str(recipe), f"output_dir={tmp_path / 'out'}"]) == 0
    (row,) = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if r["step"] == 1]
    assert row["rewards/half/mean"] == 2.0 and row["rewards/half/std"] == 0.0
    assert {"rewards/vowels/mean", "rewards/vowels/std", "reward/mean", "reward/std"} <= set(row)
    # half scores 2.0 on a fraction of the samples, weighted 0.5: it adds that fraction to vowels' mean
    assert row["half/scored_frac"] == 0.5
    assert row["reward/mean"] == pytest.approx(row["rewards/vowels/mean"] + 0.5, abs=1e-5)
