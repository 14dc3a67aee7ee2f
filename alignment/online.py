"""The toolbox every online trainer's `step()` calls: rollout, log-probs, mini-batch updates, weight
sync, metrics, held-out evaluation. It holds no method: a trainer builds its models and reward in
its own `__init__`, hands the policy to `setup_policy`, and writes its step as the method reads
(trainers/pmd.py):

    batch = self.rollout(step)                             # n samples per prompt on the engine
    batch.rewards = self.reward(batch)                     # one reward per sample
    batch.advantages = self.advantage(batch.rewards.view(-1, n)).reshape(-1)
    stats = self.train_policy(batch, self.objective)       # mini-batch optimizer steps
    stats["sync/logprob_err"] = self.sync_weights()        # push the weights to the engine, verified
    return self.step_metrics(batch, stats, timer)

Overlap (`rollout.max_staleness: k` >= 1, rollout.backend=vllm_server): `rollout(step)` takes the step's
rollouts from the background when they were requested ahead, then requests steps step+1..step+k in a
background thread, so the servers generate them while this step trains and pushes. A step's prompts and
seeds are those of the synchronous run (functions of the step); only the weights may be up to k versions
old, read from the versions on each sample's tokens and logged as `rollout/staleness` (mean) and
`rollout/staleness_max`. The first step of a run (or of a resume: the queue is refilled from there) is
generated synchronously. The old log-probs must then be the engine's (`train.old_logprobs: rollout`:
PMD's regression anchors each update to, and PPO's ratio divides by, the policy that generated the batch).

Data parallelism: the global batch is split into `train.mini_batches` mini-batches first; each rank
takes its share of every mini-batch, so one optimizer step sees the same global mini-batch whatever
the world size, and (sampling being seeded per prompt) N processes reproduce one process.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from alignment.algos import kl_k3, masked_mean
from alignment.backend import Backend
from alignment.config import BaseConfig, ConfigError
from alignment.data import Example, cap_prompt_length, encode_prompt, step_indices
from alignment.logging import setup_console
from alignment.adapters import apply_peft, merged_state_dict
from alignment.logprobs import PolicyModel, pack, reference_logprobs, token_logprobs
from alignment.rollout import Canary, Rollouts, SamplingParams, make_engine
from alignment.trainer import Trainer, held_out_means

log = logging.getLogger("alignment")


@dataclass
class RolloutBatch:
    """One step's rollouts on this rank: one row per sample, packed [prompt | response]."""

    samples: list[Example]  # the prompt example of each sample
    rollouts: Rollouts
    texts: list[str]
    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask, position_ids
    mask: torch.Tensor  # (B, R) response tokens
    rewards: torch.Tensor | None = None  # (B,) one pointwise reward per sample, where the method has one
    advantages: torch.Tensor | None = None  # (B,) or (B, R): what the step's update follows
    old_logp: torch.Tensor | None = None  # (B, R) the generating policy (train.old_logprobs)
    token_logprobs: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, R) under frozen models, by name
    stats: dict[str, float] = field(default_factory=dict)  # logged with the step (e.g. by the reward)
    # (B,) each reward function's value per sample, by name (NaN where a function did not score it)
    reward_parts: dict[str, torch.Tensor] = field(default_factory=dict)
    step: int = -1  # the trainer step that rolled it out (-1: a held-out evaluation's batch)

    def rows(self, rows: slice) -> dict[str, torch.Tensor]:
        return {key: value[rows] for key, value in self.inputs.items()}

    def rollout_logp(self) -> torch.Tensor:
        """(B, R) the engine's log-probs of the tokens it sampled, zero past each response."""
        logp = torch.zeros_like(self.mask)
        for i, lp in enumerate(self.rollouts.logprobs):
            logp[i, : len(lp)] = lp.to(logp.device)
        return logp


# A reward as an online trainer calls it: the batch in, one float per sample out (it may add to batch.stats).
BatchReward = Callable[[RolloutBatch], torch.Tensor]


class TextReward:
    """A reward function of (prompt examples, response texts) -> floats (rewards/), applied to a batch."""

    def __init__(self, fn: Callable[[list[Example], list[str]], list[float]]):
        self.fn = fn

    def __call__(self, batch: RolloutBatch) -> torch.Tensor:
        return torch.tensor(self.fn(batch.samples, batch.texts), dtype=torch.float32, device=batch.mask.device)


def stopped_at_length(rollouts: Rollouts, max_new_tokens: int, eos_token_id: int | None) -> list[bool]:
    """Per sample, whether its response was cut at `max_new_tokens` (the engine's finish reason where it
    gives one, else a full-length response that does not end with EOS)."""
    if len(rollouts.finish_reasons) == len(rollouts.response_ids):
        return [reason == "length" for reason in rollouts.finish_reasons]
    return [len(ids) >= max_new_tokens and (not ids or ids[-1] != eos_token_id) for ids in rollouts.response_ids]


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


class StepTimer:
    """Wall-clock laps of one step, logged as `time/<lap>_s`."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[f"time/{name}_s"] = now - self.last
        self.last = now

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def in_background(fn, *args) -> Future:
    """`fn(*args)` in a daemon thread (a run that fails meanwhile does not wait for it at exit; the engine's
    calls have deadlines), its result or exception in the returned future."""
    future: Future = Future()

    def run():
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as err:  # re-raised where the trainer takes the result
                future.set_exception(err)

    threading.Thread(target=run, name="rollout-ahead", daemon=True).start()
    return future


def require_groups(cfg: BaseConfig, why: str) -> None:
    if cfg.rollout.n < 2:
        raise ConfigError(f"rollout.n: {why} need at least 2 samples per prompt")


class OnlineTrainer(Trainer):
    passes = 1  # optimizer passes over each rollout batch (PPO: ppo.passes)
    reference = None  # the frozen initial policy for KL terms; None with adapters (switched off instead)
    reward: BatchReward | None = None
    # held-out checks of each greedy response, averaged into eval/<name> (e.g. accuracy on checkable answers)
    eval_checks: dict[str, Callable[[Example, str], float]] = {}

    def __init__(self, cfg: BaseConfig):
        super().__init__(cfg)
        t = cfg.train
        if t.batch_size % t.mini_batches:
            raise ConfigError(f"train.batch_size ({t.batch_size}) must be a multiple of "
                              f"train.mini_batches ({t.mini_batches})")
        k = cfg.rollout.max_staleness
        if k and t.old_logprobs != "rollout":
            raise ConfigError(
                f"rollout.max_staleness={k} needs train.old_logprobs=rollout: a batch may come from weights up to {k} "
                f"version{'s' if k > 1 else ''} older than the trainer's, so the policy it was sampled from (PMD's "
                f"anchor, the ratio's old policy) is the engine's, whose log-probs came with it; recompute would "
                f"score it with the trainer's newer weights")
        self.ahead: dict[int, Future] = {}  # rollout.max_staleness: steps requested in the background

    @property
    def updates_per_step(self) -> int:
        return self.cfg.train.mini_batches * self.passes

    def setup_policy(self, lm, encode: Callable[[object], list[int]] | None = None) -> None:
        """Wrap `lm` (the initial policy) for training: PEFT, the training backend, the rollout engine
        with its own copy of the weights, and the canary batch that checks every weight sync.
        `encode(prompt) -> token ids` defaults to the chat template (`data.chat_template`)."""
        cfg = self.cfg
        self.encode = encode or (lambda prompt: encode_prompt(self.tokenizer, prompt, cfg.data.chat_template))
        # data.max_prompt_length: long prompts dropped, cut from the left by self.encode, or an error (before
        # any model is copied)
        self.encode, self.train_set, self.eval_set, cap_line = cap_prompt_length(
            cfg.data, self.encode, self.train_set, getattr(self, "eval_set", []))
        engine_lm = copy.deepcopy(lm) if cfg.rollout.backend == "hf" else None
        lm = apply_peft(lm, cfg.peft, self.total_updates)
        lm.eval()  # no dropout: training and rollout log-probs must describe the same policy
        self.model = lm
        self.policy = PolicyModel(lm, cfg.train.bf16)
        self.mini_batch_rows = cfg.train.batch_size // cfg.train.mini_batches * cfg.rollout.n  # global
        self.backend = Backend(self.policy, cfg.train, self.mini_batch_rows, self.total_updates)
        self.rank, self.world = self.backend.rank, self.backend.world_size
        setup_console(self.backend.is_main)
        if cap_line:
            log.info(cap_line)
        per_mini = cfg.train.batch_size // cfg.train.mini_batches
        if per_mini % self.world or (per_mini // self.world * cfg.rollout.n) % self.backend.accumulation:
            raise ConfigError(
                f"train.batch_size / train.mini_batches = {per_mini} prompts per mini-batch must divide evenly over "
                f"{self.world} processes, and each process's {per_mini // self.world} x rollout.n = "
                f"{per_mini // self.world * cfg.rollout.n} samples over {self.backend.accumulation} "
                f"gradient accumulation steps")
        self.engine = make_engine(cfg.rollout, cfg.model, self.tokenizer, cfg.train.bf16, cfg.seed,
                                  hf_copy=engine_lm.to(self.backend.device) if engine_lm is not None else None,
                                  output_dir=cfg.output_dir)
        # A fixed canary for the weight-sync check: the last 12 tokens of a prompt, the final 4 scored as
        # a response. Every weight moves every position's log-prob, so one short row checks them all;
        # the fp32 forward on each side is then bound by reading the weights (2 x 0.09 s for 135M
        # parameters on 2 cores, against 2 x 0.14 s for the two 24-token rows before issue 19).
        canary = self.encode(self.train_set[0].prompt)[-12:]
        cut = max(1, len(canary) - 4)  # short prompts keep at least one token on each side
        self.canary_batch = ([canary[:cut]], [canary[cut:]])
        log.info("rank %d/%d, backend %s, %d training prompts", self.rank, self.world, self.backend.kind,
                 len(self.train_set))

    def start(self) -> None:
        # the engine may hold older weights than a resumed checkpoint; Trainer.train sets start_step
        self.weights_step = getattr(self, "start_step", 0)
        self.sync_weights()

    # ---- rollout ------------------------------------------------------------------------------
    def sampling(self, step: int) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(n=r.n, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                              seed=self.cfg.seed * 1_000_003 + step)

    def rollout(self, step: int) -> RolloutBatch:
        """This rank's share of every mini-batch of the step's prompts, `rollout.n` samples each, packed
        for training; the engine sleeps afterwards (frees accelerator memory where it can). With
        rollout.max_staleness k >= 1, taken from the background if requested ahead, and steps
        step+1..step+k requested in the background (module doc)."""
        self.weights_step = step + 1  # the weights this step's update makes (their version: step-N)
        ahead = self.cfg.rollout.max_staleness
        if not ahead:
            examples, rollouts = self.generate_step(step)
        else:
            pending = self.ahead.pop(step, None)
            examples, rollouts = pending.result() if pending is not None else self.generate_step(step)
            for later in range(step + 1, min(step + ahead, self.max_steps - 1) + 1):
                if later not in self.ahead:
                    self.ahead[later] = in_background(self.generate_step, later)
        self.engine.sleep()
        batch = self.make_batch([examples[i] for i in rollouts.prompt_index], rollouts)
        batch.step = step
        if rollouts.weight_versions and hasattr(self.engine, "staleness"):  # vllm_server: versions on the tokens
            ages = self.engine.staleness(rollouts.weight_versions)
            batch.stats["rollout/staleness"] = sum(ages) / len(ages)
            batch.stats["rollout/staleness_max"] = float(max(ages))
        return batch

    def generate_step(self, step: int) -> tuple[list[Example], Rollouts]:
        """The step's prompts for this rank (a function of the step: the same in the synchronous and the
        overlapped run) and their rollouts; runs in a background thread under rollout.max_staleness."""
        cfg = self.cfg
        k = cfg.train.mini_batches
        order = step_indices(step, cfg.train.batch_size, len(self.train_set), cfg.seed)
        per_mini = cfg.train.batch_size // k
        # Global positions of this rank's prompts, mini-batch by mini-batch.
        positions = [p for j in range(k) for p in range(j * per_mini, (j + 1) * per_mini)[self.rank::self.world]]
        examples = [self.train_set[order[p]] for p in positions]
        rollouts = self.engine.generate([self.encode(e.prompt) for e in examples], self.sampling(step),
                                        prompt_uids=positions)
        return examples, rollouts

    def make_batch(self, samples: list[Example], rollouts: Rollouts) -> RolloutBatch:
        texts = self.tokenizer.batch_decode(rollouts.response_ids, skip_special_tokens=True)
        inputs = pack(rollouts.prompt_ids, rollouts.response_ids, self.tokenizer.pad_token_id, self.backend.device)
        return RolloutBatch(samples, rollouts, texts, inputs, inputs.pop("response_mask").float())

    # ---- log-probs ------------------------------------------------------------------------------
    def micro_slices(self, rows: int) -> list[list[slice]]:
        """Per mini-batch, the row slices of its gradient-accumulation micro-batches."""
        per_mini = rows // self.cfg.train.mini_batches
        micro = per_mini // self.backend.accumulation
        return [[slice(start, start + micro) for start in range(j * per_mini, (j + 1) * per_mini, micro)]
                for j in range(self.cfg.train.mini_batches)]

    @torch.no_grad()
    def chunked(self, batch: RolloutBatch, forward, start: int = 0) -> torch.Tensor:
        """`forward(rows)` over rows `start:` in micro-batch-sized chunks, concatenated, without grad."""
        size = self.micro_slices(len(batch.mask))[0][0].stop
        return torch.cat([forward(slice(i, i + size)) for i in range(start, len(batch.mask), size)])

    def policy_logprobs(self, batch: RolloutBatch, start: int = 0) -> torch.Tensor:
        r_len = batch.mask.shape[1]
        return self.chunked(batch, lambda rows: self.backend(**batch.rows(rows), response_len=r_len)[0], start)

    def reference_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """(B, R) under the initial policy: `self.reference`, or with adapters the policy without them."""
        r_len = batch.mask.shape[1]
        return self.chunked(batch, lambda rows: reference_logprobs(self.reference, self.model, batch.rows(rows), r_len,
                                                                   self.cfg.train.bf16))

    # ---- updates --------------------------------------------------------------------------------
    def optimize(self, backend: Backend, rows: int, loss_fn) -> dict[str, float]:
        """`self.passes` x `train.mini_batches` optimizer steps of `backend` over a batch of `rows`;
        `loss_fn(rows, on_policy) -> (loss, stats)` on each micro-batch, `on_policy` while the
        weights are still those that generated the batch (the first mini-batch of the first pass).
        Returns the mean of each stat, with `loss` and `grad_norm`."""
        stats: dict[str, list[float]] = {}
        for pass_index in range(self.passes):
            for j, micro in enumerate(self.micro_slices(rows)):
                for part in micro:
                    loss, loss_stats = loss_fn(part, pass_index == 0 and j == 0)
                    backend.backward(loss)
                    for key, value in {"loss": float(loss.detach()), **loss_stats}.items():
                        stats.setdefault(key, []).append(float(value))
                stats.setdefault("grad_norm", []).append(backend.step())
        return {key: sum(v) / len(v) for key, v in stats.items()}

    def train_policy(self, batch: RolloutBatch, objective, old_logp: torch.Tensor | None = None,
                     ref_logp: torch.Tensor | None = None) -> dict[str, float]:
        """Minimise `objective(logp, old_logp, advantages, mask, ref_logp)` (alignment/algos.py) over
        the batch, on `batch.advantages`; logs `kl` (to the reference with a KL loss, else the drift from the rollout policy)
        and `entropy`. Without `old_logp`, the generating policy's log-probs come from the training
        precision: the first mini-batch is still on-policy when it is trained, so its own forward
        provides them; the rest get one no-grad pass first."""
        r_len, advantages = batch.mask.shape[1], batch.advantages.to(batch.mask.device)
        if old_logp is None and self.cfg.train.old_logprobs == "rollout":
            old_logp = batch.rollout_logp()
        fill_first = old_logp is None
        if fill_first:
            old_logp = torch.zeros_like(batch.mask)
            first = self.micro_slices(len(batch.mask))[0][-1].stop
            if first < len(old_logp):
                old_logp[first:] = self.policy_logprobs(batch, first)
        batch.old_logp = old_logp

        def loss_fn(rows, on_policy):
            logp, entropy = self.backend(**batch.rows(rows), response_len=r_len, with_entropy=True)
            if fill_first and on_policy:
                old_logp[rows] = logp.detach()
            mask = batch.mask[rows]
            loss, stats = objective(logp, old_logp[rows], advantages[rows], mask,
                                    None if ref_logp is None else ref_logp[rows])
            stats.setdefault("kl", float(masked_mean(kl_k3(old_logp[rows], logp.detach()), mask)))
            return loss, {"entropy": float(masked_mean(entropy, mask)), **stats}

        return self.optimize(self.backend, len(batch.mask), loss_fn)

    # ---- weight sync --------------------------------------------------------------------------
    @torch.no_grad()
    def sync_weights(self) -> float:
        """Push merged weights into the engine, then check canary log-probs against the trainer's;
        returns the largest difference (`sync/logprob_err`), and fails beyond `rollout.sync_tolerance`."""
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
        return self.engine.update_weights(weights, canary, self.cfg.rollout.sync_tolerance,
                                          version=f"step-{getattr(self, 'weights_step', 0)}")

    # ---- metrics --------------------------------------------------------------------------------
    def step_metrics(self, batch: RolloutBatch, stats: dict, timer: StepTimer) -> dict[str, float]:
        """The step's stats with the shared online metrics, averaged over ranks."""
        rollout_logp = batch.rollout_logp()
        metrics = {**batch.stats, **stats, **timer.laps, "lr": self.backend.lr,
                   "response_length/mean": float(batch.mask.sum(-1).mean()),
                   "rollout/logprob_diff": float(masked_mean((rollout_logp - batch.old_logp).abs(), batch.mask)),
                   "perf/tokens_per_s": float(batch.inputs["attention_mask"].sum()) * self.world / timer.elapsed}
        if batch.rewards is not None:
            metrics["reward/mean"] = float(batch.rewards.mean())
            metrics["reward/std"] = float(batch.rewards.std()) if batch.rewards.numel() > 1 else 0.0
        clipped = stopped_at_length(batch.rollouts, self.cfg.rollout.max_new_tokens, self.tokenizer.eos_token_id)
        metrics["response_length/clipped_frac"] = sum(clipped) / max(len(clipped), 1)
        if self.cfg.rollout.kv_compression.type != "none":
            metrics["gear/kv_bytes"] = float(batch.rollouts.kv_bytes)
        every = self.cfg.train.log_samples_every
        if every and batch.step >= 0 and (batch.step + 1) % every == 0:
            self.gather_samples("samples", self.sample_rows(batch))
        return self.backend.mean(metrics)

    # ---- samples (samples.jsonl, eval_samples.jsonl, the trackers' tables) ----------------------
    def sample_rows(self, batch: RolloutBatch, checks: dict[str, list[float]] | None = None) -> list[dict]:
        """One dict per sample of this rank's batch: prompt, response, reward and each reward function's
        value (`reward/<name>`, null where it did not score the sample), the advantage (the mean over the
        response's tokens where it is per token), response tokens and finish reason; `checks` add
        per-sample held-out checks."""
        def number(values: torch.Tensor, i: int) -> float | None:
            value = float(values[i])
            return value if math.isfinite(value) else None

        advantages = batch.advantages
        if advantages is not None and advantages.dim() == 2:
            advantages = (advantages.float() * batch.mask).sum(-1) / batch.mask.sum(-1).clamp(min=1)
        clipped = stopped_at_length(batch.rollouts, self.cfg.rollout.max_new_tokens, self.tokenizer.eos_token_id)
        rows = []
        for i, (example, text) in enumerate(zip(batch.samples, batch.texts)):
            row = {"prompt": example.prompt, "response": text}
            if example.answer is not None:
                row["answer"] = _jsonable(example.answer)
            if batch.rewards is not None:
                row["reward"] = number(batch.rewards, i)
            row.update({f"reward/{name}": number(values, i) for name, values in batch.reward_parts.items()})
            if advantages is not None:
                row["advantage"] = number(advantages, i)
            row.update({name: values[i] for name, values in (checks or {}).items()})
            row["response_tokens"] = len(batch.rollouts.response_ids[i])
            row["finish_reason"] = "length" if clipped[i] else "stop"
            rows.append(row)
        return rows

    def gather_samples(self, name: str, rows: list[dict]) -> None:
        """Every rank's rows (each holds its share of the prompts), gathered in rank order to the main
        rank, which writes them all (every rank calls)."""
        everyone = self.backend.gather(rows)
        if self.backend.is_main:
            self.add_samples(name, [row for part in everyone for row in part])

    # ---- held-out evaluation ------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy responses to this rank's share of the held-out prompts: `eval/reward` (where there
        is a pointwise reward) and `eval/<check>` for each of `eval_checks`, averaged over all ranks."""
        if not self.eval_set:
            return {}
        shard = self.eval_set[self.rank::self.world]
        sums = {"count": float(len(shard)), **{name: 0.0 for name in self.eval_checks}}
        if self.reward is not None:
            sums["reward"] = 0.0
        rows = []
        if shard:
            sampling = SamplingParams(n=1, max_new_tokens=self.cfg.rollout.max_new_tokens, temperature=0.0)
            batch = self.make_batch(shard, self.engine.generate([self.encode(e.prompt) for e in shard], sampling))
            if self.reward is not None:
                batch.rewards = self.reward(batch)
                sums["reward"] = float(batch.rewards.sum())
            checks = {name: [float(check(e, t)) for e, t in zip(shard, batch.texts)]
                      for name, check in self.eval_checks.items()}
            sums.update({name: sum(values) for name, values in checks.items()})
            rows = self.sample_rows(batch, checks)
        self.gather_samples("eval_samples", rows)  # every evaluation's greedy responses
        return held_out_means(self.backend, sums)
