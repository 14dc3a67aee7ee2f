"""Tiny random Llama models (head_dim 64) with SmolLM2's real tokenizer, built locally: a policy and a
reward model."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama(folder: Path, seed: int = 0, layers: int = 2, init_range: float = 0.02) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from alignment.models import builtin_smollm2

    tokenizer = AutoTokenizer.from_pretrained(builtin_smollm2())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=init_range,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_reward_model(folder: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from alignment.models import builtin_smollm2

    tokenizer = AutoTokenizer.from_pretrained(builtin_smollm2())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, num_labels=1,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # the default init (std 0.02) gives rewards too alike to tell results apart
        model.score.weight.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_chat_setup(model_dir: Path):
    """(tokenizer, model in eval mode, two chat prompts' token ids) of a tiny model: the engine tests' inputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True)["input_ids"]
               for q in ["What is 2+2?", "Tell me a longer story about a cat and a dog, please."]]
    return tokenizer, model, prompts
