"""A judging task whose verdict can be reasoned out step by step: Think-RM's CPU-sized demonstration.

Every word has a hidden worth from 1 to 5; a response is one word and the better response is the
word worth more. A judge that looks up each response's worth, then compares the two ("A is worth 4.
B is worth 2. So A is better.") is always right. The teacher is that procedure written out (a
programmatic stand-in for the paper's QwQ-32B): per pair it returns a long correct trace, a terse
correct one and, for about a third of the pairs, a longer wrong one (the worths swapped), so
`build_sft_examples` must pick the longest *correct* trace. Multiclass strengths are the worth gap,
capped at 3.

(Measured first: an arithmetic version, "What is 3 + 4?" with the trace copying operands and answers,
was not learnt by a 2- or 4-layer Llama from scratch in 500 SFT steps: copying numbers out of the
prompt never emerged and the loss stalled at 0.25. Word worths need a lookup, not a copy.)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tests.support.preference_task import WORDS

CRITERIA = "Every word has a worth from 1 to 5. The better response is the word worth more."
PROMPT = "Which word is better?"
WORTH = {w: 1 + (i * 7) % 5 for i, w in enumerate(WORDS)}


def make_pairs(count: int, seed: int) -> list[dict]:
    """Preference pairs {"prompt", "chosen", "rejected", "strength"} of words with different worths."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        a, b = rng.sample(WORDS, 2)
        if WORTH[a] != WORTH[b]:
            hi, lo = (a, b) if WORTH[a] > WORTH[b] else (b, a)
            out.append({"prompt": PROMPT, "chosen": hi, "rejected": lo, "strength": min(3, WORTH[hi] - WORTH[lo])})
    return out


def teacher(prompts: list, responses_a: list[str], responses_b: list[str], seed: int = 0,
            verdict: str = "binary") -> list[list[str]]:
    """Sampled judgements per pair (full outputs ending in an <answer>)."""
    rng = random.Random(seed)

    def trace(x: int, y: int, long: bool = True) -> str:
        better = "A" if x > y else "B"
        answer = better if verdict == "binary" else str(min(3, abs(x - y)) * (-1 if better == "A" else 1))
        if not long:
            return f"<think>{x} {y}</think><answer>{answer}</answer>"
        return f"<think>\nA is worth {x}. B is worth {y}. So {better} is better.\n</think>\n<answer>{answer}</answer>"

    out = []
    for a, b in zip(responses_a, responses_b):
        samples = [trace(WORTH[a], WORTH[b]), trace(WORTH[a], WORTH[b], long=False)]
        if rng.random() < 1 / 3:
            samples.append(trace(WORTH[b], WORTH[a]) + " Checked twice.")  # longer than the right one, and wrong
        out.append(samples)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def comparison_rows(pairs: list[dict], seed: int, verdict: str = "binary") -> list[dict]:
    """Judgement rows without reasoning (RL and held-out), in a seeded random A/B order."""
    rng = random.Random(seed)
    rows = []
    for p in pairs:
        first = rng.random() < 0.5
        a, b = (p["chosen"], p["rejected"]) if first else (p["rejected"], p["chosen"])
        label = ("A" if first else "B") if verdict == "binary" else (-p["strength"] if first else p["strength"])
        rows.append({"prompt": p["prompt"], "response_a": a, "response_b": b, "label": label})
    return rows


def write_splits(folder: Path, verdict: str = "binary", sft_pairs: int = 400, rl_pairs: int = 800,
                 held_out_pairs: int = 128) -> dict[str, Path]:
    """sft.jsonl (teacher reasoning, longest correct kept), rl.jsonl and held_out.jsonl (labels only),
    pairs.jsonl (the SFT pairs as preference pairs, for a Bradley-Terry baseline)."""
    from rewards.generative import GenRMFormat
    from rewards.sft_examples import build_sft_examples

    folder.mkdir(parents=True, exist_ok=True)
    pairs = make_pairs(sft_pairs, seed=1)
    fmt = GenRMFormat(verdict=verdict, criteria=CRITERIA)
    rows, _ = build_sft_examples(pairs, lambda p, a, b: teacher(p, a, b, verdict=verdict), fmt, seed=0)
    return {"sft": write_jsonl(folder / "sft.jsonl", rows),
            "rl": write_jsonl(folder / "rl.jsonl", comparison_rows(make_pairs(rl_pairs, seed=2), 3, verdict)),
            "held_out": write_jsonl(folder / "held_out.jsonl",
                                    comparison_rows(make_pairs(held_out_pairs, seed=4), 5, verdict)),
            "pairs": write_jsonl(folder / "pairs.jsonl", pairs)}
