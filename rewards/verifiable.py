"""Rule-based rewards for prompts with a checkable answer (reasoning-gym tasks, or an `answer` field)."""

from __future__ import annotations

import functools
import re

from alignment.data import Example


@functools.lru_cache(maxsize=None)
def _gym_scorer(task: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip().rstrip(".").strip().lower()


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def candidates(response: str) -> list[str]:
    """The whole response, then its last number ("The answer is 6." -> "6"), as math RL graders do."""
    out = [response.strip()]
    numbers = NUMBER.findall(response)
    if numbers:
        out.append(numbers[-1])
    return out


def is_correct(example: Example, response: str) -> bool:
    """reasoning-gym's own checker for its tasks; normalised exact match for a plain `answer`."""
    if example.entry is not None:
        scorer = _gym_scorer(example.entry["metadata"]["source_dataset"])
        return any(scorer(c, example.entry) >= 1.0 for c in candidates(response))
    if example.answer is None:
        raise ValueError("a verifiable reward needs an 'answer' in every prompt row")
    return any(_normalise(c) == _normalise(example.answer) for c in candidates(response))


def accuracy_checks(examples: list[Example]) -> dict:
    """`eval/accuracy` of the greedy responses where every held-out prompt has a checkable answer."""
    checkable = examples and all(e.entry is not None or e.answer is not None for e in examples)
    return {"accuracy": is_correct} if checkable else {}


class VerifiableReward:
    """+1 / -1 by default (the PMD recipe's scale: verl `math_dapo`)."""

    def __init__(self, correct: float = 1.0, incorrect: float = -1.0):
        self.correct = correct
        self.incorrect = incorrect

    def __call__(self, examples: list[Example], responses: list[str]) -> list[float]:
        return [self.correct if is_correct(e, r) else self.incorrect for e, r in zip(examples, responses)]
