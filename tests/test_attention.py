"""`sdpa_short_query`: SDPA's results (rounding aside), mask, `is_causal` and alignment included, where it
computes attention itself (short bf16 and fp32 queries), SDPA itself elsewhere, and the default for the
models we load."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from alignment.attention import NAME, short_query_attention
from alignment.config import ModelConfig
from alignment.logprobs import autocast, pack
from alignment.models import load_causal_lm

# logits (of magnitude ~0.5): bf16 against SDPA in bf16 agree to a few bf16 ulps (measured 0.0022-0.0029),
# fp32 against SDPA in fp32 to float rounding (measured 1e-7-1.8e-7). A softmax scale of 1.0 instead of
# 1/4 is off by 0.23-0.27 in every test below.
BF16_TOL, FP32_TOL = 0.01, 1e-5


@pytest.fixture(scope="module")
def model():
    # two KV heads of two query heads each, so that a wrong grouping of heads shows
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper attention than the 0.02 init's near-uniform one, so the scale shows
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    return model


def _logits(model, impl: str, bf16: bool, **inputs) -> torch.Tensor:
    model.set_attn_implementation(impl)
    with autocast(bf16):
        return model(**inputs).logits.float()


def _left_padded(model, prompts=([5, 6, 7, 8, 9, 10, 11], [12, 13, 14])):
    batch = pack(list(prompts), [[20, 21, 22], [23]], 0)
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}, batch["attention_mask"].bool()


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
@pytest.mark.parametrize("prompts", [([5, 6, 7, 8, 9, 10, 11], [12, 13, 14]),  # left padding: a mask
                                     ([5, 6, 7], [12, 13, 14])])  # none: SDPA's mask is None (causal)
def test_prefill_and_its_gradients_match_sdpa(model, prompts, bf16):
    inputs, valid = _left_padded(model, prompts)
    grads = {}
    for impl in ("sdpa", NAME):
        model.zero_grad()
        logits = _logits(model, impl, bf16, **inputs)
        (logits[valid].logsumexp(-1).sum()).backward()
        grads[impl] = (logits.detach(), [p.grad.clone() for p in model.parameters()])
    ref, mine = grads["sdpa"], grads[NAME]
    assert (mine[0] - ref[0])[valid].abs().max() < (BF16_TOL if bf16 else FP32_TOL)
    # gradients, against each tensor's largest entry: bf16 within 3% (measured at most 1.1%, as eager vs
    # SDPA), fp32 within 1e-5 (measured 8.8e-7); the scale of 1.0 is off by 400%
    rel = 0.03 if bf16 else 1e-5
    assert all((a - b).abs().max() <= rel * b.abs().max() for a, b in zip(mine[1], ref[1]))
    assert not any(g.isnan().any() for g in mine[1])  # the fully masked rows of left padding stay finite
    model.zero_grad()


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
@torch.no_grad()
def test_decode_and_responses_after_a_cached_prompt_match_sdpa(model, bf16):
    inputs, valid = _left_padded(model)
    split = 5  # of 10 columns: 5 in the cache, then 4 tokens at once, then the last one
    out = {}
    for impl in ("sdpa", NAME):
        model.set_attn_implementation(impl)
        cache, logits = DynamicCache(config=model.config), []
        with autocast(bf16):
            model(input_ids=inputs["input_ids"][:, :split], attention_mask=inputs["attention_mask"][:, :split],
                  position_ids=inputs["position_ids"][:, :split], past_key_values=cache, use_cache=True)
            for lo, hi in [(split, 9), (9, 10)]:
                logits.append(model(input_ids=inputs["input_ids"][:, lo:hi],
                                     attention_mask=inputs["attention_mask"][:, :hi],
                                     position_ids=inputs["position_ids"][:, lo:hi], past_key_values=cache,
                                     use_cache=True).logits.float())
        out[impl] = torch.cat(logits, 1)
    assert (out[NAME] - out["sdpa"])[valid[:, split:]].abs().max() < (BF16_TOL if bf16 else FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@torch.no_grad()
def test_static_cache_prefill_and_decode_match_sdpa(model, dtype):
    """A StaticCache's prefill gets no mask, kv_len the cache's length and the queries its first
    positions: SDPA's causal mask aligned top-left (measured 0.0029 in bf16, 1e-7 in fp32; aligned
    bottom-right, the queries taken as the last positions, off by 0.41 in both)."""
    model = copy.deepcopy(model).to(dtype)  # a StaticCache holds the model's dtype: no autocast
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [12, 13, 14, 15, 16, 17]])
    out = {}
    for impl in ("sdpa", NAME):
        model.set_attn_implementation(impl)
        cache = StaticCache(config=model.config, max_cache_len=16)
        prefill = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        decode = model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True).logits
        out[impl] = torch.cat([prefill, decode], 1).float()
    assert (out[NAME] - out["sdpa"]).abs().max() < (BF16_TOL if dtype == torch.bfloat16 else FP32_TOL)


class _Attention(torch.nn.Module):
    def __init__(self, is_causal: bool, groups: int = 2):
        super().__init__()
        self.is_causal, self.num_key_value_groups = is_causal, groups


def _qkv(q_len: int, kv_len: int, std: float = 1.0):
    torch.manual_seed(0)
    q, k = (torch.randn(2, heads, n, 16) * std for heads, n in ((4, q_len), (2, kv_len)))
    return q.bfloat16(), k.bfloat16(), torch.randn(2, 2, kv_len, 16).bfloat16()


def _and_fp32_sdpa(module, q, k, v, mask, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 `short_query_attention`'s output, and SDPA's in fp32 on the same (bf16) inputs."""
    mine = short_query_attention(module, q, k, v, mask, **kwargs)[0].float()
    return mine, sdpa_attention_forward(module, q.float(), k.float(), v.float(), mask, **kwargs)[0]


def test_scores_and_softmax_are_fp32():
    """Attention logits up to 44, as a trained model's: with one-hot values the output is the attention
    probabilities, within two bf16 roundings (probabilities, output: 2 x 2^-9) of SDPA's fp32 ones
    (measured 0.33%). Scores rounded to bf16 (off by up to 0.125 at 44) move them by up to 7.2%."""
    q, k, _ = _qkv(3, 9, std=3.0)
    v = torch.eye(9, 16).expand(2, 2, 9, 16).bfloat16()
    mask = torch.ones(3, 9, dtype=torch.bool).tril(6).expand(2, 1, 3, 9).clone()
    mask[1, :, :, :4] = False  # the second row left-padded
    mine, ref = _and_fp32_sdpa(_Attention(True), q, k, v, mask, scaling=0.25)
    assert (mine - ref)[ref > 1e-6].div(ref[ref > 1e-6]).abs().max() < 0.01


@pytest.mark.parametrize("module_causal, is_causal", [(True, None), (True, False), (False, None), (False, True)])
def test_an_explicit_is_causal_overrides_the_modules(module_causal, is_causal):
    """As sdpa_attention_forward: the `is_causal` kwarg, else the module's attribute (measured at most
    0.0091, bf16 rounding; the kwarg ignored: off by 3.1)."""
    q, k, v = _qkv(5, 5)
    mine, ref = _and_fp32_sdpa(_Attention(module_causal), q, k, v, None, is_causal=is_causal)
    assert (mine - ref).abs().max() < 0.02


def test_loaded_models_default_to_it_and_an_explicit_choice_wins(tiny_model):
    assert load_causal_lm(ModelConfig(path=str(tiny_model))).config._attn_implementation == NAME
    assert load_causal_lm(ModelConfig(path=str(tiny_model), attn_implementation="eager")
                          ).config._attn_implementation == "eager"
