"""Uncertainty routing: the preference model scores every pair, the uncertain ones go to a judge.

Pairs are scored by an SNGP preference model (rewards/preference_model.py) as an antisymmetric score
S_ab = -S_ba (a calibrated logit of "A better") with an uncertainty U_ab >= 1. A routing policy
(`reward.router.policy`) picks the pairs the strong judge decides:
- `threshold`: U > `threshold` (the reference rule; the judged fraction then depends on the data);
- `budget`: the `budget` fraction of the batch's pairs with the highest U (a fixed cost per batch);
- `random`: the same number of pairs, chosen uniformly (the paper's baseline);
- `always` / `never`: every pair / none.
A judged pair's score becomes the reference's +2 (A better), -2 (B better) or 0 (tie), times the
judge's verdict in [-1, 1] (a position-swapped judge can give +-0.5). A pair whose judge call fails
keeps the preference model's score and is counted in `router/judge_failures`, never turned into a
made-up verdict. `router/judge_frac` is the judge's cost: routed pairs / pairs.

In routed RL (trainers/routed_rl.py) every ordered pair within a prompt's group is scored and the
advantage of response i is A_i = scale * sum_{j != i} S_ij / (n - 1): with S_ij = r_i - r_j it is
exactly RLOO's. Under data parallelism the policy is applied to the global batch: the ranks share
their uncertainties, so `budget` and `random` pick the same pairs whatever the world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from alignment.config import RewardConfig, RouterConfig

JUDGED_SCORE = 2.0  # |S| of a decided judge verdict (the reference's scale)


def route(uncertainty: torch.Tensor, cfg: RouterConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean mask over pairs: which go to the judge."""
    count = len(uncertainty)
    if cfg.policy == "threshold":
        return uncertainty > cfg.threshold
    mask = torch.zeros(count, dtype=torch.bool)
    if cfg.policy == "always":
        mask[:] = True
    elif cfg.policy in ("budget", "random"):
        k = min(count, round(cfg.budget * count))
        if cfg.policy == "budget":
            chosen = torch.topk(uncertainty.float(), k).indices
        else:
            chosen = torch.randperm(count, generator=generator)[:k]
        mask[chosen] = True
    return mask


@dataclass
class Routed:
    """One batch of pairs after routing."""

    scores: torch.Tensor  # (P,) S_ab: the preference model's, or the judge's where judged
    uncertainty: torch.Tensor  # (P,) U_ab
    judged: torch.Tensor  # (P,) bool: the judge's verdict replaced the score
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def prob_a(self) -> list[float]:
        return torch.sigmoid(self.scores).tolist()


class PairRouter:
    """The preference model, the router and the judge together: `compare` for pairs, `group_scores`
    for the n x n matrices of routed RL. Counters (`pairs`, `routed`, `failures`) run over its life."""

    def __init__(self, scorer, judge, cfg: RouterConfig, seed: int = 0):
        self.scorer = scorer
        self.judge = judge
        self.cfg = cfg
        self.seed = seed
        self.pairs = self.routed = self.failures = 0

    @classmethod
    def from_config(cls, cfg: RewardConfig, seed: int = 0, device=None) -> PairRouter:
        from rewards.judges import build_judge
        from rewards.preference_model import PreferenceScorer

        scorer = PreferenceScorer.from_dir(cfg.preference_model, batch_size=cfg.batch_size, device=device)
        judge = build_judge(cfg.judge) if cfg.judge is not None and cfg.router.policy != "never" else None
        return cls(scorer, judge, cfg.router, seed)

    def close(self) -> None:
        if self.judge is not None:
            self.judge.close()

    def compare(self, prompts: list, responses_a: list, responses_b: list, step: int = 0,
                global_batch: bool = False) -> Routed:
        """Score the pairs, route, judge. `global_batch`: the policy sees every rank's pairs (all ranks
        must call together)."""
        scores, uncertainty = self.scorer.compare(prompts, responses_a, responses_b)
        return self.route_and_judge(prompts, responses_a, responses_b, scores, uncertainty, step, global_batch)

    def route_and_judge(self, prompts: list, responses_a: list, responses_b: list, scores: torch.Tensor,
                        uncertainty: torch.Tensor, step: int = 0, global_batch: bool = False) -> Routed:
        """The router and the judge on pairs the preference model has scored (S_ab, U_ab)."""
        scores = scores.clone()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        if global_batch and dist.is_initialized() and dist.get_world_size() > 1:
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, uncertainty.tolist())
            start = sum(len(u) for u in everyone[: dist.get_rank()])
            routed = route(torch.tensor([x for u in everyone for x in u]), self.cfg, generator)
            routed = routed[start:start + len(uncertainty)]
        else:
            routed = route(uncertainty, self.cfg, generator)
        judged = torch.zeros_like(routed)
        index = routed.nonzero().flatten().tolist()
        if index and self.judge is not None:
            verdicts = self.judge.compare([prompts[i] for i in index], [responses_a[i] for i in index],
                                          [responses_b[i] for i in index])
            for i, verdict in zip(index, verdicts):
                if verdict is not None and math.isfinite(verdict):
                    scores[i] = JUDGED_SCORE * verdict
                    judged[i] = True
        failures = int(routed.sum() - judged.sum())
        self.pairs += len(scores)
        self.routed += int(routed.sum())
        self.failures += failures
        stats = {"router/judge_frac": float(routed.float().mean()) if len(scores) else 0.0,
                 "router/judge_failures": float(failures),
                 "router/uncertainty_mean": float(uncertainty.mean()) if len(scores) else 0.0}
        return Routed(scores, uncertainty, judged, stats)

    def group_scores(self, prompts: list, groups: list[list[str]], passed: list[list[bool]] | None = None,
                     step: int = 0, global_batch: bool = False) -> tuple[list[torch.Tensor], dict[str, float]]:
        """Per prompt, the antisymmetric n x n score matrix S of its responses. With `passed` (a
        rule-based verifier), only passing responses are compared; a failing one loses to every
        passing one by the judged score, and failing ones tie with each other (the reference's
        verifier mode)."""
        passed = passed or [[True] * len(g) for g in groups]
        where, pa, pb, pp = [], [], [], []
        for g, (prompt, responses, ok) in enumerate(zip(prompts, groups, passed)):
            for i in range(len(responses)):
                for j in range(i + 1, len(responses)):
                    if ok[i] and ok[j]:
                        where.append((g, i, j))
                        pp.append(prompt)
                        pa.append(responses[i])
                        pb.append(responses[j])
        result = self.compare(pp, pa, pb, step, global_batch)
        matrices = []
        for responses, ok in zip(groups, passed):
            ok = torch.tensor(ok, dtype=torch.float32)
            # +2 where i passes and j fails, -2 the other way round, 0 between two failing responses
            matrices.append(JUDGED_SCORE * (ok[:, None] - ok[None, :]))
        for (g, i, j), s in zip(where, result.scores.tolist()):
            matrices[g][i, j], matrices[g][j, i] = s, -s
        return matrices, result.stats
