"""`sdpa_short_query`: SDPA's results (bf16 rounding aside) where it computes attention itself, SDPA
itself elsewhere, and the default for the models we load."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from alignment.attention import NAME
from alignment.config import ModelConfig
from alignment.logprobs import autocast, pack
from alignment.models import load_causal_lm


@pytest.fixture(scope="module")
def model():
    # two KV heads of two query heads each, so that a wrong grouping of heads shows
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _logits(model, impl: str, bf16: bool, **inputs) -> torch.Tensor:
    model.set_attn_implementation(impl)
    with autocast(bf16):
        return model(**inputs).logits.float()


def _left_padded(model, prompts=([5, 6, 7, 8, 9, 10, 11], [12, 13, 14])):
    batch = pack(list(prompts), [[20, 21, 22], [23]], 0)
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}, batch["attention_mask"].bool()


def test_fp32_is_sdpa_itself(model):
    inputs, _ = _left_padded(model)
    assert torch.equal(_logits(model, NAME, False, **inputs), _logits(model, "sdpa", False, **inputs))


@pytest.mark.parametrize("prompts", [([5, 6, 7, 8, 9, 10, 11], [12, 13, 14]),  # left padding: a mask
                                     ([5, 6, 7], [12, 13, 14])])  # none: SDPA's mask is None (causal)
def test_bf16_matches_sdpa_on_prefill_and_its_gradients(model, prompts):
    inputs, valid = _left_padded(model, prompts)
    grads = {}
    for impl in ("sdpa", NAME):
        model.zero_grad()
        logits = _logits(model, impl, True, **inputs)
        (logits[valid].logsumexp(-1).sum()).backward()
        grads[impl] = (logits.detach(), [p.grad.clone() for p in model.parameters()])
    ref, mine = grads["sdpa"], grads[NAME]
    # bf16 rounding in another order: logits of scale ~1 agree to a few bf16 ulps (measured 0.004)
    assert (mine[0] - ref[0])[valid].abs().max() < 0.03
    # gradients: within 3% of each tensor's largest entry (measured at most 1.1%, as eager vs SDPA)
    assert all((a - b).abs().max() <= 0.03 * b.abs().max() for a, b in zip(mine[1], ref[1]))
    assert not any(g.isnan().any() for g in mine[1])  # the fully masked rows of left padding stay finite
    model.zero_grad()


@torch.no_grad()
def test_bf16_decode_and_responses_after_a_cached_prompt_match_sdpa(model):
    inputs, valid = _left_padded(model)
    split = 5  # of 10 columns: 5 in the cache, then 4 tokens at once, then the last one
    out = {}
    for impl in ("sdpa", NAME):
        model.set_attn_implementation(impl)
        cache, logits = DynamicCache(config=model.config), []
        with autocast(True):
            model(input_ids=inputs["input_ids"][:, :split], attention_mask=inputs["attention_mask"][:, :split],
                  position_ids=inputs["position_ids"][:, :split], past_key_values=cache, use_cache=True)
            for lo, hi in [(split, 9), (9, 10)]:
                logits.append(model(input_ids=inputs["input_ids"][:, lo:hi],
                                     attention_mask=inputs["attention_mask"][:, :hi],
                                     position_ids=inputs["position_ids"][:, lo:hi], past_key_values=cache,
                                     use_cache=True).logits.float())
        out[impl] = torch.cat(logits, 1)
    assert (out[NAME] - out["sdpa"])[valid[:, split:]].abs().max() < 0.03


def test_loaded_models_default_to_it_and_an_explicit_choice_wins(tiny_model):
    assert load_causal_lm(ModelConfig(path=str(tiny_model))).config._attn_implementation == NAME
    assert load_causal_lm(ModelConfig(path=str(tiny_model), attn_implementation="eager")
                          ).config._attn_implementation == "eager"
