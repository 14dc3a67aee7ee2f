"""The loop of trainers that learn from a fixed dataset (SFT, reward models, DPO).

One step = one optimizer step on `train.batch_size` rows (global): the rows are a function of
(seed, step) (a fresh permutation each epoch), each rank takes its share, so resume is exact and N
processes see what one process sees. `train.epochs > 0` sets the number of steps from the data size.
A method defines `load_data`, `build_model`, `loss(rows) -> (loss, stats)` and
`eval_sums(rows) -> {name: sum, "count": n}`; held-out metrics are the sums over all ranks divided
by the count.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from alignment.algos import PREFERENCE_LOSSES, r3m_delta
from alignment.backend import Backend
from alignment.config import BaseConfig, ConfigError
from alignment.data import Pair, cap_prompt_length, encode_prompt, load_pairs, step_indices
from alignment.logging import setup_console
from alignment.models import load_tokenizer
from alignment.trainer import Trainer, held_out_means

log = logging.getLogger("alignment")


class OfflineTrainer(Trainer):
    eval_batch_size = 16
    dropout = True  # train mode during steps (DPO keeps eval mode: TRL's disable_dropout)
    # data.max_prompt_length applies (sft, dpo: their encode_conversations cuts prompts from the left);
    # reward and preference models cut prompt + responses at their own max_length instead
    caps_prompts = False

    def __init__(self, cfg: BaseConfig):
        super().__init__(cfg)
        self.check_config()
        self.tokenizer = load_tokenizer(cfg.model)
        self.train_set, self.eval_set = self.load_data()
        cap_line = self.cap_prompts()
        self.model = self.build_model()
        self.backend = Backend(self.module, cfg.train, cfg.train.batch_size, self.total_updates)
        self.rank, self.world = self.backend.rank, self.backend.world_size
        setup_console(self.backend.is_main)
        if cfg.train.batch_size % (self.world * self.backend.accumulation):
            raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must divide evenly over {self.world} "
                              f"processes x {self.backend.accumulation} gradient accumulation steps")
        if cap_line:
            log.info(cap_line)
        log.info("rank %d/%d, backend %s, %d training rows, %d held out, %d steps", self.rank, self.world,
                 self.backend.kind, len(self.train_set), len(self.eval_set), self.max_steps)

    def cap_prompts(self) -> str | None:
        """data.max_prompt_length: long prompts counted, then dropped or refused at load (cut from the left
        when encoded, for truncate_left); returns the line to log."""
        data = self.cfg.data
        if data.max_prompt_length is None:
            return None
        if not self.caps_prompts:
            raise ConfigError(f"data.max_prompt_length: trainer {self.cfg.trainer} cuts prompt and responses together "
                              "at its own max_length; the prompt cap applies to the online trainers, sft and dpo")
        _, self.train_set, self.eval_set, line = cap_prompt_length(
            data, lambda prompt: encode_prompt(self.tokenizer, prompt, data.chat_template), self.train_set, self.eval_set)
        return line

    # ---- what a method defines -------------------------------------------------------------
    module: torch.nn.Module  # what the backend wraps (its forward is the training computation)

    def check_config(self) -> None:
        """Rejects unusable values of the method's section before anything is loaded."""

    def load_data(self) -> tuple[list, list]:
        raise NotImplementedError

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def loss(self, rows: list) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def eval_sums(self, rows: list) -> dict[str, float]:
        raise NotImplementedError

    # ---- the loop ------------------------------------------------------------------------------
    @property
    def max_steps(self) -> int:
        t = self.cfg.train
        if t.epochs > 0:
            return max(1, math.ceil(t.epochs * len(self.train_set) / t.batch_size))
        return t.max_steps

    def rows_of(self, step: int) -> list:
        order = step_indices(step, self.cfg.train.batch_size, len(self.train_set), self.cfg.seed)
        return [self.train_set[i] for i in order[self.rank::self.world]]

    def step(self, step: int) -> dict[str, float]:
        t_start = time.perf_counter()
        self.module.train(self.dropout)
        rows = self.rows_of(step)
        micro = len(rows) // self.backend.accumulation
        stats: dict[str, list[float]] = {}
        for start in range(0, len(rows), micro):
            loss, micro_stats = self.loss(rows[start:start + micro])
            self.backend.backward(loss)
            for key, value in {"loss": float(loss.detach()), **micro_stats}.items():
                stats.setdefault(key, []).append(float(value))
        grad_norm = self.backend.step()
        elapsed = time.perf_counter() - t_start
        metrics = {key: sum(v) if key == "tokens" else sum(v) / len(v) for key, v in stats.items()}
        metrics.update({"grad_norm": grad_norm, "lr": self.backend.lr, "time/train_s": elapsed})
        if "tokens" in stats:
            metrics["perf/tokens_per_s"] = metrics.pop("tokens") * self.world / elapsed
        return self.backend.mean(metrics)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.eval_set:
            return {}
        self.module.eval()
        shard = self.eval_set[self.rank::self.world]
        sums: dict[str, float] = {"count": 0.0}
        for start in range(0, len(shard), self.eval_batch_size):
            for key, value in self.eval_sums(shard[start:start + self.eval_batch_size]).items():
                sums[key] = sums.get(key, 0.0) + float(value)
        return held_out_means(self.backend, {k: sums.get(k, 0.0) for k in ("count", *self.eval_keys)})

    eval_keys: tuple[str, ...] = ()  # the sums eval_sums returns besides "count"


class PairwiseTrainer(OfflineTrainer):
    """Preference pairs -> margins -> a preference loss by name (`bt`/`sigmoid`, `r3m`; alignment/algos.py).

    A method defines `margins(pairs)`: how much the model prefers each labelled-chosen response
    (reward difference for a reward model, beta-scaled log-ratio difference for DPO). R^3M runs
    log `r3m/outlier_frac` and, at the end, write outliers.jsonl from the final model.
    """

    eval_keys = ("accuracy", "loss")
    section = ""  # the method's config section, with `loss` and `lam` (R^3M's lambda)

    def check_config(self) -> None:
        opts = getattr(self.cfg, self.section)
        if opts.loss == "r3m" and not 0 < opts.lam < 1:
            raise ConfigError(f"{self.section}.lam: R^3M's lambda must lie in (0, 1), got {opts.lam}")

    def load_data(self):
        return load_pairs(self.cfg.data, self.cfg.seed)

    def margins(self, pairs: list[Pair]) -> tuple[torch.Tensor, int]:
        """(margin per comparison, tokens processed): one per pair, or two with both orders shown."""
        raise NotImplementedError

    @property
    def options(self):
        return getattr(self.cfg, self.section)

    def preference_loss(self, margins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return PREFERENCE_LOSSES.get(self.options.loss, self.options, f"{self.section}.loss")(margins)

    def loss(self, pairs):
        margins, tokens = self.margins(pairs)
        loss, delta = self.preference_loss(margins)
        stats = {"accuracy": float((margins.detach() > 0).float().mean()), "margin": float(margins.detach().mean()),
                 "tokens": tokens}
        if self.options.loss == "r3m":
            stats["r3m/outlier_frac"] = float((delta > 0).float().mean())
        return loss, stats

    def eval_sums(self, pairs):
        # Per comparison: a pair shown in both orders counts twice, in the count as in the sums.
        margins, _ = self.margins(pairs)
        loss, _ = self.preference_loss(margins)
        return {"count": len(margins), "accuracy": float((margins > 0).sum()), "loss": float(loss) * len(margins)}

    @torch.no_grad()
    def finish(self, out: Path) -> None:
        """R^3M: one line per training pair with its outlier variable under the final model."""
        if self.options.loss != "r3m":
            return
        self.module.eval()
        mine = self.train_set[self.rank::self.world]
        rows = []
        for start in range(0, len(mine), self.eval_batch_size):
            batch = mine[start:start + self.eval_batch_size]
            delta = r3m_delta(self.margins(batch)[0], self.options.lam)
            rows += [{"index": p.index, "delta": float(d), "flagged": bool(d > 0)} for p, d in zip(batch, delta)]
        everyone = self.backend.gather(rows)
        if self.backend.is_main:
            rows = sorted((r for part in everyone for r in part), key=lambda r: r["index"])
            (out / "outliers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            log.info("R^3M flagged %d of %d training pairs (outliers.jsonl)", sum(r["flagged"] for r in rows),
                     len(rows))
