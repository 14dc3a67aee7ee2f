"""Think-RM's SFT warm-up data built from preference pairs and a teacher's sampled judgements."""

from __future__ import annotations

import re
from typing import Callable

from alignment.data import DataError
from rewards.generative import GenRMFormat

_THINK_TAGS = re.compile(r"</?think>")


def reasoning_of(trace: str) -> str:
    """The reasoning part of a teacher's output: everything before its last <answer>, think tags removed."""
    head = trace[: trace.rfind("<answer>")] if "<answer>" in trace else trace
    return _THINK_TAGS.sub("", head).strip()


def build_sft_examples(pairs: list[dict], teacher: Callable[[list, list[str], list[str]], list[list[str]]],
                       fmt: GenRMFormat, seed: int = 0) -> tuple[list[dict], dict[str, int]]:
    """Think-RM's warm-up data from preference pairs `{"prompt", "chosen", "rejected", "strength"?}`.

    Each pair is shown in a seeded random order (the chosen response as A or as B). `teacher(prompts,
    responses_a, responses_b)` returns several sampled judgements per pair (full outputs ending in an
    <answer>); the longest one whose verdict matches the label is kept, as the reference kept QwQ's
    longest correct trace of 10. Pairs with no correct trace are dropped. Multiclass labels need the
    pair's `strength` (1..3, how much better the chosen response is).
    Returns the rows `{"prompt", "response_a", "response_b", "reasoning", "label"}` and counts.
    """
    import random

    rng = random.Random(seed)
    shown = []
    for i, pair in enumerate(pairs):
        chosen_first = rng.random() < 0.5
        size = 1
        if fmt.verdict == "multiclass":
            size = pair.get("strength")
            if not isinstance(size, int) or not 1 <= abs(size) <= 3:
                raise DataError(f"pair {i}: multiclass labels need a 'strength' of 1..3, got {size!r}")
            size = abs(size)
        a, b = (pair["chosen"], pair["rejected"]) if chosen_first else (pair["rejected"], pair["chosen"])
        shown.append((pair["prompt"], a, b, size if chosen_first else -size))
    traces = teacher([s[0] for s in shown], [s[1] for s in shown], [s[2] for s in shown])
    rows, dropped = [], 0
    for (prompt, a, b, strength), samples in zip(shown, traces):
        correct = [t for t in samples if fmt.strength(t) == strength]
        if not correct:
            dropped += 1
            continue
        rows.append({"prompt": prompt, "response_a": a, "response_b": b,
                     "reasoning": reasoning_of(max(correct, key=len)), "label": fmt.answer(strength)
                     if fmt.verdict == "binary" else -strength})
    return rows, {"pairs": len(pairs), "kept": len(rows), "dropped": dropped}
