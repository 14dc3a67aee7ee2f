"""Response log-probs (alignment/logprobs.py): rows that share a prompt run it once, exactly."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment.logprobs import pack, token_logprobs


def test_rows_sharing_a_prompt_run_it_once_with_the_same_logprobs_and_gradients(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager")
    short, long = ([tokenizer.encode(q) for q in ("What is 2+2?", "Tell me a longer story about a cat and a dog.")])
    prompts = [short] * 3 + [long] * 2  # two groups, left-padded to the longer prompt
    responses = [[5, 6, 7], [8], [9, 10, 11, 12], [13, 14], [15]]
    batch = pack(prompts, responses, tokenizer.pad_token_id)
    r_len, mask = batch["response_mask"].shape[1], batch["response_mask"].bool()
    seen = []
    model.get_decoder().register_forward_pre_hook(lambda _, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)),
                                                  with_kwargs=True)
    params = [p for p in model.parameters() if p.requires_grad]

    def logprobs_and_grads(rows):
        lp, _ = token_logprobs(model, batch["input_ids"][rows], batch["attention_mask"][rows],
                               batch["position_ids"][rows], r_len)
        return lp, torch.autograd.grad(lp[mask[rows]].sum(), params)

    shared, shared_grads = logprobs_and_grads(slice(None))
    split = batch["input_ids"].shape[1] - r_len - 1
    assert seen == [(2, split), (5, r_len + 1)]  # each distinct prompt once, then every row's response
    alone = [logprobs_and_grads(slice(i, i + 1)) for i in range(5)]  # one row: nothing to share
    assert len(seen) == 2 + 5
    assert torch.allclose(shared[mask], torch.cat([lp for lp, _ in alone])[mask], atol=1e-5)
    for k, grad in enumerate(shared_grads):
        assert torch.allclose(grad, sum(grads[k] for _, grads in alone), atol=1e-5, rtol=1e-4)
