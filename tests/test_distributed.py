"""The same recipe under `accelerate launch`: 2 processes with ZeRO-2 (gloo on CPU), ZeRO-3 in one.

accelerate's own DeepSpeed integration misreports ranks on CPU hosts, so "it finished" proves
nothing: these tests assert a real world size of 2, that the ranks scored different prompts, and
that the losses equal the one-process run's (same global mini-batches, per-prompt seeded sampling).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from alignment.logging import read_metrics
from alignment.backend import _free_port
from tests.support.recipes import run_align, run_two_nodes
from tests.support.recipes import toy_recipe

pytestmark = pytest.mark.slow
ACCELERATE = [str(Path(sys.executable).parent / "accelerate"), "launch"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("single")
    recipe = toy_recipe(folder, tiny_model)
    proc = run_align("train", str(recipe), env={"TOY_REWARD_LOG": str(folder / "scored")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return recipe, read_metrics(folder / "run" / "metrics.jsonl"), folder


def _same_losses(got: list[dict], want: list[dict]) -> None:
    got = {r["step"]: r for r in got if r["step"]}
    want = {r["step"]: r for r in want if r["step"]}
    assert sorted(got) == sorted(want) == [1, 2]
    for step in (1, 2):
        for key in ("loss", "grad_norm", "reward/mean", "kl"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_two_processes_zero2_match_one_process(reference, tmp_path):
    recipe, want, single = reference
    out = tmp_path / "run"
    proc = run_align(
        "train", str(recipe), f"output_dir={out}", "train.save_every=1",
        launcher=ACCELERATE + ["--config_file", "launch/zero2.yaml", "--num_processes", "2",
                               "--main_process_port", "0", "-m"],
        env={"TOY_REWARD_LOG": str(tmp_path / "scored")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/2, backend deepspeed-zero2" in proc.stderr
    state = json.loads((out / "checkpoints" / "step-1" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["backend"] == "deepspeed-zero2"

    # Each rank scored its own half of the prompts; together they scored what one process did.
    rank0 = (tmp_path / "scored.0").read_text().splitlines()
    rank1 = (tmp_path / "scored.1").read_text().splitlines()
    assert rank0 and rank1 and not set(rank0) & set(rank1)
    assert sorted(rank0 + rank1) == sorted((single / "scored.0").read_text().splitlines())

    _same_losses(read_metrics(out / "metrics.jsonl"), want)


def test_zero3_one_process_matches_plain_torch(reference, tmp_path):
    recipe, want, _ = reference
    out = tmp_path / "run"
    proc = run_align(
        "train", str(recipe), f"output_dir={out}",
        launcher=ACCELERATE + ["--config_file", "launch/zero3.yaml", "--num_processes", "1",
                               "--main_process_port", "0", "-m"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backend deepspeed-zero3" in proc.stderr
    _same_losses(read_metrics(out / "metrics.jsonl"), want)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "final").num_parameters() > 0


def test_deepspeed_launcher_two_processes_zero3(reference, tmp_path):
    """The `deepspeed` launcher passes --local_rank before the subcommand; ZeRO-3 over 2 ranks."""
    recipe, want, _ = reference
    out = tmp_path / "run"
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", "2",
                "--master_port", str(_free_port()), "--module"]
    proc = run_align("train", str(recipe), f"output_dir={out}", "train.deepspeed=launch/ds_zero3.json",
                     launcher=launcher)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "rank 0/2, backend deepspeed-zero3" in proc.stdout + proc.stderr
    _same_losses(read_metrics(out / "metrics.jsonl"), want)


def test_ppo_two_processes_zero2_match_one_process(tmp_path, tiny_model):
    """PPO's critic gets its own DeepSpeed engine and whitening uses global statistics: 2 ranks
    reproduce one process."""
    recipe = toy_recipe(tmp_path, tiny_model, trainer="ppo", ppo={"passes": 2, "critic_lr": 1e-3})
    assert run_align("train", str(recipe), f"output_dir={tmp_path / 'one'}").returncode == 0
    proc = run_align("train", str(recipe), f"output_dir={tmp_path / 'two'}",
                     launcher=ACCELERATE + ["--config_file", "launch/zero2.yaml", "--num_processes", "2",
                                            "--main_process_port", "0", "-m"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/2, backend deepspeed-zero2" in proc.stderr
    want = {r["step"]: r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if r["step"]}
    got = {r["step"]: r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if r["step"]}
    assert sorted(got) == sorted(want) == [1, 2]
    for step in (1, 2):
        for key in ("loss/policy", "loss/value", "reward/mean", "kl", "clip_frac"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4, abs=1e-6), (step, key)


# ---- two nodes on one host (issue 28) ------------------------------------------------------------
# Each launcher runs once per node with its node rank, as on a real cluster; the nodes meet through a
# static rendezvous on 127.0.0.1. Only global rank 0 writes (local rank 0 of node 1 must not).
BIN = Path(sys.executable).parent


def torchrun_two_nodes(port: int) -> list[list[str]]:
    """The torchrun line of node 0 and of node 1 (one process per node)."""
    return [[str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
             "--rdzv_backend", "static", "--master_addr", "127.0.0.1", "--master_port", str(port), "-m"]
            for rank in (0, 1)]


def test_two_torchrun_nodes_match_one_process(reference, tmp_path):
    """torchrun here; the deepspeed launcher's and accelerate's two-node lines run in tests/test_readme.py
    (the README's own commands: exit codes and a world size of 2), which keeps CI's slow tier in its time."""
    recipe, want, single = reference
    out = tmp_path / "run"
    args = ["train", str(recipe), f"output_dir={out}", "train.save_every=1", "train.deepspeed=launch/ds_zero2.json"]
    (rc0, out0), (rc1, out1) = run_two_nodes(torchrun_two_nodes(_free_port()), args,
                                             {"TOY_REWARD_LOG": str(tmp_path / "scored")})
    assert rc0 == 0 and rc1 == 0, (out0[-3000:], out1[-3000:])
    assert "rank 0/2, backend deepspeed-zero2" in out0, out0[-3000:]
    assert "rank 0/2" not in out1  # node 1's process is global rank 1: it logs warnings only, writes nothing
    state = json.loads((out / "checkpoints" / "step-1" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    # node 0 (global rank 0) and node 1 (global rank 1, local rank 0) each scored their own half
    rank0 = (tmp_path / "scored.0").read_text().splitlines()
    rank1 = (tmp_path / "scored.1").read_text().splitlines()
    assert rank0 and rank1 and sorted(rank0 + rank1) == sorted((single / "scored.0").read_text().splitlines())
    _same_losses(read_metrics(out / "metrics.jsonl"), want)


def test_the_builtin_model_is_converted_once_when_every_process_asks(tmp_path):
    """Ranks of every node ask for the builtin SmolLM2 at once on a fresh cache: one converts under a
    file lock, the others wait and load the finished folder."""
    import os
    import subprocess

    code = ("import logging; logging.basicConfig(level=logging.INFO); from alignment.models import builtin_smollm2; "
            "print(builtin_smollm2())")
    env = {**os.environ, "ALIGNMENT_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    folders = {out.strip().splitlines()[-1] for out, _ in results}
    assert folders == {str(tmp_path / "cache" / "smollm2-135m-instruct")}
    converted = sum("converting the embedded SmolLM2" in err for _, err in results)
    assert converted == 1 and (tmp_path / "cache" / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert not list((tmp_path / "cache").glob("*.tmp"))
