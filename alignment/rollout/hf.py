"""The `hf` rollout backend: a transformers model decoded by our own loop, batched with left padding.

The engine owns its own copy of the weights (as vLLM does), so weight sync is a real push that is
verified like any other backend's. Decoding is a plain loop over the model's forward (prefill once per
prompt, then one token per step), not `generate`: at these batch sizes a decode step is bound by
per-op overhead, and generate's logits processors, stopping criteria and bookkeeping added about a
fifth per token. Each sample draws from its own generator (seeded per prompt uid and sample index):
one uniform per token, inverted through the cumulative distribution (top-p applied first), and the
log-prob of the chosen token is recorded from the raw fp32 logits. The KV cache is transformers'
DynamicCache, or GEAR / KIVI compressed (`rollout.kv_compression`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading

import torch

from alignment.compression.gear import cache_nbytes, make_kv_cache
from alignment.config import KVCompressionConfig
from alignment.logprobs import pack, token_logprobs
from alignment.rollout import Canary, RolloutEngine, Rollouts, SamplingParams, WeightSyncError, sample_seed


class SeededSampler:
    """Draws one token per row from `logits` (B, V), each row from its own seeded generator."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature <= 0:
            return logits.argmax(-1)
        z = logits / self.temperature
        if self.top_p < 1.0:
            sorted_z, order = z.sort(-1, descending=True)
            probs = sorted_z.softmax(-1)
            drop_sorted = probs.cumsum(-1) - probs >= self.top_p  # keep the token that crosses top_p
            z = z.masked_fill(torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted), float("-inf"))
        cdf = z.softmax(-1).cumsum(-1)
        # u > 0: u = 0 would pick token 0 even when top-p gave it no probability
        uniform = torch.cat([torch.rand(1, generator=g) for g in self.generators]).clamp_(min=1e-12).to(cdf.device)
        chosen = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None]).squeeze(-1)
        return chosen.clamp_(max=cdf.shape[-1] - 1)  # rounding can put u past the last step of the cdf


_reference = threading.local()  # set while `plain_linears()` runs the decoder on plain weights


def _packed_linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if getattr(_reference, "active", False):
        return torch.nn.functional.linear(x, module.weight, module.bias)
    return torch.ops.mkldnn._linear_pointwise(x, module.packed_weight, module.bias, "none", [], "")


@contextlib.contextmanager
def plain_linears():
    """Packed layers compute from their `weight` parameter (what the sync check compares against)."""
    _reference.active = True
    try:
        yield
    finally:
        _reference.active = False


def pack_linear_weights(model: torch.nn.Module) -> bool:
    """Run a CPU model's nn.Linear layers on oneDNN-prepacked copies of their weights (again after each
    weight load). A decode step's matmuls read every weight once for a few rows, and the plain kernels
    pay for it on every call: bf16 goes to oneDNN, which reorders each weight per call; fp32 goes to
    MKL, which runs its slow generic path on AMD CPUs. Matmuls of one decode token, 16 rows,
    SmolLM2-135M, 2 AMD EPYC cores: bf16 35 -> 20 ms (bit-identical outputs); fp32 43 -> 16 ms, and
    52 -> 30 ms with oneDNN limited to AVX2 as on an AVX2-only CPU (outputs within ~1e-4 of MKL's).
    False where it does not apply (other devices or dtypes, no oneDNN, bf16 without oneDNN bf16)."""
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    if not linears or linears[0].weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    dtype = linears[0].weight.dtype
    if dtype not in (torch.float32, torch.bfloat16) or (
            dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    for module in linears:
        # the layout is chosen for a batch-size hint; 1..160 rows measured the same
        module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), 16)
        module.forward = functools.partial(_packed_linear, module)
    return True


class HFEngine(RolloutEngine):
    def __init__(self, model, tokenizer, bf16: bool = True, max_batch: int = 64,
                 kv_compression: KVCompressionConfig | None = None):
        # `model` keeps the pushed weights at full precision; the canary compares it with the trainer.
        # `decoder` is the copy that samples: with bf16 a bf16 copy, rewritten from the same tensors at
        # every load (no autocast, whose per-op casts and dispatch cost about 15% of a decode step: 65 ->
        # 56 ms per token, 16 rows, SmolLM2-135M, 2 CPU cores), else `model` itself. Either runs on
        # packed weights where oneDNN can (`pack_linear_weights`), and each sync checks it too.
        self.model = model.eval().requires_grad_(False)
        self.model.config.use_cache = True
        self.decoder = copy.deepcopy(self.model).to(torch.bfloat16) if bf16 else self.model
        self.packed = pack_linear_weights(self.decoder)
        self.tokenizer = tokenizer
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
        out = Rollouts()
        per_chunk = max(1, self.max_batch // n)
        for start in range(0, len(prompts), per_chunk):
            index = list(range(start, min(start + per_chunk, len(prompts))))
            seeds = [sample_seed(sampling.seed, uids[i], k) for i in index for k in range(n)]
            sampler = SeededSampler(seeds, sampling.temperature, sampling.top_p)
            tokens, chosen_lp, kv_bytes = self._decode([prompts[i] for i in index], n, sampler,
                                                       sampling.max_new_tokens)
            out.kv_bytes = max(out.kv_bytes, kv_bytes)
            for row in range(len(seeds)):
                i = index[row // n]
                length, reason = len(tokens[row]), "length"
                for t, tok in enumerate(tokens[row]):
                    if tok in self.eos_ids:
                        length, reason = t + 1, "stop"
                        break
                out.prompt_ids.append(prompts[i])
                out.response_ids.append(tokens[row][:length])
                out.logprobs.append(chosen_lp[row, :length].clone())
                out.finish_reasons.append(reason)
                out.prompt_index.append(i)
        return out

    def _decode(self, prompts: list[list[int]], n: int, sampler: SeededSampler, max_new_tokens: int
                ) -> tuple[list[list[int]], torch.Tensor, int]:
        """`n` samples of each prompt: token ids (past the first EOS: filler), the fp32 log-probs of
        the chosen tokens (rows, steps), and the bytes the KV cache held at the end."""
        batch = pack(prompts, [[] for _ in prompts], self.pad_id, self.device)
        p_len = batch["input_ids"].shape[1] - 1  # pack() reserves one response slot
        ids, mask = batch["input_ids"][:, :p_len], batch["attention_mask"][:, :p_len]
        cache = make_kv_cache(self.kv_compression, self.decoder.config, left_pad=(mask == 0).sum(-1),
                              reserve=max_new_tokens)
        if p_len > 1:
            # The n samples of a prompt share its prefill: run it once, then repeat the cache. Only
            # the cache is wanted, so the decoder runs without the LM head.
            self.decoder.get_decoder()(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                                       position_ids=batch["position_ids"][:, : p_len - 1], past_key_values=cache,
                                       use_cache=True)
        cache.batch_repeat_interleave(n)
        token = ids[:, -1:].repeat_interleave(n, 0)
        mask = mask.repeat_interleave(n, 0)
        position = batch["position_ids"][:, p_len - 1: p_len].repeat_interleave(n, 0)
        eos = torch.tensor(self.eos_ids, device=token.device)
        done = torch.zeros(len(token), dtype=torch.bool, device=token.device)
        tokens, chosen_lp = [], []
        for _ in range(max_new_tokens):
            logits = self.decoder(input_ids=token, attention_mask=mask, position_ids=position, past_key_values=cache,
                                use_cache=True).logits[:, -1].float()
            chosen = sampler(logits)
            chosen_lp.append(logits.log_softmax(-1).gather(-1, chosen[:, None]).squeeze(-1))
            tokens.append(chosen)
            done |= torch.isin(chosen, eos)
            if bool(done.all()):
                break
            token, position = chosen[:, None], position + 1
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
        return torch.stack(tokens, 1).tolist(), torch.stack(chosen_lp, 1).cpu(), cache_nbytes(cache)

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
        if self.decoder is not self.model:
            for name, param in self.decoder.named_parameters():
                param.copy_(named_tensors[name])
        if self.packed:
            pack_linear_weights(self.decoder)

    def update_weights(self, named_tensors, canary: Canary | None = None, tolerance: float | None = None,
                       version: str | None = None) -> float:
        """Load and check `model` against the trainer's canary (with fp32 decoding, `model` is the packed
        decoder itself); a separate bf16 decoder is then checked against a fresh cast of `model`."""
        err = super().update_weights(named_tensors, canary, tolerance)
        if canary is not None and self.decoder is not self.model:
            self.check_decoder(canary, self.default_tolerance if tolerance is None else tolerance)
        return err

    @torch.no_grad()
    def check_decoder(self, canary: Canary, tolerance: float = RolloutEngine.default_tolerance) -> float:
        """The copy that samples against a fresh cast of `model`'s weights, through the same graph in the
        same precision: a decoder or packed weights left stale by a load fail with `WeightSyncError`.

        In sync, the two agree exactly where packed and plain bf16 both run on oneDNN, and where neither
        is packed (measured 0 on AMD EPYC, natively and with oneDNN limited to AVX2), so the fp32
        canary's tolerance applies: a late small update may flip only a few bf16 roundings. Left one
        AdamW step (lr 1e-5) behind, SmolLM2-135M's decoder was off by 0.86 nats (1.04 with AVX2
        kernels), its packed weights alone by 0.77. Costs 0.10 s per sync there (two 12-token forwards)."""
        dtype = next(self.decoder.parameters()).dtype
        fresh = {name: p.to(dtype) for name, p in self.model.named_parameters()}
        got = self.sampling_logprobs(canary.prompt_ids, canary.response_ids)
        with plain_linears():
            want = self.sampling_logprobs(canary.prompt_ids, canary.response_ids, fresh)
        err = max(float((a - b).abs().max()) for a, b in zip(got, want))
        if not err <= tolerance:
            raise WeightSyncError(
                f"weight sync check failed: the {str(dtype).removeprefix('torch.')} decoder that samples differs "
                f"from the synced weights by {err:.3g} nats on the canary batch > tolerance {tolerance:g} (stale "
                f"decoder copy or packed weights; rollout.sync_tolerance sets the tolerance)")
        return err

    def sampling_logprobs(self, prompt_ids, response_ids, params: dict[str, torch.Tensor] | None = None):
        """Log-probs of given responses as the sampler computes them: the decoder's own logits, in its
        precision, upcast to fp32; with `params`, the decoder's graph runs on those tensors instead."""
        batch = pack(prompt_ids, response_ids, self.pad_id, self.device)
        r_len = batch["response_mask"].shape[1]
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        if params is None:
            logits = self.decoder(**inputs).logits
        else:
            logits = torch.func.functional_call(self.decoder, params, args=(), kwargs=inputs).logits
        lp = logits[:, -r_len - 1: -1].float().log_softmax(-1)
        lp = lp.gather(-1, batch["input_ids"][:, -r_len:, None]).squeeze(-1)
        return [lp[i, : len(r)].cpu() for i, r in enumerate(response_ids)]
