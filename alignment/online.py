"""The online RL loop every online trainer shares, and the registries its methods plug into.

One step: draw the global prompt batch -> roll out `n` samples per prompt on the engine -> reward ->
advantage (registered estimator) -> old log-probs recomputed in the training precision -> several
mini-batch updates with a registered policy loss -> push the weights to the engine and verify them
-> metrics. A method registers its advantage estimator and policy loss and subclasses
`OnlineTrainer` with its config (see trainers/pmd.py).

Data parallelism: the global batch is split into `train.mini_batches` mini-batches first; each rank
takes its share of every mini-batch, so one optimizer step sees the same global mini-batch whatever
the world size, and (sampling being seeded per prompt) N processes reproduce one process.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from alignment.backend import Backend
from alignment.config import BaseConfig, ConfigError
from alignment.data import Example, encode_prompt, load_prompts, step_indices
from alignment.logging import setup_console
from alignment.models import (
    PolicyModel, apply_peft, load_causal_lm, load_tokenizer, merged_state_dict, pack, token_logprobs,
)
from alignment.rollout import Canary, Rollouts, SamplingParams, make_engine
from alignment.trainer import Trainer
from rewards import build_reward
from rewards.verifiable import is_correct

log = logging.getLogger("alignment")

# name -> fn(rewards (prompts, n), **params) -> advantages (prompts, n)
ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {}
# name -> fn(logp, old_logp, advantages, mask, **params) -> (loss, stats)
POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict]]] = {}


def register_advantage(name: str):
    def deco(fn):
        ADVANTAGES[name] = fn
        return fn
    return deco


def register_policy_loss(name: str):
    def deco(fn):
        POLICY_LOSSES[name] = fn
        return fn
    return deco


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def kl_k3(old_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi_old || pi) on tokens sampled from pi_old: (r - 1) - log r >= 0, r = pi / pi_old."""
    log_ratio = logp - old_logp
    return log_ratio.exp() - 1 - log_ratio


@dataclass
class RolloutBatch:
    """One step's rollouts on this rank: one row per sample, packed [prompt | response]."""

    samples: list[Example]  # the prompt example of each sample
    rollouts: Rollouts
    texts: list[str]
    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask, position_ids
    mask: torch.Tensor  # (B, R) response tokens
    rewards: torch.Tensor | None = None  # (B,)
    old_logp: torch.Tensor | None = None  # (B, R) the generating policy, training precision
    token_logprobs: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, R) under frozen models, by name
    stats: dict[str, float] = field(default_factory=dict)  # logged with the step (e.g. by the reward)

    def rows(self, rows: slice) -> dict[str, torch.Tensor]:
        return {key: value[rows] for key, value in self.inputs.items()}


class OnlineTrainer(Trainer):

    def __init__(self, cfg: BaseConfig):
        self.cfg = cfg
        self.check_config()
        torch.manual_seed(cfg.seed)
        self.tokenizer = load_tokenizer(cfg.model)
        self.train_set, self.eval_set = self.load_data()
        self.reward_fn = self.build_reward()
        lm = self.load_policy()
        engine_lm = copy.deepcopy(lm) if cfg.rollout.backend == "hf" else None
        lm = apply_peft(lm, cfg.peft, self.total_updates)
        lm.eval()  # no dropout: training and rollout log-probs must describe the same policy
        self.model = lm
        self.policy = PolicyModel(lm, cfg.train.bf16)
        self.mini_batch_rows = cfg.train.batch_size // cfg.train.mini_batches * cfg.rollout.n  # global
        self.backend = Backend(self.policy, cfg.train, self.mini_batch_rows)
        self.rank, self.world = self.backend.rank, self.backend.world_size
        setup_console(self.backend.is_main)
        per_mini = cfg.train.batch_size // cfg.train.mini_batches
        if per_mini % self.world or (per_mini // self.world * cfg.rollout.n) % self.backend.accumulation:
            raise ConfigError(
                f"train.batch_size / train.mini_batches = {per_mini} prompts per mini-batch must divide evenly over "
                f"{self.world} processes, and each process's {per_mini // self.world} x rollout.n = "
                f"{per_mini // self.world * cfg.rollout.n} samples over {self.backend.accumulation} "
                f"gradient accumulation steps")
        self.engine = make_engine(cfg.rollout, cfg.model, self.tokenizer, cfg.train.bf16, cfg.seed,
                                  hf_copy=engine_lm.to(self.backend.device) if engine_lm is not None else None)
        # A fixed canary batch for the weight-sync check: the tail of two prompts, scored as responses
        # to their first tokens (short, so the fp32 check costs little).
        canary = [self.encode(self.train_set[i].prompt)[-24:] for i in range(min(2, len(self.train_set)))]
        self.canary_batch = ([c[:16] for c in canary], [c[16:] for c in canary])
        log.info("rank %d/%d, backend %s, %d training prompts", self.rank, self.world, self.backend.kind,
                 len(self.train_set))

    # ---- what a method defines -------------------------------------------------------------
    advantage: str = ""
    policy_loss: str = ""
    epochs = 1  # passes over each rollout batch

    def load_data(self) -> tuple[list[Example], list[Example]]:
        """(train, held-out) prompts; each with its answer when the verifiable reward scores them."""
        needs_answers = self.cfg.reward.type == "verifiable" and self.scores_with_reward
        return load_prompts(self.cfg.data, self.cfg.seed, "reward.type=verifiable" if needs_answers else None)

    @property
    def scores_with_reward(self) -> bool:
        """Whether samples are scored by the configured reward: a method that overrides `score`
        (SR-PPO's log-ratio, routed RL's router) checks what its own scoring needs."""
        return type(self).score is OnlineTrainer.score

    def build_reward(self):
        """What `score` uses: the configured reward function (routed RL's is a pair router)."""
        return build_reward(self.cfg.reward)

    def load_policy(self):
        """The initial policy (a transformers causal LM, before PEFT)."""
        return load_causal_lm(self.cfg.model)

    @property
    def updates_per_step(self) -> int:
        return self.cfg.train.mini_batches * self.epochs

    def check_config(self) -> None:
        super().check_config()
        t = self.cfg.train
        if t.batch_size < 1 or t.mini_batches < 1 or t.batch_size % t.mini_batches:
            raise ConfigError(f"train.batch_size ({t.batch_size}) must be a positive multiple of "
                              f"train.mini_batches ({t.mini_batches})")

    def advantage_params(self) -> dict:
        return {}

    def loss_params(self) -> dict:
        return {}

    def loss_inputs(self, batch: RolloutBatch, rows: slice) -> dict[str, torch.Tensor]:
        """Per-row tensors the policy loss takes besides the shared ones (GRPO's reference log-probs)."""
        return {}

    # ---- helpers -----------------------------------------------------------------------------
    def encode(self, prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.cfg.data.chat_template)

    def sampling(self, step: int) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(n=r.n, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                              seed=self.cfg.seed * 1_000_003 + step)

    def start(self) -> None:
        self.sync_weights()  # the engine may hold older weights than a resumed checkpoint

    @torch.no_grad()
    def sync_weights(self) -> float:
        """Push merged weights into the engine, then check canary log-probs against the trainer."""
        with self.backend.gathered():
            weights = merged_state_dict(self.model)
            if self.backend.partitioned:  # ZeRO-3 frees the gathered values when the context ends
                weights = {name: t.detach().clone() for name, t in weights.items()}
        prompts, responses = self.canary_batch
        batch = pack(prompts, responses, self.tokenizer.pad_token_id, self.backend.device)
        r_len = batch["response_mask"].shape[1]
        lp, _ = token_logprobs(self.model, batch["input_ids"], batch["attention_mask"],
                               batch["position_ids"], r_len, bf16=False)
        canary = Canary(prompts, responses, [lp[i, : len(r)] for i, r in enumerate(responses)])
        return self.engine.update_weights(weights, canary, self.cfg.rollout.sync_tolerance)

    # ---- the step, in pieces a method can recombine (trainers/ppo.py) ------------------------
    def rollout(self, step: int) -> RolloutBatch:
        """This rank's share of every mini-batch, rolled out, scored and packed."""
        cfg = self.cfg
        k = cfg.train.mini_batches
        order = step_indices(step, cfg.train.batch_size, len(self.train_set), cfg.seed)
        per_mini = cfg.train.batch_size // k
        # Global positions of this rank's prompts, mini-batch by mini-batch.
        positions = [p for j in range(k) for p in range(j * per_mini, (j + 1) * per_mini)[self.rank::self.world]]
        examples = [self.train_set[order[p]] for p in positions]
        rollouts = self.engine.generate([self.encode(e.prompt) for e in examples], self.sampling(step),
                                        prompt_uids=positions)
        self.engine.sleep()  # frees accelerator memory for training where the backend can
        return self.make_batch([examples[i] for i in rollouts.prompt_index], rollouts)

    def make_batch(self, samples: list[Example], rollouts: Rollouts) -> RolloutBatch:
        texts = self.tokenizer.batch_decode(rollouts.response_ids, skip_special_tokens=True)
        inputs = pack(rollouts.prompt_ids, rollouts.response_ids, self.tokenizer.pad_token_id, self.backend.device)
        batch = RolloutBatch(samples, rollouts, texts, inputs, inputs.pop("response_mask").float())
        batch.rewards = self.score(batch)
        return batch

    def score(self, batch: RolloutBatch) -> torch.Tensor:
        """One reward per sample: the configured reward function (SR-PPO's is computed from models)."""
        return torch.tensor(self.reward_fn(batch.samples, batch.texts), dtype=torch.float32, device=self.backend.device)

    def micro_slices(self, rows: int) -> list[list[slice]]:
        """Per mini-batch, the row slices of its gradient-accumulation micro-batches."""
        per_mini = rows // self.cfg.train.mini_batches
        micro = per_mini // self.backend.accumulation
        return [[slice(start, start + micro) for start in range(j * per_mini, (j + 1) * per_mini, micro)]
                for j in range(self.cfg.train.mini_batches)]

    def train_policy(self, batch: RolloutBatch, old_logp: torch.Tensor | None, loss_fn) -> dict:
        """`self.epochs` passes over the mini-batches, one optimizer step each; `loss_fn(rows, logp,
        entropy) -> (loss, stats)` on a micro-batch. Without `old_logp`, the log-probs of the policy
        that generated the batch come from the training precision: the first mini-batch is still
        on-policy when it is trained, so its own forward provides them; the rest get one no-grad pass."""
        r_len = batch.mask.shape[1]
        slices = self.micro_slices(batch.mask.shape[0])
        fill_first = old_logp is None
        if fill_first:
            old_logp = torch.zeros_like(batch.mask)
            first = slices[0][-1].stop
            if first < len(old_logp):
                old_logp[first:] = self.policy_logprobs(batch, first)
        batch.old_logp = old_logp
        stats: dict[str, list[float]] = {}
        for epoch in range(self.epochs):
            for j, micro in enumerate(slices):
                for rows in micro:
                    logp, entropy = self.backend(**batch.rows(rows), response_len=r_len, with_entropy=True)
                    if fill_first and epoch == 0 and j == 0:
                        old_logp[rows] = logp.detach()
                    loss, loss_stats = loss_fn(rows, logp, entropy)
                    self.backend.backward(loss)
                    for key, value in {"loss": float(loss.detach()), **loss_stats}.items():
                        stats.setdefault(key, []).append(float(value))
                stats.setdefault("grad_norm", []).append(self.backend.step())
        return {key: sum(v) / len(v) for key, v in stats.items()}

    @torch.no_grad()
    def chunked(self, batch: RolloutBatch, forward, start: int = 0) -> torch.Tensor:
        """`forward(rows)` over rows `start:` in micro-batch-sized chunks, concatenated, without grad."""
        size = self.micro_slices(len(batch.mask))[0][0].stop
        return torch.cat([forward(slice(i, i + size)) for i in range(start, len(batch.mask), size)])

    def policy_logprobs(self, batch: RolloutBatch, start: int = 0) -> torch.Tensor:
        r_len = batch.mask.shape[1]
        return self.chunked(batch, lambda rows: self.backend(**batch.rows(rows), response_len=r_len)[0], start)

    def step_metrics(self, batch: RolloutBatch, stats: dict, t_start: float, t_rollout: float) -> dict[str, float]:
        """Push the new weights to the engine (verified), then the shared metrics of an online step."""
        t_train = time.perf_counter() - t_start - t_rollout
        rollout_logp = torch.zeros_like(batch.mask)
        for i, lp in enumerate(batch.rollouts.logprobs):
            rollout_logp[i, : len(lp)] = lp.to(rollout_logp.device)
        t_sync = time.perf_counter()
        sync_err = self.sync_weights()
        t_sync = time.perf_counter() - t_sync
        elapsed = time.perf_counter() - t_start
        rewards, mask = batch.rewards, batch.mask
        metrics = {**batch.stats, **stats}
        metrics.update({
            "lr": self.backend.lr,
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "response_length/mean": float(mask.sum(-1).mean()),
            "rollout/logprob_diff": float(masked_mean((rollout_logp - batch.old_logp).abs(), mask)),
            "sync/logprob_err": sync_err,
            "time/rollout_s": t_rollout,
            "time/train_s": t_train,
            "time/sync_s": t_sync,
            "perf/tokens_per_s": float(batch.inputs["attention_mask"].sum()) * self.world / elapsed,
        })
        if self.cfg.rollout.kv_compression.type != "none":
            metrics["gear/kv_bytes"] = float(batch.rollouts.kv_bytes)
        return self.backend.mean(metrics)

    def step(self, step: int) -> dict[str, float]:
        """Roll out -> sequence advantages (registered estimator) -> registered policy loss."""
        t_start = time.perf_counter()
        batch = self.rollout(step)
        advantages = self.advantages(batch)
        return self.policy_update(batch, advantages, t_start, time.perf_counter() - t_start)

    def advantages(self, batch: RolloutBatch) -> torch.Tensor:
        """One advantage per sample: the registered estimator over each prompt's group of rewards."""
        n = self.cfg.rollout.n
        return ADVANTAGES[self.advantage](batch.rewards.view(-1, n), **self.advantage_params()).reshape(-1)

    def policy_update(self, batch: RolloutBatch, advantages: torch.Tensor, t_start: float,
                      t_rollout: float) -> dict[str, float]:
        """The registered policy loss over the batch with one advantage row per sample, then the
        weight sync and the step's metrics."""

        def loss_fn(rows, logp, entropy):
            old, mask = batch.old_logp[rows], batch.mask[rows]
            loss, stats = POLICY_LOSSES[self.policy_loss](logp, old, advantages[rows], mask, **self.loss_params(),
                                                          **self.loss_inputs(batch, rows))
            return loss, {"kl": float(masked_mean(kl_k3(old, logp.detach()), mask)),
                          "entropy": float(masked_mean(entropy, mask)), **stats}

        stats = self.train_policy(batch, None, loss_fn)
        return self.step_metrics(batch, stats, t_start, t_rollout)

    def greedy_eval_rollouts(self) -> tuple[list[Example], Rollouts]:
        """This rank's share of the held-out prompts and their greedy rollouts."""
        shard = self.eval_set[self.rank::self.world]
        sampling = SamplingParams(n=1, max_new_tokens=self.cfg.rollout.max_new_tokens, temperature=0.0)
        return shard, self.engine.generate([self.encode(e.prompt) for e in shard], sampling)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy reward (and accuracy, where answers are checkable) on the held-out prompts."""
        if not self.eval_set:
            return {}
        shard, rollouts = self.greedy_eval_rollouts()
        batch = self.make_batch(shard, rollouts) if shard else None
        texts = batch.texts if shard else []
        sums = {"count": len(shard), "reward": float(batch.rewards.sum()) if shard else 0.0}
        checkable = all(e.entry is not None or e.answer is not None for e in self.eval_set)
        if checkable:
            sums["correct"] = sum(is_correct(e, t) for e, t in zip(shard, texts))
        totals = self.backend.mean(sums)
        count = max(totals["count"], 1)
        out = {"eval/reward": totals["reward"] / count}
        if checkable:
            out["eval/accuracy"] = totals["correct"] / count
        return out
