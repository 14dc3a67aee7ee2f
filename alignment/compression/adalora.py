"""AdaLoRA's rank budget, driven once per optimizer step by the training backend.

peft's `AdaLoraModel.update_and_allocate(step)` scores every singular triplet (P_k, lambda_k, Q_k)
from |w * grad| (EMA-smoothed sensitivity times uncertainty) and zeroes the lambda_k of the least
important ones down to the cubic budget schedule. Nothing calls it for you (HF Trainer and TRL do
not), it needs the gradients, and it must run once per optimizer step (methods.md section 7g).
The backend calls `AdaLoRABudget` at every optimizer step, with the optimizer-step counter:

- plain torch / DDP: after `optimizer.step()` and before `zero_grad()` (peft's order), so the mask
  holds in the next forward;
- DeepSpeed ZeRO-1/2: `engine.step()` steps and clears the gradients in one call, and writes the
  parameters back from its own fp32 master partitions. So the scores are updated before the step
  from the full gradients DeepSpeed assembles (`safe_get_full_grad`; peft only does that itself
  when a transformers DeepSpeed config is registered, which our direct `deepspeed.initialize` does
  not), and after the step the masked lambdas are zeroed again in both the module and the master
  copy (`safe_set_full_fp32_param`), which would otherwise bring them back;
- ZeRO-3 is refused (the backend raises): its parameters are partitioned into flat shards, so the
  per-matrix scores and masks would need gathered copies and a scatter of the masks, which we have
  not built. Use ZeRO-2 (the adapters are small; ZeRO-3 saves little on them) or plain LoRA.

The orthogonality penalty orth_reg_weight * mean(||A A^T - I||_F + ||B^T B - I||_F) (peft's
unsquared norms) is added by the backend to every loss: our losses are computed outside the model,
where peft's forward would skip it.
"""

from __future__ import annotations

import torch


def find_adalora(module: torch.nn.Module):
    """The peft AdaLoraModel inside `module`, or None."""
    from peft.tuners.adalora import AdaLoraModel

    return next((m for m in module.modules() if isinstance(m, AdaLoraModel)), None)


class AdaLoRABudget:
    def __init__(self, adalora, deepspeed: bool):
        self.model = adalora  # peft AdaLoraModel
        self.deepspeed = deepspeed
        self.adapter = adalora.trainable_adapter_name
        self.config = adalora.peft_config[self.adapter]
        self.step = 0  # optimizer steps taken
        self.lambdas = {n: p for n, p in adalora.model.named_parameters() if f"lora_E.{self.adapter}" in n}
        self.factors = [(n, p) for n, p in adalora.model.named_parameters()
                        if (f"lora_A.{self.adapter}" in n or f"lora_B.{self.adapter}" in n)]
        self.adapter_params = [p for _, p in self.factors] + list(self.lambdas.values())
        self._masks: dict[str, torch.Tensor] = {}

    # ---- the per-step schedule ---------------------------------------------------------------
    @torch.no_grad()
    def before_step(self) -> None:
        """DeepSpeed only: update scores and masks while the (partitioned) gradients still exist."""
        if not self.deepspeed:
            return
        from deepspeed.utils import safe_get_full_grad

        for p in self.adapter_params:  # peft reads p.grad; DeepSpeed keeps reduced gradients in its buffers
            p.grad = safe_get_full_grad(p)
        self.model.update_and_allocate(self.step)
        for p in self.adapter_params:
            p.grad = None
        # Which lambdas this step masked: none between re-allocations (masked ones may revive then).
        _, reallocated = self.model.rankallocator.budget_schedule(self.step)
        final = self.step >= self.config.total_step - self.config.tfinal
        pattern = self.config.rank_pattern
        self._masks = {}
        if (reallocated or final) and pattern:
            for n, p in self.lambdas.items():
                keep = pattern[n] if n in pattern else pattern[n.replace(f".{self.adapter}", "")]
                self._masks[n] = ~torch.tensor(keep, dtype=torch.bool, device=p.device).view_as(p)

    @torch.no_grad()
    def after_step(self) -> None:
        if self.deepspeed:
            from deepspeed.utils import safe_set_full_fp32_param

            for n, mask in self._masks.items():
                p = self.lambdas[n]
                p.masked_fill_(mask, 0.0)
                safe_set_full_fp32_param(p, p.detach().clone())
        else:
            self.model.update_and_allocate(self.step)
        self.step += 1

    def orth_regularizer(self) -> torch.Tensor:
        terms = []
        for n, p in self.factors:
            cov = p @ p.T if "lora_A." in n else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
        return self.config.orth_reg_weight * torch.stack(terms).mean()

    # ---- what is logged and checkpointed -----------------------------------------------------
    def ranks(self) -> dict[str, int]:
        """Non-zero singular values per adapted matrix."""
        return {n.replace(f".lora_E.{self.adapter}", ""): int((p != 0).sum()) for n, p in self.lambdas.items()}

    def metrics(self) -> dict[str, float]:
        """`adalora/budget`: the schedule's budget at this step; `adalora/rank`: non-zero lambdas now."""
        budget, _ = self.model.rankallocator.budget_schedule(max(self.step - 1, 0))
        return {"adalora/budget": float(budget), "adalora/rank": float(sum(self.ranks().values()))}

    def state_dict(self) -> dict:
        """Step, scores, rank pattern and the trainable weights at full rank (peft's save_pretrained
        writes adapters cut to the rank pattern, which cannot be trained on)."""
        allocator = self.model.rankallocator
        weights = {n: p.detach().cpu() for n, p in self.model.model.named_parameters() if p.requires_grad}
        return {"step": self.step, "rank_pattern": self.config.rank_pattern, "weights": weights,
                "ipt": allocator.ipt, "exp_avg_ipt": allocator.exp_avg_ipt, "exp_avg_unc": allocator.exp_avg_unc}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        allocator = self.model.rankallocator
        params = dict(self.model.model.named_parameters())
        for n, value in state["weights"].items():
            params[n].copy_(value)
        self.step = state["step"]
        self.config.rank_pattern = state["rank_pattern"]
        allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = (
            state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"])
