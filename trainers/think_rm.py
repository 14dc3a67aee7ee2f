"""Think-RM: a generative reward model that reasons at length, then gives a pairwise verdict (Hong et
al., NeurIPS 2025; format in rewards/generative.py). Two stages, two trainers:

    align train configs/think_rm_sft.yaml      # trainer: think_rm_sft, on teacher reasoning
    align train configs/think_rm_rl.yaml       # trainer: think_rm_rl, from the SFT model, labels only

1. **SFT warm-up** on long chain-of-thought judgements, rows `{"prompt", "response_a", "response_b",
   "reasoning", "label"}` (`rewards.sft_examples.build_sft_examples` makes them from preference pairs
   and a teacher, keeping the longest correct trace per pair). The prompt is the judge prompt (with
   "<think>\\n" prefilled when `think_prefill`); the target is the reasoning, </think>, and the
   <answer>; plain NLL on the target (trainers/sft.py). A row longer than `sft.max_length` keeps its
   whole prompt and the beginning and end of its reasoning (its middle cut, "\\n...\\n" in its
   place), so the verdict is always learned; a row whose prompt and verdict alone are too long is
   dropped with a warning. `data/truncated_frac` (logged each step) is the fraction of training rows
   cut or dropped.
2. **Rule-based RL**: GRPO (trainers/grpo.py, its step: group-normalised advantage, clipped loss,
   k3 KL loss) on the same judge prompts, rewarded by the verdict: binary 1 if right, else 0;
   multiclass 1 exact, 0.5 right side, 0 otherwise (unparsable, i.e. no one valid answer outside the
   reasoning as rewards/generative.py reads it: 0, counted in `genrm/parse_fail_frac`). Rows need no
   reasoning.

Both stages write `final/genrm.json` (verdict type, prefill, criteria): the RL stage and a
`generative_rm` judge on the model read it, so every stage asks the way the model learned.
`think_rm.verdict`, `think_rm.think_prefill` and `think_rm.criteria` override it. Held-out: the RL
stage reports `eval/accuracy` (right side), `eval/reward` and `eval/parse_fail_frac` from greedy
verdicts; the SFT stage `eval/loss`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

import torch

from alignment.config import AlgoConfig, BaseConfig
from alignment.data import DataError, Example
from alignment.models import resolve_path
from alignment.online import RolloutBatch
from rewards.comparisons import load_comparisons
from rewards.generative import GenRMFormat, encode_judge_prompt, verdict_reward
from trainers.grpo import GRPOTrainer
from trainers.sft import SFTOptions, SFTTrainer

log = logging.getLogger("alignment")


@dataclass
class ThinkRMOptions:
    # None: as saved with model.path (genrm.json), else binary / prefilled / the default criteria
    verdict: Literal["binary", "multiclass"] | None = None
    think_prefill: bool | None = None  # open the reply with "<think>\n"
    criteria: str = ""  # the judging criteria ("": the six HelpSteer2-style criteria)


@dataclass
class ThinkRMSFTConfig(BaseConfig):
    trainer: str = "think_rm_sft"
    think_rm: ThinkRMOptions = field(default_factory=ThinkRMOptions)
    sft: SFTOptions = field(default_factory=SFTOptions)


@dataclass
class ThinkRMRLConfig(BaseConfig):
    trainer: str = "think_rm_rl"
    think_rm: ThinkRMOptions = field(default_factory=ThinkRMOptions)
    algo: AlgoConfig = field(default_factory=lambda: AlgoConfig(advantage="grpo", policy_loss="ppo", kl_coef=1e-3))


def genrm_format(cfg: ThinkRMSFTConfig | ThinkRMRLConfig) -> GenRMFormat:
    o = cfg.think_rm
    return GenRMFormat.of_model(resolve_path(cfg.model.path), verdict=o.verdict, think_prefill=o.think_prefill,
                                criteria=o.criteria or None)


class ThinkRMSFTTrainer(SFTTrainer):
    """Stage 1: next-token NLL on the teacher's reasoning and verdict. Rows are encoded once, at load
    time: one longer than `sft.max_length` keeps its whole prompt and loses the middle of its
    reasoning (GenRMFormat.sft_ids), one whose prompt and verdict alone are too long is dropped."""

    config_class = ThinkRMSFTConfig

    @cached_property
    def fmt(self) -> GenRMFormat:  # read by load_data, which the base __init__ calls
        return genrm_format(self.cfg)

    def load_data(self):
        train, held_out = load_comparisons(self.cfg.data, self.fmt.verdict, self.cfg.seed, reasoning=True)
        train, cut, dropped = self._fit(train, "training")
        held_out, *_ = self._fit(held_out, "held-out")
        if not train:
            raise DataError(f"think_rm sft: none of the {dropped} training rows fits sft.max_length="
                            f"{self.cfg.sft.max_length} even without its reasoning")
        # data/truncated_frac: the fraction of training rows that do not reach training whole, their
        # reasoning cut to fit sft.max_length or the row dropped; logged with every step.
        self.truncated_frac = (cut + dropped) / (len(train) + dropped)
        log.info("think_rm sft: %d of %d training rows had their reasoning cut to fit sft.max_length=%d, %d "
                 "dropped (data/truncated_frac %.3f)", cut, len(train) + dropped, self.cfg.sft.max_length,
                 dropped, self.truncated_frac)
        return train, held_out

    def _fit(self, rows, kind: str) -> tuple[list[tuple[list[int], list[int]]], int, int]:
        """(prompt ids, target ids) of the rows that fit sft.max_length, how many were cut, how many dropped."""
        encoded = [self.fmt.sft_ids(self.tokenizer, c, self.cfg.sft.max_length) for c in rows]
        too_long = [c.origin for c, ids in zip(rows, encoded) if ids is None]
        if too_long:
            log.warning("think_rm sft: dropped %d of %d %s rows whose judge prompt and verdict alone exceed "
                        "sft.max_length=%d (raise it or shorten the prompts): %s%s", len(too_long), len(rows), kind,
                        self.cfg.sft.max_length, ", ".join(too_long[:5]), ", ..." if len(too_long) > 5 else "")
        kept = [ids for ids in encoded if ids is not None]
        return [(p, t) for p, t, _ in kept], sum(cut for *_, cut in kept), len(too_long)

    def encode(self, rows):
        return [p for p, _ in rows], [t for _, t in rows]

    def loss(self, rows):
        loss, stats = super().loss(rows)
        return loss, {**stats, "data/truncated_frac": self.truncated_frac}

    def finish(self, out: Path) -> None:
        if self.backend.is_main:
            self.fmt.save(out / "final")


class VerdictReward:
    """The rule-based reward of a sampled judgement against the gold strength (`Example.answer`):
    binary 1 / 0, multiclass 1 / 0.5 / 0 (verdict_reward); logs `genrm/parse_fail_frac`."""

    def __init__(self, fmt: GenRMFormat):
        self.fmt = fmt

    def __call__(self, batch: RolloutBatch) -> torch.Tensor:
        strengths = [self.fmt.strength(t) for t in batch.texts]
        batch.stats["genrm/parse_fail_frac"] = sum(s is None for s in strengths) / max(len(strengths), 1)
        return torch.tensor([verdict_reward(s, e.answer) for s, e in zip(strengths, batch.samples)],
                            dtype=torch.float32, device=batch.mask.device)


class ThinkRMRLTrainer(GRPOTrainer):
    """Stage 2: GRPO (its step) on judge prompts, rewarded by the verdict. Held-out: `eval/accuracy`
    (right side), `eval/reward` and `eval/parse_fail_frac` of greedy verdicts."""

    config_class = ThinkRMRLConfig

    def __init__(self, cfg: ThinkRMRLConfig):
        fmt = genrm_format(cfg)
        # A prompt is the judge's chat messages; its answer the gold strength (> 0: A better).
        train, held_out = load_comparisons(cfg.data, fmt.verdict, cfg.seed, reasoning=False)
        data = tuple([Example(fmt.messages(c.prompt, c.response_a, c.response_b), answer=c.strength) for c in rows]
                     for rows in (train, held_out))
        checks = {"accuracy": lambda e, text: (s := fmt.strength(text)) is not None and (s > 0) == (e.answer > 0),
                  "parse_fail_frac": lambda e, text: fmt.strength(text) is None}
        super().__init__(cfg, data=data, reward=VerdictReward(fmt), eval_checks=checks,
                         encode=lambda messages: encode_judge_prompt(self.tokenizer, messages, fmt.prefill))
        self.fmt = fmt

    def finish(self, out: Path) -> None:
        if self.backend.is_main:
            self.fmt.save(out / "final")
