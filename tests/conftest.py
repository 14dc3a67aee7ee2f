"""Shared fixtures: the tiny models of tests/support/tiny_models.py, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.support.tiny_models import tiny_llama, tiny_reward_model

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


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
