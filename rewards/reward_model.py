"""Scoring (prompt, response) pairs with a sequence-classification reward model.

Training (trainers/reward_model.py), the scoring server and in-process scoring all encode through
`encode_for_reward`, so a model is served exactly as it was trained:
- a tokenizer with a chat template (causal-LM backbones): the conversation rendered by the
  template, one sequence;
- otherwise (encoders such as MiniLM): the prompt text and the response text as a text pair
  (`[CLS] prompt [SEP] response [SEP]`), truncated longest-first.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignment.data import as_messages, message_text
from alignment.models import autocast


def encode_for_reward(tokenizer, prompts: list, responses: list, max_length: int = 512) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask (and token_type_ids for encoders) of the pairs."""
    if tokenizer.chat_template:
        texts = [tokenizer.apply_chat_template(as_messages(p, r), tokenize=False) for p, r in zip(prompts, responses)]
        return tokenizer(texts, add_special_tokens=False, padding=True, truncation=True, max_length=max_length,
                         return_tensors="pt")
    return tokenizer([message_text(p) for p in prompts], [message_text(r) for r in responses], padding=True,
                     truncation="longest_first", max_length=max_length, return_tensors="pt")


def encode_texts(tokenizer, texts: list[str], max_length: int = 512) -> dict[str, torch.Tensor]:
    """Already-formatted full texts (OpenRLHF's `/get_reward` queries): a chat-template model's text
    carries its own special tokens; an encoder's gets [CLS]/[SEP]."""
    return tokenizer(texts, add_special_tokens=not tokenizer.chat_template, padding=True, truncation=True,
                     max_length=max_length, return_tensors="pt")


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

    def __init__(self, model, tokenizer, name: str = "", batch_size: int = 32, max_length: int = 512,
                 bf16: bool = False):
        self.rewards = RewardForward(model.eval(), bf16)
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.max_length = max_length

    @classmethod
    def from_dir(cls, path: str | Path, **kwargs) -> RewardScorer:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
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
