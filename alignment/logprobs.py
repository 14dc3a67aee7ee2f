"""Log-probabilities of responses: packing [prompt | response] rows, the fp32-head log-prob and
entropy computation, the policy module the training backend wraps, and frozen-reference log-probs."""

from __future__ import annotations

import contextlib

import torch

from alignment.adapters import hf_model
from alignment.recompute import PromptCache


def autocast(bf16: bool):
    """bf16 matmuls on the AMX/AVX-512 units (or GPU tensor cores); a no-op when disabled."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device=None) -> dict:
    """[left-padded prompt | right-padded response]: response logits are the last R+1 positions.

    Returns input_ids, attention_mask, position_ids and response_mask (B, R).
    """
    p_len = max(len(p) for p in prompts)
    r_len = max(1, max(len(r) for r in responses))
    batch = len(prompts)
    ids = torch.full((batch, p_len + r_len), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, p_len + r_len), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, p_len - len(p): p_len] = torch.tensor(p, dtype=torch.long)
        ids[i, p_len: p_len + len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, p_len - len(p): p_len + len(r)] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": position_ids,
        "response_mask": mask[:, p_len:].clone(),
    }
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    response_len: int,
    bf16: bool = False,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (B, R) of the last `response_len` tokens given everything before them.

    The decoder runs under bf16 autocast when asked; the LM head and the log-softmax run in fp32 on
    the response positions only (bf16 logits of magnitude ~20 would carry ~0.06 nats of error).
    """
    lm = hf_model(model)
    with autocast(bf16):
        hidden = response_hidden(lm.get_decoder(), input_ids, attention_mask, position_ids, response_len)
    # contiguous: on a strided slice, a frozen model's linear runs as a batched matmul with the LM head
    # expanded per row, about 10x slower on CPU than the single matmul it gets here
    hidden = hidden.contiguous()
    with autocast(False):
        logits = lm.get_output_embeddings()(hidden.float())
    targets = input_ids[:, -response_len:]
    log_norm = logits.logsumexp(-1)
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    entropy = None
    if with_entropy:
        with torch.no_grad():
            probs = torch.softmax(logits.detach(), -1)
            entropy = log_norm.detach() - (probs * logits.detach()).sum(-1)
    return logprobs, entropy


def response_hidden(decoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor, response_len: int) -> torch.Tensor:
    """The decoder's last hidden states (B, R, H) at the positions whose logits predict the response.

    Rows that share their prompt (the n samples of a prompt in a group rollout) run it once: the
    prompt's keys and values are computed for one row of each distinct prompt and indexed out to
    the others, and the responses then attend to them as to a KV cache. Exact (each prompt token
    only sees the prompt), and gradients flow back through the indexing, summed over the rows. It
    cuts the decoder's tokens per mini-batch of 8 samples of one 50-token prompt from 8 x 66 to
    50 + 8 x 17.
    """
    split = input_ids.shape[1] - response_len - 1  # the last prompt token goes with the response
    # One embedding lookup for both passes below: its backward builds the dense (vocab x hidden) gradient
    # once, not once per pass plus their sum (SmolLM2-135M: 113 MB zero-filled and added per call,
    # about 0.15 s per mini-batch in fp32 on 2 CPU cores)
    embeds = decoder.get_input_embeddings()(input_ids)
    if split > 0:
        distinct, inverse = torch.unique(torch.cat([input_ids[:, :split], attention_mask[:, :split]], 1), dim=0,
                                         return_inverse=True)
    if split <= 0 or len(distinct) == len(input_ids):
        hidden = decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state
        return hidden[:, -response_len - 1: -1]
    rows = torch.arange(len(inverse), device=inverse.device)
    first = torch.zeros(len(distinct), dtype=torch.long, device=inverse.device).scatter_(0, inverse, rows)
    # PromptCache: the prompt pass stores, the response pass only reads, so a checkpointed layer's
    # recompute (train.gradient_checkpointing, alignment/recompute.py) sees the same cache
    prompt_cache = PromptCache()
    decoder(inputs_embeds=embeds[first, :split], attention_mask=attention_mask[first, :split],
            position_ids=position_ids[first, :split], past_key_values=prompt_cache, use_cache=True)
    cache = prompt_cache.for_rows(inverse)  # one cache row per sample: an index_select, differentiable
    hidden = decoder(inputs_embeds=embeds[:, split:], attention_mask=attention_mask,
                     position_ids=position_ids[:, split:], past_key_values=cache, use_cache=True).last_hidden_state
    return hidden[:, :-1]


@torch.no_grad()
def reference_logprobs(reference: torch.nn.Module | None, policy: torch.nn.Module, inputs: dict, response_len: int,
                       bf16: bool) -> torch.Tensor:
    """Response log-probs under a frozen reference: its own copy, or with `reference=None` the
    policy with its PEFT adapters switched off (the initial model, without a second copy)."""
    if reference is None:
        context = policy.disable_adapter()
        model = policy
    else:
        context = contextlib.nullcontext()
        model = reference.to(inputs["input_ids"].device)
    with context:
        logp, _ = token_logprobs(model, inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"],
                                 response_len, bf16)
    return logp


class PolicyModel(torch.nn.Module):
    """What the training backend wraps: a causal LM whose forward returns response log-probs.

    Going through one module's forward lets DeepSpeed (ZeRO-3 hooks included) see the whole
    computation, LM head in fp32 included.
    """

    def __init__(self, lm: torch.nn.Module, bf16: bool):
        super().__init__()
        self.lm = lm
        self.bf16 = bf16

    def forward(self, input_ids, attention_mask, position_ids, response_len: int, with_entropy: bool = False):
        return token_logprobs(
            self.lm, input_ids, attention_mask, position_ids, response_len, self.bf16, with_entropy
        )

