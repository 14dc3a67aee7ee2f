"""AdaLoRA: the budget is driven once per optimizer step (plain, accumulated, ZeRO-2), moves rank to
the layer that needs it, and works on every trainer; ZeRO-3 is refused; resume is exact."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alignment.logging import read_metrics
from tests.support import adalora_toy as toy
from tests.support import REPO
from tests.support.recipes import run_align, train_in_process
from tests.support.recipes import toy_recipe
from tests.support.recipes import pairs_recipe, write_demos

FINAL_PHASE = toy.STEPS - toy.PEFT.tfinal  # optimizer step at which the rank pattern is fixed
TARGET = toy.PEFT.target_r * toy.LAYERS


def _check_allocation(result: dict) -> None:
    assert all(total == TARGET for total in result["history"][FINAL_PHASE:]), result["history"]
    assert sum(result["ranks"].values()) == TARGET
    others = [r for layer, r in result["ranks"].items() if layer != str(toy.CHANGED)]
    assert result["ranks"][str(toy.CHANGED)] > max(others), result["ranks"]
    # Before the final phase the budget shrinks on the cubic schedule (masked lambdas may revive
    # between re-allocations): the first re-allocation after tinit already cuts below the start.
    assert min(result["history"][toy.PEFT.tinit:FINAL_PHASE]) < toy.PEFT.init_r * toy.LAYERS


@pytest.mark.parametrize("accumulation", [1, 2])
def test_budget_reaches_target_and_goes_to_the_layer_that_changes(accumulation):
    _check_allocation(toy.run(accumulation=accumulation))


def test_without_the_budget_update_every_layer_keeps_its_initial_rank():
    result = toy.run(allocate=False)
    assert result["ranks"] == {str(i): toy.PEFT.init_r for i in range(toy.LAYERS)}


# slow tier: the fast tier stays under 10 minutes on an AVX2-only CPU (issue 26)
@pytest.mark.slow
def test_two_process_zero2_launch_allocates_like_one_process(tmp_path):
    out = tmp_path / "zero2.json"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "tests/support/adalora_toy.py", str(out),
                           "--deepspeed", "launch/ds_zero2.json"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    _check_allocation(result)
    assert result["ranks"] == toy.run()["ranks"]


def test_zero3_is_refused_with_a_clear_error():
    from alignment.adapters import apply_peft
    from alignment.backend import Backend
    from alignment.config import ConfigError, TrainConfig

    model = apply_peft(toy.Branches(), toy.PEFT, total_steps=toy.STEPS)
    with pytest.raises(ConfigError, match="peft.type=adalora does not run under ZeRO-3"):  # before DeepSpeed starts
        Backend(model, TrainConfig(deepspeed=str(REPO / "launch" / "ds_zero3.json"), bf16=False), 8)


ADALORA = {"type": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "alpha": 8}


def _online_recipe(tmp_path, model, trainer):
    return toy_recipe(tmp_path, model, trainer=trainer, peft=ADALORA, train={"max_steps": 3})


def _masks_follow_importance(checkpoint: Path) -> None:
    """The singular triplets kept at the checkpoint's re-allocation are the most important ones by the
    scores saved with it: peft's triplet score, s(lambda_k) + mean_j s(P_jk) + mean_j s(Q_kj), with
    s = EMA sensitivity x EMA uncertainty of |w * grad|."""
    import torch

    state = torch.load(checkpoint / "adalora.pt", weights_only=True)
    pattern, sensitivity, uncertainty = state["rank_pattern"], state["exp_avg_ipt"], state["exp_avg_unc"]
    assert pattern, "no re-allocation before the checkpoint"
    kept, masked = [], []
    for masked_name, keep in pattern.items():  # the pattern's names may lack the adapter's
        lam = next(k for k in sensitivity if k == masked_name or k.startswith(masked_name + "."))
        score = {part: sensitivity[lam.replace("lora_E", part)] * uncertainty[lam.replace("lora_E", part)]
                 for part in ("lora_E", "lora_A", "lora_B")}
        triplets = score["lora_E"].view(-1) + score["lora_A"].mean(1) + score["lora_B"].mean(0)
        for value, k in zip(triplets.tolist(), keep):
            (kept if k else masked).append(value)
    assert kept and masked and min(kept) > max(masked) > 0, (min(kept), max(masked))


@pytest.mark.parametrize("trainer", ["sft", "reward_model", "dpo", "pmd", "ppo"])
def test_every_trainer_drives_the_budget(tmp_path, tiny_model, trainer):
    # Online: 3 steps x 2 mini-batches = 6 optimizer steps; offline: 6 steps. Either way the budget is
    # re-allocated at optimizer steps 2 and 3 (between tinit and total - tfinal) and fixed from step 4;
    # the checkpoint after optimizer step 3 holds the scores and rank pattern of that re-allocation.
    if trainer in ("pmd", "ppo"):
        path, checkpoint = _online_recipe(tmp_path, tiny_model, trainer), "step-2"
        args = ["train.save_every=2"]
    else:
        data = write_demos(tmp_path) if trainer == "sft" else {}
        path = pairs_recipe(tmp_path, tiny_model, trainer, peft=ADALORA, data=data, train={"max_steps": 6})
        checkpoint, args = "step-4", ["train.save_every=4"]
    proc = run_align("train", str(path), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    matrices = 14  # tiny Llama: 2 layers x (q, k, v, o, gate, up, down)
    assert rows[0]["adalora/budget"] > rows[-1]["adalora/budget"] == ADALORA["target_r"] * matrices
    assert rows[-1]["adalora/rank"] == ADALORA["target_r"] * matrices
    _masks_follow_importance(tmp_path / "run" / "checkpoints" / checkpoint)
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_ppo_with_adalora_resumes_exactly(tmp_path, tiny_model):
    """Policy, critic and both budgets come back from the checkpoint: steps 3-4 match the whole run."""
    path = _online_recipe(tmp_path, tiny_model, "ppo")
    whole, part = tmp_path / "whole", tmp_path / "part"
    args = [path, "train.max_steps=4", "train.save_every=2"]
    train_in_process(*args, f"output_dir={whole}")
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step-2", part / "checkpoints" / "step-2")  # as if killed after step 2
    train_in_process(*args, f"output_dir={part}", "resume=true")
    want = {r["step"]: r for r in read_metrics(whole / "metrics.jsonl")}
    got = {r["step"]: r for r in read_metrics(part / "metrics.jsonl")}
    for step in (3, 4):
        for key in ("loss/policy", "loss/value", "reward/mean", "adalora/rank", "kl"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_orthogonality_penalty_is_added_to_losses_computed_outside_the_model():
    """peft adds it only to `outputs.loss`; our losses never go through that, so the backend adds
    orth_reg_weight * mean(||A A^T - I||_F + ||B^T B - I||_F) (peft's unsquared norms) itself."""
    import torch

    from alignment.backend import Backend
    from alignment.config import TrainConfig
    from alignment.adapters import apply_peft

    model = apply_peft(toy.Branches(), toy.PEFT, total_steps=toy.STEPS)
    backend = Backend(model, TrainConfig(bf16=False), 4)
    backend.backward((backend(torch.randn(4, toy.LAYERS * toy.WIDTH)) * 0).sum())  # only the penalty is left
    factors = [(n, p) for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
    expected = torch.stack([torch.linalg.matrix_norm((p @ p.T if "lora_A" in n else p.T @ p) - torch.eye(toy.PEFT.init_r))
                            for n, p in factors]).mean() * toy.PEFT.orth_reg_weight
    grads = torch.autograd.grad(expected, [p for _, p in factors])
    for (n, p), g in zip(factors, grads):
        assert p.grad is not None and torch.allclose(p.grad, g, atol=1e-6), n
