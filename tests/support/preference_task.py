"""A preference task with a known truth, for the uncertainty-routing checks (test and benchmark).

Every word has a hidden value; a response is a few words and the better response is the one with the
larger total. Training pairs use only the first `in_words` words (in distribution); out-of-distribution
pairs use words the model never saw. A judge that is right with probability `accuracy` is simulated
from the truth.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

WORDS = ("apple river stone cloud music garden window silver forest candle paper bridge mountain ocean summer "
         "winter coffee tiger rabbit horse castle island planet rocket button pencil mirror basket jacket ladder "
         "lemon orange banana cherry tomato potato carrot onion pepper butter cheese bread honey sugar salt water "
         "fire earth wind light shadow thunder storm snow rain sun moon star dream story letter number circle "
         "square").split()
PROMPT = "Which words are better?"


@dataclass
class PairItem:
    prompt: str
    a: str
    b: str
    a_better: bool  # the truth
    margin: float  # value(a) - value(b)
    in_distribution: bool


class WordValueTask:
    def __init__(self, seed: int = 0, in_words: int = 40, words_per_response: int = 2):
        rng = random.Random(seed)
        self.values = {w: rng.gauss(0.0, 1.0) for w in WORDS}
        self.in_words, self.out_words = list(WORDS[:in_words]), list(WORDS[in_words:])
        self.k = words_per_response

    def value(self, response: str) -> float:
        return sum(self.values[w] for w in response.split())

    def pairs(self, count: int, in_distribution: bool, seed: int) -> list[PairItem]:
        rng = random.Random(seed)
        words = self.in_words if in_distribution else self.out_words
        out = []
        while len(out) < count:
            a, b = (" ".join(rng.sample(words, self.k)) for _ in range(2))
            margin = self.value(a) - self.value(b)
            if abs(margin) > 1e-6:
                out.append(PairItem(PROMPT, a, b, margin > 0, margin, in_distribution))
        return out

    def write_training_pairs(self, path: Path, count: int, seed: int) -> Path:
        rows = [{"prompt": p.prompt, "chosen": p.a if p.a_better else p.b, "rejected": p.b if p.a_better else p.a}
                for p in self.pairs(count, True, seed)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path


def simulated_judge(items: list[PairItem], accuracy: float, seed: int) -> list[float]:
    """+1 (A better) / -1 per pair, right with probability `accuracy`."""
    rng = random.Random(seed)
    return [(1.0 if p.a_better else -1.0) * (1.0 if rng.random() < accuracy else -1.0) for p in items]


def accuracy_by_decile(scores, uncertainty, truth) -> list[tuple[float, float]]:
    """(mean uncertainty, accuracy) of each uncertainty decile, least uncertain first."""
    import torch

    order = torch.argsort(uncertainty, stable=True)
    correct = ((scores > 0) == truth).float()
    out = []
    for d in range(10):
        rows = order[d * len(order) // 10:(d + 1) * len(order) // 10]
        out.append((float(uncertainty[rows].mean()), float(correct[rows].mean())))
    return out


def routed_accuracy(scores, uncertainty, truth, verdicts, router_cfg, seed: int = 0) -> tuple[float, float]:
    """(accuracy, judged fraction) when the routed pairs take the judge's verdicts; a tie counts half."""
    import torch

    from rewards.routing import route

    routed = route(uncertainty, router_cfg, torch.Generator().manual_seed(seed))
    decided = torch.where(routed, torch.as_tensor(verdicts, dtype=scores.dtype), scores)
    right = torch.where(decided == 0, 0.5, ((decided > 0) == truth).float())
    return float(right.mean()), float(routed.float().mean())
