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

from dataclasses import dataclass, field
from typing import Literal

from alignment.config import BaseConfig, bounded
from alignment.data import encode_conversations
from alignment.adapters import apply_peft
from alignment.logprobs import PolicyModel, pack, reference_logprobs
from alignment.models import load_causal_lm, reference_model
from alignment.offline import PairwiseTrainer


@dataclass
class DPOOptions:
    # sigmoid: DPO; r3m: R^3M-DPO (a sparse outlier per pair, l1-penalised)
    loss: Literal["sigmoid", "r3m"] = "sigmoid"
    beta: float = bounded(0.1, gt=0)  # DPO's beta: the implicit KL strength to the reference
    lam: float = 0.75  # R^3M lambda in (0, 1)
    max_length: int = bounded(512, ge=1)  # tokens of prompt + response (the prompt loses its start first)


@dataclass
class DPOConfig(BaseConfig):
    dpo: DPOOptions = field(default_factory=DPOOptions)


class DPOTrainer(PairwiseTrainer):
    config_class = DPOConfig
    section = "dpo"
    dropout = False
    caps_prompts = True

    def build_model(self):
        lm = load_causal_lm(self.cfg.model)
        self.reference = reference_model(lm, self.cfg.peft)
        lm = apply_peft(lm, self.cfg.peft, self.total_updates)
        self.module = PolicyModel(lm, self.cfg.train.bf16)
        return lm

    def margins(self, pairs):
        opts = self.cfg.dpo
        prompts, responses = encode_conversations(
            self.tokenizer, [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs],
            self.cfg.data.chat_template, opts.max_length, self.cfg.data.max_prompt_length)
        batch = pack(prompts, responses, self.tokenizer.pad_token_id, self.backend.device)
        r_len = batch["response_mask"].shape[1]
        mask = batch["response_mask"].float()
        logp, _ = self.backend(batch["input_ids"], batch["attention_mask"], batch["position_ids"], r_len)
        ref_logp = reference_logprobs(self.reference, self.model, batch, r_len, self.cfg.train.bf16)
        log_ratio = ((logp - ref_logp) * mask).sum(-1)
        n = len(pairs)
        return opts.beta * (log_ratio[:n] - log_ratio[n:]), int(batch["attention_mask"].sum())
