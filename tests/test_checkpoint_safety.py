"""Resuming never runs code from a checkpoint: every file is read with torch's weights-only
unpickler (plain torch, AdaLoRA and DeepSpeed states alike), and a planted file is refused by name."""

from __future__ import annotations

import os

import pytest
import torch

from tests.support.recipes import run_align, train_in_process
from tests.support.recipes import pairs_recipe


class Planted:
    """What an attacker would drop in a checkpoint: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


ADALORA = {"type": "adalora", "init_r": 4, "target_r": 2, "tinit": 0, "tfinal": 0, "deltaT": 1}


@pytest.mark.parametrize("case, overrides, planted", [
    ("torch", [], "optimizer.pt"),
    ("adalora", [f"peft.{k}={v}" for k, v in ADALORA.items()], "adalora.pt"),
    pytest.param("deepspeed", ["train.deepspeed=launch/ds_zero2.json"],
                 "deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt", marks=pytest.mark.slow),  # ~30 s
])
def test_resume_refuses_a_planted_checkpoint_file(tmp_path, tiny_model, case, overrides, planted):
    path = pairs_recipe(tmp_path, tiny_model, "reward_model")
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    if case == "deepspeed":  # DeepSpeed's own launch path
        proc = run_align("train", str(path), "train.max_steps=2", *overrides)
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        train_in_process(path, "train.max_steps=2", *overrides)
    checkpoint = out / "checkpoints" / "step-2"
    if case == "deepspeed":  # the weights-only reader takes DeepSpeed's real ZeRO states
        proc = run_align("train", str(path), "train.max_steps=3", "resume=true", *overrides)
        assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr[-3000:]
        checkpoint = out / "checkpoints" / "step-3"
    assert (checkpoint / planted).is_file()
    torch.save({"optimizer": Planted(marker), "scheduler": {}}, checkpoint / planted)
    proc = run_align("train", str(path), "train.max_steps=4", "resume=true", *overrides)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{checkpoint / planted}: refusing to load this checkpoint file" in proc.stderr
    assert "system" in proc.stderr  # the reason names the global it refused
    assert not marker.exists()
