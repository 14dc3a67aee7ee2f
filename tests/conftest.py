"""Shared fixtures: tiny random Llama models (head_dim 64; a policy and a reward model) with SmolLM2's real
tokenizer, built locally."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(min(2, os.cpu_count() or 1))


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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def run_align(*args: str, env: dict | None = None, timeout: int = 600, launcher: list[str] | None = None):
    """Run `python -m alignment ARGS`, or `LAUNCHER alignment ARGS` where the launcher ends with its
    own module flag (`accelerate launch ... -m`, `deepspeed ... --module`); returns CompletedProcess."""
    cmd = (launcher or [sys.executable, "-m"]) + ["alignment", *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


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


@pytest.fixture(scope="session")
def rm_dir(tmp_path_factory) -> Path:
    return tiny_reward_model(tmp_path_factory.mktemp("tiny-rm"))


@pytest.fixture(scope="module")
def scorer(rm_dir):
    """In-process reference scoring of the tiny reward model, on one thread like the test servers."""
    from rewards.reward_model import RewardScorer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield RewardScorer.from_dir(rm_dir)
    torch.set_num_threads(threads)
