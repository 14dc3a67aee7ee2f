"""Supervised fine-tuning (`trainer: sft`) on demonstrations.

    align train configs/sr_ppo_smollm2.yaml    (its stage 1; SFT alone: trainer: sft with data.path)

Rows are `{"prompt", "completion"}` or `{"messages": [...]}` (the last assistant message is the
target). The loss is the mean negative log-likelihood of the completion tokens (the prompt is
context only, TRL's `completion_only_loss`), token-averaged over the batch; the chat template's
end-of-turn token is part of the target so the model learns to stop. Held-out: `eval/loss`
(per-token NLL). Later methods start from its `final/` (Self-Rewarding PPO's pi_SFT).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignment.config import BaseConfig
from alignment.data import encode_conversations, load_demonstrations
from alignment.adapters import apply_peft
from alignment.logprobs import PolicyModel, pack
from alignment.models import load_causal_lm
from alignment.offline import OfflineTrainer
from alignment.algos import masked_mean


@dataclass
class SFTOptions:
    max_length: int = 1024  # tokens of prompt + completion; the loss is on the completion only


@dataclass
class SFTConfig(BaseConfig):
    sft: SFTOptions = field(default_factory=SFTOptions)


class SFTTrainer(OfflineTrainer):
    config_class = SFTConfig
    eval_keys = ("loss",)
    caps_prompts = True

    def load_data(self):
        return load_demonstrations(self.cfg.data, self.cfg.seed)

    def build_model(self):
        lm = apply_peft(load_causal_lm(self.cfg.model), self.cfg.peft, self.total_updates)
        self.module = PolicyModel(lm, self.cfg.train.bf16)
        return lm

    def encode(self, demos) -> tuple[list[list[int]], list[list[int]]]:
        """Prompt (context) and completion (target) token ids of each row."""
        return encode_conversations(self.tokenizer, [d.prompt for d in demos], [d.completion for d in demos],
                                    self.cfg.data.chat_template, self.cfg.sft.max_length, self.cfg.data.max_prompt_length)

    def _token_nll(self, demos):
        prompts, responses = self.encode(demos)
        batch = pack(prompts, responses, self.tokenizer.pad_token_id, self.backend.device)
        logp, _ = self.backend(batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                               batch["response_mask"].shape[1])
        return -logp, batch["response_mask"].float(), int(batch["attention_mask"].sum())

    def loss(self, demos):
        nll, mask, tokens = self._token_nll(demos)
        return masked_mean(nll, mask), {"tokens": tokens}

    def eval_sums(self, demos):
        # Token-level: the held-out loss is total NLL over total target tokens, over all ranks.
        nll, mask, _ = self._token_nll(demos)
        return {"count": float(mask.sum()), "loss": float((nll * mask).sum())}
