"""Reward functions for tests on tiny random models (loaded through reward.type=python)."""

import os

VOWELS = set("aeiou")


def vowels(prompts, responses, answers):
    """Fraction of characters that are lowercase vowels: a dense reward, learnable from random init.

    With TOY_REWARD_LOG set, each rank appends the prompts it scored to `<TOY_REWARD_LOG>.<rank>`, so
    tests can check that ranks see different data.
    """
    log = os.environ.get("TOY_REWARD_LOG")
    if log:
        with open(f"{log}.{os.environ.get('RANK', '0')}", "a") as f:
            f.writelines(f"{p}\n" for p in prompts)
    return [sum(c in VOWELS for c in r) / max(len(r), 1) for r in responses]
