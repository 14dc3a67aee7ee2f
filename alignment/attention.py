"""`sdpa_short_query`: transformers' SDPA attention, except for short queries on CPU.

PyTorch's CPU flash kernel is slow for the shapes RLHF on CPU runs most: one query token per decode
step, and the ~20-token responses that the shared-prefix training pass (`alignment.logprobs`) runs
against a cached prompt. There this module computes attention as two matmuls with each KV head's
query heads side by side (no repeat of the cache), scores and softmax in fp32, with SDPA's semantics
(mask, `is_causal`, alignment). Measured on 2 AMD EPYC cores (SmolLM2-135M's 9 query / 3 KV heads,
head_dim 64, 16 rows, padded; medians of interleaved repeats on a shared host, so +-20%):

- bf16 (benchmarks/RESULTS.md, issue 19): decode against 100 cached tokens 600 -> 100 us per layer, a
  training response of 18 tokens against 100 forward+backward 7.6 -> 2.2 ms. Scores in fp32 rather
  than bf16 (issue 26) cost 0-12% of that decode and 0-5% of that training response.
- fp32 (issue 26), as a share of SDPA's time: decode 0.33-0.60x natively (AVX-512; 140-221 vs 311-507
  us), 0.42-0.61x with AVX2 kernels only (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2; 158-199 vs
  281-423 us), 0.22x against 500 tokens; the training response 0.55-0.69x natively (3.6-4.7 vs 6.2-7.0
  ms), 0.55-0.77x with AVX2 (3.6-4.9 vs 4.8-6.9 ms). A padding-free decode (no mask: SDPA needs no
  repeat of the cache) is even (0.94x, 1.02x).

Long queries (prefill of long prompts, plain training passes), other devices and dtypes, dropout,
non-boolean masks and the extras some architectures add (soft-capping, position bias, sinks, paged
caches) go to SDPA unchanged.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_short_query"
# queries at most, by compute dtype: measured crossovers, forward and backward (bf16: SDPA wins at 512 x 512
# tokens; fp32: 0.87-0.92x SDPA's time at 64 queries x 164 keys, even at 96 x 196, 1.23x at 128 x 228)
MAX_QUERY = {torch.bfloat16: 128, torch.float16: 128, torch.float32: 64}
MAX_SCORES = 1 << 26  # fp32 score elements (256 MB) materialised at most
SDPA_ONLY_KWARGS = ("softcap", "position_bias", "s_aux", "sinks", "cache")


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    device = query.device.type  # under autocast the rotated query and key are fp32, the value bf16
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype


def short_query_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    batch, heads, q_len, dim = query.shape
    kv_len = key.shape[2]
    if (query.device.type != "cpu" or q_len > MAX_QUERY.get(_compute_dtype(query), 0)
            or batch * heads * q_len * kv_len > MAX_SCORES or dropout > 0
            or (attention_mask is not None and attention_mask.dtype != torch.bool)
            or any(kwargs.get(k) is not None for k in SDPA_ONLY_KWARGS)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if attention_mask is not None:  # sdpa_mask's (batch, 1, q_len, kv_len), True = attend
        attention_mask = attention_mask[:, :, None]
    elif q_len > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        # as sdpa_attention_forward: no mask means SDPA's is_causal, aligned top-left. transformers drops
        # the mask where that is right: q_len == kv_len, or an empty StaticCache's prefill (kv_len is the
        # cache's length, the queries are its first q_len positions), where keys past q_len are unused
        kv_len = min(q_len, kv_len)
        key, value = key[:, :, :kv_len], value[:, :, :kv_len]
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()
    out = grouped_attention(query, key, value, attention_mask, dim ** -0.5 if scaling is None else scaling)
    return out, None


def grouped_attention(query, key, value, mask, scaling: float) -> torch.Tensor:
    """softmax(q k^T * scaling, mask) v with each KV head's query heads side by side (heads as repeat_kv
    lays them out: query head h reads KV head h // group); scores and softmax in fp32."""
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads * q_len, dim)
    # fp32 scores: bf16 ones are off by up to 2^-9 of each logit (0.06 at 30), which the softmax
    # exponentiates; autocast would round the operands and the product back to bf16
    device = query.device.type
    with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext():
        scores = torch.matmul(grouped.float(), key.float().transpose(-1, -2)).mul_(scaling)
    scores = scores.view(batch, kv_heads, -1, q_len, kv_len)
    if mask is not None:
        # the most negative float, not -inf: a fully masked row (a left-pad query) stays finite, so no NaN
        # reaches a gradient; its output is ignored downstream
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(-1).to(value.dtype).view(batch, kv_heads, -1, kv_len)
    return torch.matmul(probs, value).view(batch, heads, q_len, dim).transpose(1, 2).contiguous()


AttentionInterface.register(NAME, short_query_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_short_query_attention(model, requested: str | None):
    """Switch a model that transformers gave SDPA by default (the user asked for nothing) to `NAME`."""
    if requested is None and getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(NAME)
    return model
