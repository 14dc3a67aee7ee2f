"""The `hf` rollout backend: transformers `generate`, batched with left padding.

The engine owns its own copy of the weights (as vLLM does), so weight sync is a real push that is
verified like any other backend's. Tokens are chosen by a logits processor that draws Gumbel noise
from one generator per sample (seeded per prompt uid and sample index) and records the log-prob of
the chosen token from the raw logits; `generate` then runs greedy over the processed scores. The KV cache is
transformers' DynamicCache, or GEAR / KIVI compressed (`rollout.kv_compression`).
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from alignment.compression.gear import cache_nbytes, make_kv_cache
from alignment.config import KVCompressionConfig
from alignment.logprobs import autocast, pack, token_logprobs
from alignment.rollout import RolloutEngine, Rollouts, SamplingParams, sample_seed


class SeededSampler(LogitsProcessor):
    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p
        self.chosen_logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float()
        if self.temperature <= 0:
            chosen = logits.argmax(-1)
        else:
            z = logits / self.temperature
            if self.top_p < 1.0:
                sorted_z, order = z.sort(-1, descending=True)
                cum = sorted_z.softmax(-1).cumsum(-1)
                drop_sorted = cum - sorted_z.softmax(-1) >= self.top_p  # keep the token that crosses top_p
                drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
                z = z.masked_fill(drop, float("-inf"))
            uniform = torch.stack([torch.rand(z.shape[-1], generator=g) for g in self.generators])
            gumbel = -torch.log(-torch.log(uniform.clamp_(1e-20, 1.0)))
            chosen = (z + gumbel.to(z.device)).argmax(-1)
        self.chosen_logprobs.append(logits.log_softmax(-1).gather(-1, chosen[:, None]).squeeze(-1))
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, chosen[:, None], 0.0)


class HFEngine(RolloutEngine):
    def __init__(self, model, tokenizer, bf16: bool = True, max_batch: int = 64,
                 kv_compression: KVCompressionConfig | None = None):
        # Parameters keep requires_grad=True (the engine only ever runs under no_grad): autocast
        # caches its bf16 copies of such leaf weights for a whole generate call instead of
        # re-casting every weight at every decode step (2x faster decoding on CPU).
        self.model = model.eval().requires_grad_(True)
        self.model.config.use_cache = True
        self.tokenizer = tokenizer
        self.bf16 = bf16
        self.max_batch = max_batch
        self.kv_compression = kv_compression or KVCompressionConfig()
        self.pad_id = tokenizer.pad_token_id
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = sorted(set(eos + [tokenizer.eos_token_id]) - {None})

    @property
    def device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, prompts, sampling: SamplingParams, prompt_uids=None) -> Rollouts:
        uids = prompt_uids if prompt_uids is not None else list(range(len(prompts)))
        n = sampling.n
        config = GenerationConfig(
            do_sample=False, max_new_tokens=sampling.max_new_tokens, eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id, num_beams=1,
        )
        out = Rollouts()
        per_chunk = max(1, self.max_batch // n)
        for start in range(0, len(prompts), per_chunk):
            index = list(range(start, min(start + per_chunk, len(prompts))))
            batch = pack([prompts[i] for i in index], [[] for _ in index], self.pad_id, self.device)
            p_len = batch["input_ids"].shape[1] - 1  # pack() reserves one response slot
            ids, mask = batch["input_ids"][:, :p_len], batch["attention_mask"][:, :p_len]
            seeds = [sample_seed(sampling.seed, uids[i], k) for i in index for k in range(n)]
            sampler = SeededSampler(seeds, sampling.temperature, sampling.top_p)
            with autocast(self.bf16):
                # The n samples of a prompt share its prefill: run it once, then repeat the cache.
                cache = make_kv_cache(self.kv_compression, self.model.config, left_pad=(mask == 0).sum(-1))
                if p_len > 1:
                    # only the cache is wanted: logits_to_keep=1 spares full-vocabulary logits for
                    # every prompt position (16 prompts x 45 tokens x 49k vocabulary = 141 MB in fp32)
                    self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                               position_ids=batch["position_ids"][:, : p_len - 1], past_key_values=cache,
                               logits_to_keep=1)
                cache.batch_repeat_interleave(n)
                sequences = self.model.generate(
                    input_ids=ids.repeat_interleave(n, 0), attention_mask=mask.repeat_interleave(n, 0),
                    past_key_values=cache, generation_config=config,
                    logits_processor=LogitsProcessorList([sampler]),
                )
            out.kv_bytes = max(out.kv_bytes, cache_nbytes(cache))
            new_tokens = sequences[:, p_len:].cpu()
            chosen_lp = torch.stack(sampler.chosen_logprobs, 1).cpu()
            for row in range(len(seeds)):
                i = index[row // n]
                tokens = new_tokens[row].tolist()
                length, reason = len(tokens), "length"
                for t, tok in enumerate(tokens):
                    if tok in self.eos_ids:
                        length, reason = t + 1, "stop"
                        break
                out.prompt_ids.append(prompts[i])
                out.response_ids.append(tokens[:length])
                out.logprobs.append(chosen_lp[row, :length].clone())
                out.finish_reasons.append(reason)
                out.prompt_index.append(i)
        return out

    @torch.no_grad()
    def logprobs(self, prompt_ids, response_ids):
        batch = pack(prompt_ids, response_ids, self.pad_id, self.device)
        r_len = batch["response_mask"].shape[1]
        lp, _ = token_logprobs(self.model, batch["input_ids"], batch["attention_mask"], batch["position_ids"], r_len)
        return [lp[i, : len(r)].cpu() for i, r in enumerate(response_ids)]

    @torch.no_grad()
    def load_weights(self, named_tensors):
        params = dict(self.model.named_parameters())
        missing = sorted(set(params) - set(named_tensors))
        if missing:
            raise KeyError(f"weight sync is missing {len(missing)} tensors, e.g. {missing[:3]}")
        for name, param in params.items():
            param.copy_(named_tensors[name])
