"""Reward functions for tests on tiny random models (loaded through reward.type=python)."""

import os

VOWELS = set("aeiou")


def vowels(prompts, completions, answers=None, **kwargs):
    """Fraction of characters that are lowercase vowels: a dense reward, learnable from random init.
    Called either way: TRL's keywords (reward.functions) or the former fn(prompts, responses, answers).

    With TOY_REWARD_LOG set, each rank appends the prompts it scored to `<TOY_REWARD_LOG>.<rank>`, so
    tests can check that ranks see different data.
    """
    log = os.environ.get("TOY_REWARD_LOG")
    if log:
        with open(f"{log}.{os.environ.get('RANK', '0')}", "a") as f:
            f.writelines(f"{p}\n" for p in prompts)
    responses = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [sum(c in VOWELS for c in r) / max(len(r), 1) for r in responses]
