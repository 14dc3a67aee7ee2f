"""Issue 27's "done when": a TRL user's own data, reward functions, tracker and checkpoint limit in one
GRPO run (configs/grpo_trl_rewards.yaml, shrunk onto the tiny model), and TRL's three preference layouts
training DPO identically."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from align.cli import build_config
from alignment.logging import read_metrics
from tests.support import REPO

SHRINK = ["train.max_steps=3", "train.save_every=1", "train.log_samples_every=1", "train.mini_batches=1",
          "rollout.n=2", "rollout.max_new_tokens=6", "data.eval_size=2"]


def _train(recipe: str, *overrides: str):
    trainer_cls, cfg = build_config(str(REPO / recipe), list(overrides))
    trainer_cls(cfg).train()


def test_grpo_on_a_save_to_disk_folder_with_trl_reward_functions(tmp_path, tiny_model, monkeypatch):
    import datasets

    from configs.rewards.arithmetic import correct_sum

    monkeypatch.chdir(REPO)  # the recipe names data/ and configs/ relative to the repository, as the README runs it
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    _train("configs/grpo_trl_rewards.yaml", f"output_dir={out}", f"model.path={tiny_model}", *SHRINK)

    steps = [m for m in read_metrics(out / "metrics.jsonl") if m["step"] > 0]
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:  # every sample is scored by both functions: the weighted mean is the mean of the weighted sums
        want = m["rewards/correct_sum/mean"] + 0.5 * m["rewards/think_format_reward/mean"]
        assert math.isclose(m["reward/mean"], want, abs_tol=1e-6), m

    # data.columns mapped `question` to the prompt; `solution` reached correct_sum under its own name
    train = datasets.load_from_disk(str(REPO / "data/arithmetic"))["train"]
    solution = {row["question"][0]["content"]: row["solution"] for row in train}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [1, 2, 3] and len(samples) == 3 * 2 * 2
    for s in samples:
        completion = [{"role": "assistant", "content": s["response"]}]
        assert s["reward/correct_sum"] == correct_sum([completion], [solution[s["prompt"][0]["content"]]])[0]
        assert s["reward/think_format_reward"] in (0.0, 1.0)

    wandb_runs = list((out / "wandb").glob("offline-run-*"))  # W&B beside TensorBoard
    assert len(wandb_runs) == 1 and any(wandb_runs[0].glob("*.wandb")), wandb_runs
    assert any((out / "tensorboard").iterdir())
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-2", "step-3"], kept  # save_total_limit: 2
    assert (out / "final" / "tokenizer_config.json").is_file()


def _hhh_dpo_losses(tmp_path: Path, tiny_model: Path, data: str) -> list[float]:
    out = tmp_path / Path(data).stem
    _train("configs/dpo_hhh.yaml", f"output_dir={out}", f"model.path={tiny_model}", f"data.path={REPO / data}",
           "data.eval_fraction=0", "train.epochs=0", "train.max_steps=2", "train.batch_size=4", "dpo.max_length=96",
           "peft.type=none", "train.bf16=false", "train.lr=1e-3")
    return [m["loss"] for m in read_metrics(out / "metrics.jsonl") if m["step"] > 0]


def test_implicit_prompt_and_h4_rows_train_dpo_as_explicit_ones_do(tmp_path, tiny_model):
    """The same 221 HHH pairs in TRL's three layouts: explicit prompt, implicit prompt (whole conversations)
    and ultrafeedback_binarized's prompt string plus conversations that repeat it. If the user turn were
    kept twice (the old behaviour with H4 rows) or the prompt mis-split, the DPO inputs and losses would differ."""
    explicit = _hhh_dpo_losses(tmp_path, tiny_model, "data/hhh/hhh_pairs.json")
    assert len(explicit) == 2 and all(math.isfinite(x) for x in explicit)
    assert _hhh_dpo_losses(tmp_path, tiny_model, "data/hhh/hhh_implicit.jsonl") == explicit
    assert _hhh_dpo_losses(tmp_path, tiny_model, "data/hhh/hhh_h4.jsonl") == explicit


@pytest.mark.parametrize("layout", ["hhh_implicit.jsonl", "hhh_h4.jsonl"])
def test_the_derived_files_hold_the_same_pairs(layout):
    from alignment.config import DataConfig
    from alignment.data import as_messages, load_pairs

    def turns(path):  # an H4 prompt is a string: as a conversation it is the explicit file's single user turn
        pairs, _ = load_pairs(DataConfig(path=str(REPO / "data/hhh" / path)), seed=0)
        return [(as_messages(p.prompt), p.chosen, p.rejected) for p in pairs]

    assert turns(layout) == turns("hhh_pairs.json") and len(turns(layout)) == 221
