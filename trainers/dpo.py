"""DPO (`trainer: dpo`) with `dpo.loss: sigmoid` (Rafailov et al.) or `r3m` (R^3M-DPO).

    align train configs/dpo_hhh.yaml dpo.loss=r3m dpo.lam=0.75

Margin m = beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))), sequence
log-probs summed over response tokens (fp32 LM head). `sigmoid` is -log sigmoid(m); `r3m` adds the
closed-form outlier variable after the beta scaling (the paper's section 3.4), logs
`r3m/outlier_frac` and writes outliers.jsonl. The reference is the initial policy: with LoRA, the
same model with its adapters switched off (no second copy); without, a frozen copy. Chosen and
rejected responses go through one forward.

We build on our own loop rather than TRL's DPOTrainer so that checkpoints, resume, metrics and the
DeepSpeed launches are the same as every other trainer's; the loss itself is TRL's `sigmoid` one.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Literal

import torch

from alignment.config import BaseConfig, ConfigError
from alignment.data import encode_prompt, encode_response, fit_length
from alignment.models import PolicyModel, apply_peft, load_causal_lm, pack, token_logprobs
from alignment.offline import PairwiseTrainer


@dataclass
class DPOOptions:
    loss: Literal["sigmoid", "r3m"] = "sigmoid"
    beta: float = 0.1
    lam: float = 0.75  # R^3M lambda in (0, 1)
    max_length: int = 512


@dataclass
class DPOConfig(BaseConfig):
    dpo: DPOOptions = field(default_factory=DPOOptions)


class DPOTrainer(PairwiseTrainer):
    config_class = DPOConfig
    dropout = False

    def build_model(self):
        opts = self.cfg.dpo
        if opts.loss == "r3m" and not 0 < opts.lam < 1:
            raise ConfigError(f"dpo.lam: R^3M's lambda must lie in (0, 1), got {opts.lam}")
        if opts.beta <= 0:
            raise ConfigError(f"dpo.beta: must be positive, got {opts.beta}")
        lm = load_causal_lm(self.cfg.model)
        self.reference = None
        if self.cfg.peft.type == "none":
            self.reference = copy.deepcopy(lm).eval().requires_grad_(False)
        lm = apply_peft(lm, self.cfg.peft)
        self.module = PolicyModel(lm, self.cfg.train.bf16)
        return lm

    def loss_name(self) -> str:
        return self.cfg.dpo.loss

    def loss_params(self) -> dict:
        return {"lam": self.cfg.dpo.lam} if self.cfg.dpo.loss == "r3m" else {}

    def _reference_logprobs(self, batch: dict, r_len: int) -> torch.Tensor:
        if self.reference is not None:
            self.reference.to(self.backend.device)
            model, ctx = self.reference, contextlib.nullcontext()
        else:
            model, ctx = self.model, self.model.disable_adapter()
        with torch.no_grad(), ctx:
            lp, _ = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"], r_len,
                                   self.cfg.train.bf16)
        return lp

    def margins(self, pairs):
        opts, chat = self.cfg.dpo, self.cfg.data.chat_template
        prompts, responses = [], []
        for side in ("chosen", "rejected"):
            for p in pairs:
                prompt_ids = encode_prompt(self.tokenizer, p.prompt, chat)
                response_ids = encode_response(self.tokenizer, p.prompt, getattr(p, side), chat, prompt_ids)
                prompt_ids, response_ids = fit_length(prompt_ids, response_ids, opts.max_length)
                prompts.append(prompt_ids)
                responses.append(response_ids)
        batch = pack(prompts, responses, self.tokenizer.pad_token_id, self.backend.device)
        r_len = batch["response_mask"].shape[1]
        mask = batch["response_mask"].float()
        logp, _ = self.backend(batch["input_ids"], batch["attention_mask"], batch["position_ids"], r_len)
        log_ratio = ((logp - self._reference_logprobs(batch, r_len)) * mask).sum(-1)
        n = len(pairs)
        return opts.beta * (log_ratio[:n] - log_ratio[n:]), int(batch["attention_mask"].sum())
