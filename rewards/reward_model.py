"""Scoring (prompt, response) pairs with a sequence-classification reward model.

Training (trainers/reward_model.py), the scoring server and in-process scoring all encode through
`encode_for_reward`, so a model is served exactly as it was trained:
- a tokenizer with a chat template (causal-LM backbones): the conversation rendered by the
  template, one sequence;
- otherwise (encoders such as MiniLM): the prompt text and the response text as a text pair
  (`[CLS] prompt [SEP] response [SEP]`).
Past `max_length` the prompt loses its start and the response stays whole: cutting the end would
score every response to a long prompt alike. The length a model was trained at is saved in its
config.json (`reward_max_length`) and is the one it is served at.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignment.data import as_messages, message_text
from alignment.logprobs import autocast
from alignment.models import with_pad_token


MAX_LENGTH_KEY = "reward_max_length"  # in a trained reward model's config.json: the length it was trained at


def left_truncated(tokenizer, texts: list[str], max_length: int, add_special_tokens: bool) -> dict[str, torch.Tensor]:
    """Right-padded encodings of `texts`, each cut to `max_length` from its start: a conversation loses
    its beginning (the prompt), never the response's end, where a causal model is read."""
    side, tokenizer.truncation_side = tokenizer.truncation_side, "left"
    try:
        return tokenizer(texts, add_special_tokens=add_special_tokens, padding=True, truncation=True,
                         max_length=max_length, return_tensors="pt")
    finally:
        tokenizer.truncation_side = side


def _pair_frame(tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """The special tokens an encoder puts around a text pair (before the first text, between the two,
    after the second) and their token types, read off a probe pair: fast tokenizers in transformers 5
    no longer build special tokens around given ids."""
    probe = tokenizer("a", "b")
    ids, types = probe["input_ids"], probe.get("token_type_ids") or [None] * len(probe["input_ids"])
    (a,), (b,) = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("a", "b"))
    i = ids.index(a)
    j = ids.index(b, i + 1)
    return [ids[:i], ids[i + 1:j], ids[j + 1:]], [types[:i], [types[i]], types[i + 1:j], [types[j]], types[j + 1:]]


def encode_text_pairs(tokenizer, firsts: list[str], seconds: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """An encoder's `[CLS] first [SEP] second [SEP]`, cut to `max_length`: the second text (the
    response) is kept whole and the first (the prompt) loses its start; only a second text longer than
    the whole budget loses its end."""
    (before, between, after), (t_before, t_first, t_between, t_second, t_after) = _pair_frame(tokenizer)
    budget = max_length - len(before) - len(between) - len(after)
    rows = []
    for first, second in zip(tokenizer(firsts, add_special_tokens=False)["input_ids"],
                             tokenizer(seconds, add_special_tokens=False)["input_ids"]):
        second = second[:budget]
        first = first[len(first) - min(len(first), budget - len(second)):]
        row = {"input_ids": before + first + between + second + after,
               "token_type_ids": t_before + t_first * len(first) + t_between + t_second * len(second) + t_after}
        rows.append(row if None not in t_first else {"input_ids": row["input_ids"]})  # a model without token types
    return tokenizer.pad(rows, padding=True, return_tensors="pt")


def encode_for_reward(tokenizer, prompts: list, responses: list, max_length: int = 512) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask (and token_type_ids for encoders) of the pairs; an
    over-long pair keeps its response whole and loses the start of its prompt."""
    if tokenizer.chat_template:
        texts = [tokenizer.apply_chat_template(as_messages(p, r), tokenize=False) for p, r in zip(prompts, responses)]
        return left_truncated(tokenizer, texts, max_length, add_special_tokens=False)
    return encode_text_pairs(tokenizer, [message_text(p) for p in prompts], [message_text(r) for r in responses],
                             max_length)


def encode_texts(tokenizer, texts: list[str], max_length: int = 512) -> dict[str, torch.Tensor]:
    """Already-formatted full texts (OpenRLHF's `/get_reward` queries), cut from the start like the
    pairs: a chat-template model's text carries its own special tokens; an encoder's gets [CLS]/[SEP]."""
    return left_truncated(tokenizer, texts, max_length, add_special_tokens=not tokenizer.chat_template)


class RewardForward(torch.nn.Module):
    """Rewards (fp32) of encoded texts under bf16 autocast: what training wraps and scoring runs."""

    def __init__(self, model: torch.nn.Module, bf16: bool):
        super().__init__()
        self.model = model
        self.bf16 = bf16

    def forward(self, **encoded) -> torch.Tensor:
        with autocast(self.bf16):
            logits = self.model(**encoded).logits
        return logits[:, 0].float()


class RewardScorer:
    """A trained reward model in memory; `score` is what `align serve-rm` answers with."""

    def __init__(self, model, tokenizer, name: str = "", batch_size: int = 32, max_length: int | None = None,
                 bf16: bool = False):
        self.rewards = RewardForward(model.eval(), bf16)
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        # the length the model was trained at (saved in its config), so it is served as it was trained
        self.max_length = max_length or getattr(model.config, MAX_LENGTH_KEY, None) or 512

    @classmethod
    def from_dir(cls, path: str | Path, **kwargs) -> RewardScorer:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = with_pad_token(AutoTokenizer.from_pretrained(path))
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        if torch.cuda.is_available():
            model = model.cuda()
        return cls(model, tokenizer, name=kwargs.pop("name", Path(path).name), **kwargs)

    @property
    def device(self):
        return next(self.rewards.parameters()).device

    @torch.no_grad()
    def _run(self, batch: dict[str, torch.Tensor]) -> list[float]:
        return self.rewards(**{k: v.to(self.device) for k, v in batch.items()}).cpu().tolist()

    def score(self, prompts: list, responses: list) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        out: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            end = start + self.batch_size
            out += self._run(encode_for_reward(self.tokenizer, prompts[start:end], responses[start:end],
                                               self.max_length))
        return out

    def score_texts(self, texts: list[str]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            out += self._run(encode_texts(self.tokenizer, texts[start:start + self.batch_size], self.max_length))
        return out
