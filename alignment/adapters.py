"""Adapters: LoRA / AdaLoRA wrapping (peft), merging them into full weights for the engine and for
export, and AdaLoRA's rank budget.

AdaLoRA's rank budget, driven once per optimizer step by the training backend.

peft's `AdaLoraModel.update_and_allocate(step)` scores every singular triplet (P_k, lambda_k, Q_k)
from |w * grad| (EMA-smoothed sensitivity times uncertainty) and zeroes the lambda_k of the least
important ones down to the cubic budget schedule. Nothing calls it for you (HF Trainer and TRL do
not), it needs the gradients, and it must run once per optimizer step (Zhang et al., ICLR 2023, Algorithm 1).
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
from transformers import PreTrainedModel

from alignment.config import ConfigError, PeftConfig


def apply_peft(model: PreTrainedModel, cfg: PeftConfig, total_steps: int, modules_to_save: list[str] | None = None):
    """LoRA or AdaLoRA adapters; `modules_to_save` are trained in full (a reward model's fresh score
    head). `total_steps` is the number of optimizer steps the run will take: AdaLoRA's budget
    schedule is defined over it."""
    if cfg.type == "none":
        return model
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    common = dict(lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                  modules_to_save=modules_to_save or None)
    if cfg.type == "lora":
        return get_peft_model(model, LoraConfig(r=cfg.r, bias="none", **common))
    if not 0 < cfg.target_r <= cfg.init_r:
        raise ConfigError(f"peft.target_r ({cfg.target_r}) must lie in [1, peft.init_r = {cfg.init_r}]")
    if cfg.deltaT < 1:
        raise ConfigError(f"peft.deltaT: must be at least 1, got {cfg.deltaT}")
    if not 0 <= cfg.tinit < total_steps - cfg.tfinal:
        raise ConfigError(f"peft.tinit ({cfg.tinit}) and peft.tfinal ({cfg.tfinal}) leave no budget-reduction "
                          f"phase in this run's {total_steps} optimizer steps: need tinit < {total_steps} - tfinal")
    adalora = AdaLoraConfig(init_r=cfg.init_r, target_r=cfg.target_r, tinit=cfg.tinit, tfinal=cfg.tfinal,
                            deltaT=cfg.deltaT, beta1=cfg.beta1, beta2=cfg.beta2, orth_reg_weight=cfg.orth_reg_weight,
                            total_step=total_steps, **common)
    return get_peft_model(model, adalora)


def hf_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model under a PEFT wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full weights in transformers names, LoRA deltas added, without touching the trainer's copy.

    PEFT's merge_adapter()/unmerge_adapter() would round-trip the base weights through an add and a
    subtract, which drifts in floating point over many syncs; we add the delta into a fresh tensor.
    """
    base = hf_model(model)
    state = {}
    for name, tensor in base.state_dict().items():
        if "lora_" in name or ".ranknum." in name or ".original_module." in name:
            continue  # LoRA factors are merged below; a fully trained module's copy replaces its original
        for adapter in getattr(model, "peft_config", {}):
            name = name.replace(f".modules_to_save.{adapter}.", ".")
        state[name.replace(".base_layer.", ".")] = tensor
    for name, module in base.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "active_adapters"):
            key = f"{name}.weight"
            weight = state[key]
            for adapter in module.active_adapters:
                if adapter in getattr(module, "lora_A", {}):
                    weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            state[key] = weight
    return state



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
