"""The rollout engine: one interface for every online trainer, backends `hf`, `vllm` and `vllm_server`.

- `generate(prompts, sampling, prompt_uids)` returns token ids of prompt and response, per-token
  log-probs of the sampled tokens (under the raw model distribution, temperature 1, as training
  computes them) and the finish reason, `sampling.n` samples per prompt.
- `update_weights(named_tensors, canary)` pushes full weights into the engine and verifies them:
  engine and trainer log-probs on a fixed canary batch must agree within a tolerance, or
  `WeightSyncError` is raised. It returns the error (`sync/logprob_err`).
- `sleep()` / `wake()` free and restore memory between phases where a backend supports it.

Sampling is seeded per sample from (seed, prompt uid, sample index), so a prompt's samples do not
depend on which rank or batch generated it: one process and N processes roll out the same data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignment.config import ModelConfig, RolloutConfig


class WeightSyncError(RuntimeError):
    """The engine's weights do not match the trainer's after a sync."""


@dataclass
class SamplingParams:
    n: int = 1
    max_new_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Rollouts:
    prompt_ids: list[list[int]] = field(default_factory=list)  # one entry per sample
    response_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[torch.Tensor] = field(default_factory=list)  # fp32, one per response token
    finish_reasons: list[str] = field(default_factory=list)  # "stop" (EOS) or "length"
    prompt_index: list[int] = field(default_factory=list)  # position of the prompt in the request
    kv_bytes: int = 0  # hf backend: bytes the KV cache held at the end of its largest generate batch
    # vllm_server: per sample, the weight version its tokens were generated with (the engine checks it is
    # the version it pushed last, or one of the last rollout.max_staleness + 1); empty for the in-process backends
    weight_versions: list[str | None] = field(default_factory=list)


@dataclass
class Canary:
    """A fixed batch and the trainer's per-token log-probs on it, to check a weight sync."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    trainer_logprobs: list[torch.Tensor]


def sample_seed(seed: int, prompt_uid: int, sample: int) -> int:
    return (seed * 1_000_003 + prompt_uid * 9_973 + sample * 131 + 17) % (2**62)


class RolloutEngine:
    default_tolerance = 1e-3  # canary check when rollout.sync_tolerance is not set

    def generate(
        self, prompts: list[list[int]], sampling: SamplingParams, prompt_uids: list[int] | None = None
    ) -> Rollouts:
        raise NotImplementedError

    def logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[torch.Tensor]:
        """Per-token log-probs of given responses under the engine's weights (fp32)."""
        raise NotImplementedError

    def load_weights(self, named_tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def update_weights(self, named_tensors: dict[str, torch.Tensor], canary: Canary | None = None,
                       tolerance: float | None = None, version: str | None = None) -> float:
        """`version` labels the weights (e.g. step-3) where the backend tracks versions (vllm_server)."""
        self.load_weights(named_tensors)
        if canary is None:
            return 0.0
        tolerance = self.default_tolerance if tolerance is None else tolerance
        engine_lp = self.logprobs(canary.prompt_ids, canary.response_ids)
        err = max(float((a - b.detach().to(a)).abs().max()) for a, b in zip(engine_lp, canary.trainer_logprobs))
        if not err <= tolerance:
            raise WeightSyncError(
                f"weight sync check failed: engine and trainer log-probs on the canary batch differ by "
                f"{err:.3g} > tolerance {tolerance:g} (stale or partial weights in the rollout engine)"
            )
        return err

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass


def make_engine(rollout: RolloutConfig, model: ModelConfig, tokenizer, bf16: bool, seed: int = 0,
                hf_copy=None, output_dir: str | None = None) -> RolloutEngine:
    """`hf_copy`: the engine's own copy of the (unwrapped) model for the hf backend; vLLM loads the
    model from `model.path` and receives the trainer's weights at the first sync; vllm_server's servers
    were started apart, and receive the trainer's weights at the first sync (the disk transport writes
    them under rollout.server.weights_dir, by default <output_dir>/server_weights)."""
    if rollout.backend == "hf":
        from alignment.rollout.hf import HFEngine

        return HFEngine(hf_copy, tokenizer, bf16=bf16, kv_compression=rollout.kv_compression)
    if rollout.backend == "vllm":
        from alignment.models import resolve_path
        from alignment.rollout.vllm import VLLMEngine

        return VLLMEngine(resolve_path(model.path), tokenizer, rollout.vllm, model.trust_remote_code, seed)
    if rollout.backend == "vllm_server":
        from pathlib import Path

        from alignment.rollout.server import ServerEngine

        return ServerEngine(rollout.server, tokenizer,
                            weights_dir=Path(output_dir or ".") / "server_weights",
                            max_staleness=rollout.max_staleness)
    raise ValueError(f"unknown rollout backend {rollout.backend!r} (valid: hf, vllm, vllm_server)")
