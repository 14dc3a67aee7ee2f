"""The verifiable reward: reasoning-gym's checker on the whole response or on its last number."""

from __future__ import annotations

import reasoning_gym

from alignment.data import Example
from rewards.verifiable import VerifiableReward, is_correct


def test_chain_sum_answers_are_checked_with_extraction():
    entry = reasoning_gym.create_dataset("chain_sum", size=1, seed=1)[0]
    example = Example(prompt=entry["question"], answer=entry["answer"], entry=entry)
    answer = entry["answer"]
    assert is_correct(example, answer)
    assert is_correct(example, f"The final answer to the given arithmetic problem is {answer}.")
    assert not is_correct(example, f"{answer} + 1 = {int(answer) + 1}")  # the last number decides
    assert not is_correct(example, "I do not know.")
    reward = VerifiableReward(correct=1.0, incorrect=-1.0)
    assert reward([example, example], [answer, "12345"]) == [1.0, -1.0]


def test_plain_answers_match_after_normalising():
    example = Example(prompt="Capital of France?", answer="Paris")
    assert is_correct(example, "  paris. ")
    assert not is_correct(example, "Lyon")
