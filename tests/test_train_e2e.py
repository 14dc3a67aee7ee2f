"""End-to-end `align train` runs on a tiny local model: the output contract, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from alignment.logging import read_metrics
from tests.support import REPO
from tests.support.recipes import run_align
from tests.support.recipes import toy_recipe

SHARED_METRICS = {
    "loss", "lr", "grad_norm", "perf/tokens_per_s", "time/rollout_s", "time/train_s", "time/sync_s",
    "sync/logprob_err", "reward/mean", "reward/std", "kl", "entropy", "response_length/mean",
    "rollout/logprob_diff",
}


def test_train_writes_the_output_contract(tmp_path, tiny_model):
    recipe = toy_recipe(tmp_path, tiny_model)
    out = tmp_path / "out"
    proc = run_align("train", str(recipe), f"output_dir={out}", "train.max_steps=3", "train.save_every=2",
                     "rollout.n=3")
    assert proc.returncode == 0, proc.stderr[-3000:]

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["output_dir"] == str(out) and config["train"]["max_steps"] == 3 and config["rollout"]["n"] == 3
    assert config["algo"] == {"advantage": "rloo", "policy_loss": "pmd", "clip": 0.2, "tau": 0.1, "kl_coef": 0.0,
                              "kl_estimator": "k3"}  # defaults are resolved into the file

    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for row in steps:
        assert SHARED_METRICS <= set(row), SHARED_METRICS - set(row)
        assert row["sync/logprob_err"] < 1e-3
    assert "eval/reward" in steps[-1]

    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3"]
    assert (out / "checkpoints" / "step-2" / "model.safetensors").is_file()
    assert (out / "checkpoints" / "step-2" / "optimizer.pt").is_file()
    assert (out / "report.png").stat().st_size > 10_000

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.num_hidden_layers == 2
    assert (out / "final" / "tokenizer_config.json").is_file()


def _losses(out):
    return {r["step"]: (r["loss"], r["grad_norm"], r["kl"]) for r in read_metrics(out / "metrics.jsonl") if r["step"]}


# slow tier: the fast tier stays under 10 minutes on an AVX2-only CPU (issue 26)
@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, tiny_model):
    """Kill -9 after the step-2 checkpoint; resume=true gives the uninterrupted run's later steps."""
    steps = ["train.max_steps=5", "train.save_every=2", "train.lr=3e-3"]
    recipe = toy_recipe(tmp_path, tiny_model)
    straight = tmp_path / "straight"
    assert run_align("train", str(recipe), f"output_dir={straight}", *steps).returncode == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "alignment", "train", str(recipe), f"output_dir={killed}", *steps,
           "train.save_every=1"]  # a checkpoint every step: the kill lands mid-run, after some of them
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-2").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its step-2 checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(int(p.name[5:]) for p in (killed / "checkpoints").glob("step-*") if p.name[5:].isdigit())
    assert done and max(done) < 5, f"the kill came too late: {done}"
    for step in done:  # every complete checkpoint is whole
        assert (killed / "checkpoints" / f"step-{step}" / "trainer_state.json").is_file()

    again = run_align("train", str(recipe), f"output_dir={killed}", *steps)
    assert again.returncode != 0 and "resume=true" in again.stderr  # refuses to overwrite without resume

    resumed = run_align("train", str(recipe), f"output_dir={killed}", *steps, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _losses(straight), _losses(killed)
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step in range(max(done) + 1, 6):  # steps run after the resume match the uninterrupted run
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-7), step
    assert json.loads((killed / "checkpoints" / "step-5" / "trainer_state.json").read_text())["step"] == 5


def test_lora_run_resumes_and_saves_a_merged_model(tmp_path, tiny_model):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from align.cli import main

    recipe = toy_recipe(tmp_path, tiny_model, peft={"type": "lora", "r": 4, "alpha": 8})
    out = tmp_path / "lora"
    assert main(["train", str(recipe), f"output_dir={out}", "train.max_steps=1", "train.save_every=1"]) == 0
    assert (out / "checkpoints" / "step-1" / "adapter_model.safetensors").is_file()
    assert main(["train", str(recipe), f"output_dir={out}", "train.max_steps=2", "resume=true"]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1, 2]
    assert all(r["sync/logprob_err"] < 1e-3 for r in read_metrics(out / "metrics.jsonl") if r["step"])

    # final/ is a plain transformers model with the adapters merged in; final/adapter keeps them.
    adapter = load_file(out / "final" / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    merged = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all("proj" in k for k in changed)
