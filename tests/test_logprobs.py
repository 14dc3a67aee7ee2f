"""Response log-probs (alignment/logprobs.py): rows that share a prompt run it once, exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from alignment.config import ModelConfig
from alignment.logprobs import pack, token_logprobs
from alignment.models import load_causal_lm


def _grouped_query_model(tiny_model, folder):
    """The tiny model with 4 query heads on 2 KV heads, loaded as the trainers load it: with the default
    attention (`sdpa_short_query`)."""
    config = AutoConfig.from_pretrained(tiny_model)
    config.num_attention_heads, config.num_key_value_heads = 4, 2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return load_causal_lm(ModelConfig(path=str(folder)))


# (log-prob error, gradient error against each tensor's largest entry). fp32: float rounding (measured
# 9.5e-7, 5.5e-7). bf16 autocast: the responses attend through a cache and a padding mask here, in one
# causal pass there, rounded differently (measured 0, 0.76%). The padding mask dropped in the cached
# pass is off by 0.18 and 147%.
@pytest.mark.parametrize("attention, bf16, tol", [("eager", False, (1e-5, 1e-5)), ("default", True, (0.01, 0.03))],
                         ids=["eager-fp32-1kv", "default-bf16-2kv"])
def test_rows_sharing_a_prompt_run_it_once_with_the_same_logprobs_and_gradients(tiny_model, tmp_path, attention,
                                                                                 bf16, tol):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = (AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager") if attention == "eager"
             else _grouped_query_model(tiny_model, tmp_path / "gqa"))
    short, long = ([tokenizer.encode(q) for q in ("What is 2+2?", "Tell me a longer story about a cat and a dog.")])
    prompts = [short] * 3 + [long] * 2  # two groups, left-padded to the longer prompt
    responses = [[5, 6, 7], [8], [9, 10, 11, 12], [13, 14], [15]]
    batch = pack(prompts, responses, tokenizer.pad_token_id)
    r_len, mask = batch["response_mask"].shape[1], batch["response_mask"].bool()
    seen = []

    def record(_, args, kwargs):  # the decoder's (rows, tokens), whether it gets token ids or embeddings
        seen.append(tuple(next(kwargs[k] for k in ("input_ids", "inputs_embeds") if kwargs.get(k) is not None
                               ).shape[:2]))

    model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    params = [p for p in model.parameters() if p.requires_grad]

    def logprobs_and_grads(rows):
        lp, _ = token_logprobs(model, batch["input_ids"][rows], batch["attention_mask"][rows],
                               batch["position_ids"][rows], r_len, bf16)
        return lp, torch.autograd.grad(lp[mask[rows]].sum(), params)

    shared, shared_grads = logprobs_and_grads(slice(None))
    split = batch["input_ids"].shape[1] - r_len - 1
    assert seen == [(2, split), (5, r_len + 1)]  # each distinct prompt once, then every row's response
    alone = [logprobs_and_grads(slice(i, i + 1)) for i in range(5)]  # one row: nothing to share
    assert len(seen) == 2 + 5
    assert (shared[mask] - torch.cat([lp for lp, _ in alone])[mask]).abs().max() <= tol[0]
    for k, grad in enumerate(shared_grads):
        ref = sum(grads[k] for _, grads in alone)
        assert (grad - ref).abs().max() <= tol[1] * ref.abs().max()
