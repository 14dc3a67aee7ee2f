"""Reward model, DPO and SFT trainers end to end on tiny local models (one process and two)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from alignment.logging import read_metrics
from tests.support.recipes import COLOURS, pairs_recipe, run_align, train_in_process, write_demos

ACCELERATE = [str(Path(sys.executable).parent / "accelerate"), "launch"]


def _steps(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["step"] > 0]


def test_reward_model_r3m_learns_and_writes_outliers(tmp_path, tiny_model):
    path = pairs_recipe(tmp_path, tiny_model, "reward_model", rm={"loss": "r3m", "lam": 0.75})
    train_in_process(path, "train.max_steps=12")  # in this process: the CLI's own path is tests/test_train_e2e.py's
    out = tmp_path / "run"
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[0]["step"] == 0 and "eval/accuracy" in rows[0]
    steps = _steps(out)
    for row in steps:
        assert {"loss", "lr", "grad_norm", "accuracy", "margin", "r3m/outlier_frac", "perf/tokens_per_s"} <= set(row)
    assert steps[-1]["eval/accuracy"] == 1.0 and steps[-1]["eval/loss"] < rows[0]["eval/loss"]
    outliers = [json.loads(line) for line in (out / "outliers.jsonl").read_text().splitlines()]
    assert [o["index"] for o in outliers] == list(range(24))
    assert all(o["flagged"] == (o["delta"] > 0) for o in outliers)
    assert not any(o["flagged"] for o in outliers)  # clean labels, a model that fits them

    # The final model scores like the trained one, through the same encoding the server uses.
    from rewards.reward_model import RewardScorer

    scorer = RewardScorer.from_dir(out / "final")
    kind, rude = scorer.score(["Tell me about the colour red."] * 2, ["Happy to help, red is lovely.", "Go away, I hate red."])
    assert kind > rude


def test_reward_model_bt_with_lora_trains_the_head_and_saves_a_merged_model(tmp_path, tiny_model):
    path = pairs_recipe(tmp_path, tiny_model, "reward_model", peft={"type": "lora", "r": 4, "alpha": 8})
    train_in_process(path, "train.max_steps=10", "train.lr=5e-3")
    out = tmp_path / "run"
    assert _steps(out)[-1]["eval/accuracy"] == 1.0
    assert not (out / "outliers.jsonl").exists()  # BT has no outlier variable
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert not any("lora" in n or "modules_to_save" in n for n, _ in model.named_parameters())
    assert (out / "final" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("loss", ["sigmoid", "r3m"])
def test_dpo_raises_the_chosen_log_ratio(tmp_path, tiny_model, loss):
    path = pairs_recipe(tmp_path, tiny_model, "dpo", dpo={"loss": loss, "beta": 0.5})
    train_in_process(path, "train.max_steps=8")
    out = tmp_path / "run"
    first, steps = read_metrics(out / "metrics.jsonl")[0], _steps(out)
    # At the start the policy is its reference: every margin is exactly zero.
    assert first["eval/accuracy"] == 0.0 and first["eval/loss"] == pytest.approx(math_log2(), abs=1e-5)
    assert steps[-1]["eval/accuracy"] == 1.0 and steps[-1]["eval/loss"] < 0.5
    assert steps[-1]["margin"] > steps[0]["margin"]
    assert (out / "outliers.jsonl").exists() == (loss == "r3m")


def math_log2() -> float:
    return float(torch.log(torch.tensor(2.0)))


def test_dpo_with_lora_uses_the_adapter_free_model_as_reference(tmp_path, tiny_model):
    path = pairs_recipe(tmp_path, tiny_model, "dpo", dpo={"beta": 0.5}, peft={"type": "lora", "r": 4, "alpha": 8})
    train_in_process(path, "train.max_steps=8", "train.lr=5e-3")
    first, steps = read_metrics(tmp_path / "run" / "metrics.jsonl")[0], _steps(tmp_path / "run")
    assert first["eval/loss"] == pytest.approx(math_log2(), abs=1e-5)  # LoRA B starts at 0: policy = reference
    assert steps[-1]["eval/accuracy"] == 1.0


def test_sft_lowers_held_out_loss(tmp_path, tiny_model):
    write_demos(tmp_path)
    chats = [{"messages": [{"role": "user", "content": f"Name colour {i}."},
                           {"role": "assistant", "content": f"The colour is {COLOURS[i % 8]}."}]} for i in range(8)]
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(d) + "\n" for d in chats))
    path = pairs_recipe(tmp_path, tiny_model, "sft", data={"path": str(tmp_path / "demos.jsonl"),
                                                   "eval_path": str(tmp_path / "held.jsonl")})
    train_in_process(path, "train.epochs=3")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(19))  # epochs=3: 3 * 24 / 4 steps
    assert rows[-1]["eval/loss"] < 0.7 * rows[0]["eval/loss"]


def test_a_malformed_pair_names_the_file_and_row(tmp_path, tiny_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" +
                   json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    path = pairs_recipe(tmp_path, tiny_model, "reward_model", data={"path": str(bad), "eval_path": None})
    proc = run_align("train", str(path))
    assert proc.returncode == 2 and f"{bad}: row 2: missing field 'rejected'" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("trainer, keys", [("reward_model", ("loss", "accuracy", "margin")),
                                           ("dpo", ("loss", "accuracy", "margin")), ("sft", ("loss",))])
def test_two_processes_match_one(tmp_path, tiny_model, trainer, keys):
    (tmp_path / "one").mkdir()
    data = write_demos(tmp_path) if trainer == "sft" else {}
    one = pairs_recipe(tmp_path / "one", tiny_model, trainer, data=data)
    proc = run_align("train", str(one), "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "two"
    proc = run_align("train", str(one), f"output_dir={out}", "train.max_steps=3",
                     launcher=ACCELERATE + ["--config_file", "launch/zero2.yaml", "--num_processes", "2",
                                            "--main_process_port", "0", "-m"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/2, backend deepspeed-zero2" in proc.stderr
    want, got = _steps(tmp_path / "one" / "run"), _steps(out)
    for a, b in zip(got, want, strict=True):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_resume_continues_exactly(tmp_path, tiny_model):
    """Stop after step 2 (its checkpoint), resume to 4: the same steps as one uninterrupted run."""
    path = pairs_recipe(tmp_path, tiny_model, "reward_model", rm={"loss": "r3m"})
    whole, part = tmp_path / "whole", tmp_path / "part"
    train_in_process(path, f"output_dir={whole}", "train.max_steps=4")
    train_in_process(path, f"output_dir={part}", "train.max_steps=2")
    train_in_process(path, f"output_dir={part}", "train.max_steps=4", "resume=true")
    want = {r["step"]: r for r in _steps(whole)}
    got = {r["step"]: r for r in _steps(part)}
    assert sorted(got) == [1, 2, 3, 4]  # metrics.jsonl keeps the steps before the checkpoint
    for step in (1, 2, 3, 4):
        for key in ("loss", "margin", "eval/accuracy"):
            if key in want[step]:
                assert got[step][key] == pytest.approx(want[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_strength_sets_a_margin_and_is_validated(tmp_path, tiny_model):
    from alignment.config import load_config
    from alignment.data import DataError
    from trainers.reward_model import RewardModelConfig, RewardModelTrainer

    rows = [{"prompt": "p", "chosen": "good", "rejected": "bad", "strength": 2},
            {"prompt": "q", "chosen": "fine", "rejected": "poor", "strength": -1}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    values = {"trainer": "reward_model", "output_dir": str(tmp_path / "run"), "model": {"path": str(tiny_model)},
              "data": {"path": str(tmp_path / "pairs.jsonl")}, "train": {"bf16": False}}
    plain = RewardModelTrainer(load_config(RewardModelConfig, values))
    scaled = RewardModelTrainer(load_config(RewardModelConfig, {**values, "rm": {"margin_scale": 0.5}}))
    scaled.model.load_state_dict(plain.model.state_dict())
    with torch.no_grad():
        base, _ = plain.margins(plain.train_set)
        shifted, _ = scaled.margins(scaled.train_set)
    assert torch.allclose(base - shifted, torch.tensor([1.0, -0.5]), atol=1e-5)  # TRL's margin convention

    rows[1]["strength"] = "high"
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="pairs.jsonl: row 2: field 'strength' must be a signed int"):
        RewardModelTrainer(load_config(RewardModelConfig, values))


@pytest.mark.parametrize("trainer, section", [("reward_model", "rm"), ("dpo", "dpo")])
def test_r3m_lambda_outside_the_unit_interval_names_the_key(tmp_path, tiny_model, trainer, section):
    path = pairs_recipe(tmp_path, tiny_model, trainer, **{section: {"loss": "r3m", "lam": 1.5}})
    proc = run_align("train", str(path))
    assert proc.returncode == 2 and f"{section}.lam: R^3M's lambda must lie in (0, 1), got 1.5" in proc.stderr
