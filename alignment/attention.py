"""`sdpa_short_query`: transformers' SDPA attention, except for short queries in bf16/fp16 on CPU.

PyTorch's CPU flash kernel is slow for the shapes RLHF on CPU runs most: one query token per decode
step, and the ~20-token responses that the shared-prefix training pass (`alignment.logprobs`) runs
against a cached prompt. Measured on 2 AMD EPYC cores (bf16, SmolLM2-135M's 9 query / 3 KV heads,
16 rows; benchmarks/RESULTS.md, issue 19): decode against 100 cached tokens 600 -> 100 us per layer,
a training response of 18 tokens against 100 forward+backward 7.6 -> 2.2 ms. There this module computes
attention as two matmuls with each KV head's query heads side by side (no repeat of the cache), scores
and softmax in fp32. Long queries (prefill of long prompts, plain training passes), fp32 (no gain
measured), other devices, dropout and the extras some architectures add (soft-capping, position
bias, sinks) go to SDPA unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_short_query"
MAX_QUERY = 128  # measured crossover: at 512 x 512 tokens SDPA wins forward and backward
MAX_SCORES = 1 << 26  # fp32 score elements (256 MB) materialised at most
REDUCED = (torch.bfloat16, torch.float16)
SDPA_ONLY_KWARGS = ("softcap", "position_bias", "s_aux", "sinks")


def _reduced_precision(query: torch.Tensor) -> bool:
    device = query.device.type
    return query.dtype in REDUCED or (torch.is_autocast_enabled(device)
                                      and torch.get_autocast_dtype(device) in REDUCED)


def short_query_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs):
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if (query.device.type != "cpu" or q_len > MAX_QUERY or batch * heads * q_len * kv_len > MAX_SCORES
            or dropout > 0 or not getattr(module, "is_causal", True) or not _reduced_precision(query)
            or any(kwargs.get(k) is not None for k in SDPA_ONLY_KWARGS)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    group = heads // kv_heads
    scaling = dim ** -0.5 if scaling is None else scaling
    # heads are grouped as repeat_kv would lay them out: query head h reads KV head h // group
    grouped = query.reshape(batch, kv_heads, group * q_len, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float().mul_(scaling)
    scores = scores.view(batch, kv_heads, group, q_len, kv_len)
    if attention_mask is None:  # SDPA's mask skips padding-free causal batches; queries are the last q_len
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    else:  # sdpa_mask's (batch, 1, q_len, kv_len), True = attend
        attention_mask = attention_mask[:, :, None]
    # the most negative float, not -inf: a fully masked row (a left-pad query) stays finite, so no NaN
    # reaches a gradient; its output is ignored downstream
    scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(-1).to(value.dtype).view(batch, kv_heads, group * q_len, kv_len)
    out = torch.matmul(probs, value).view(batch, heads, q_len, dim)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, short_query_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_short_query_attention(model, requested: str | None):
    """Switch a model that transformers gave SDPA by default (the user asked for nothing) to `NAME`."""
    if requested is None and getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(NAME)
    return model
