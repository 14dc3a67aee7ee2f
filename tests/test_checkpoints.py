"""Checkpoints and memory / schedule options (issue 27 items 6, 7): `train.save_total_limit`, what
`step-N` and `final/` hold (tokenizer; final/ in the model's own dtype), `resume=PATH`,
`train.gradient_checkpointing` (the same gradients, the shared-prompt path included) and
`train.lr_scheduler` (transformers' formulas)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.cli import build_config
from alignment.config import ConfigError, ModelConfig, PeftConfig, load_config
from alignment.logging import read_metrics
from alignment.logprobs import PolicyModel, pack
from alignment.models import load_causal_lm
from tests.support.recipes import pairs_recipe, write_demos
from tests.support.recipes import train_in_process as train


def sft_recipe(folder, model, **train):
    folder.mkdir(parents=True, exist_ok=True)
    values = {"trainer": "sft", "output_dir": str(folder / "run"), "model": {"path": str(model)},
              "data": write_demos(folder),
              "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "bf16": False, **train}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def safetensors_dtypes(path) -> set[torch.dtype]:
    with safe_open(str(path), "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory, tiny_model):
    """The tiny model saved in bf16 (its config.json says dtype: bfloat16), as hub models are."""
    folder = tmp_path_factory.mktemp("bf16-model")
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


def test_save_total_limit_tokenizer_and_final_in_the_model_dtype(tmp_path, bf16_model):
    out = tmp_path / "run"
    train(sft_recipe(tmp_path, bf16_model, save_every=1, save_total_limit=2, gradient_checkpointing=True))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3", "step-4"]
    step = out / "checkpoints" / "step-4"
    assert (step / "tokenizer_config.json").is_file() and (step / "config.yaml").is_file()
    assert safetensors_dtypes(step / "model.safetensors") == {torch.float32}  # training state: exact resume
    final = out / "final"
    assert safetensors_dtypes(final / "model.safetensors") == {torch.bfloat16}
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    assert (final / "tokenizer_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.dtype == torch.bfloat16 and AutoTokenizer.from_pretrained(final).eos_token


def test_final_of_an_fp32_model_stays_fp32_and_lora_keeps_its_adapter(tmp_path, tiny_model):
    out = tmp_path / "run"
    train(sft_recipe(tmp_path, tiny_model, max_steps=1), "peft.type=lora", "peft.r=2")
    assert safetensors_dtypes(out / "final" / "model.safetensors") == {torch.float32}
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoints" / "step-1" / "tokenizer_config.json").is_file()


def test_resume_from_a_path_rewinds_and_repeats_the_same_steps(tmp_path, tiny_model, monkeypatch):
    """resume=PATH (relative) of an older checkpoint, in the same output_dir, under a cosine schedule with
    warmup: the later steps repeat the original ones; the checkpoints past it are moved aside."""
    recipe = sft_recipe(tmp_path, tiny_model, max_steps=3, save_every=1, lr_scheduler="cosine", warmup_steps=1)
    out = tmp_path / "run"
    train(recipe)
    original = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    monkeypatch.chdir(tmp_path)
    trainer = train(recipe, "resume=run/checkpoints/step-1")
    assert trainer.resume_from == out / "checkpoints" / "step-1"
    again = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert sorted(again) == [1, 2, 3]
    for step in (2, 3):
        for key in ("loss", "lr", "grad_norm"):
            assert again[step][key] == pytest.approx(original[step][key], rel=1e-5, abs=1e-8), (step, key)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-1", "step-2", "step-2.superseded", "step-3", "step-3.superseded"]

    # into another output_dir, by absolute path: the same step again
    other = tmp_path / "other"
    train(recipe, f"output_dir={other}", f"resume={out / 'checkpoints' / 'step-2'}")
    moved = {r["step"]: r for r in read_metrics(other / "metrics.jsonl")}
    assert sorted(moved) == [3] and moved[3]["loss"] == pytest.approx(original[3]["loss"], rel=1e-5)


@pytest.mark.parametrize("path, message", [
    ("nowhere", "resume: nowhere does not exist; expected a checkpoint folder"),
    ("run", "is not a checkpoint folder: it has no trainer_state.json (it looks like a run folder: its newest "
            "checkpoint is"),
    ("run/checkpoints/step-1.tmp", "is an incomplete checkpoint"),
    ("run/config.yaml", "is a file"),
])
def test_a_bad_resume_path_is_a_config_error(tmp_path, tiny_model, monkeypatch, path, message):
    recipe = sft_recipe(tmp_path, tiny_model)
    (tmp_path / "run" / "checkpoints" / "step-1.tmp").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-1").mkdir()
    (tmp_path / "run" / "checkpoints" / "step-1" / "trainer_state.json").write_text("{}")
    (tmp_path / "run" / "config.yaml").write_text("{}")
    monkeypatch.chdir(tmp_path)
    trainer_cls, cfg = build_config(str(recipe), [f"resume={path}"])
    with pytest.raises(ConfigError) as error:
        trainer_cls(cfg)  # refused before anything is loaded
    assert message in str(error.value)


# ---- gradient checkpointing --------------------------------------------------------------------------------
def _forward_calls(model) -> list[int]:
    calls = [0]
    for layer in model.get_decoder().layers:
        forward = layer.forward

        def counted(*args, _forward=forward, **kwargs):
            calls[0] += 1
            return _forward(*args, **kwargs)

        layer.forward = counted
    return calls


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_policy_gradients_with_checkpointing_equal_those_without(tiny_model, peft):
    """The policy as the online trainers hold it (eval mode, rows sharing prompts: the shared-prompt path)."""
    from alignment.adapters import apply_peft
    from alignment.recompute import enable_gradient_checkpointing

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    short, long = [tokenizer.encode(q) for q in ("What is 2+2?", "Tell me a story about a cat.")]
    batch = pack([short] * 3 + [long] * 2, [[5, 6, 7], [8], [9, 10, 11, 12], [13, 14], [15]], tokenizer.pad_token_id)
    r_len, mask = batch["response_mask"].shape[1], batch["response_mask"].bool()

    def gradients(checkpointing: bool):
        torch.manual_seed(0)
        lm = apply_peft(load_causal_lm(ModelConfig(path=str(tiny_model))),
                        PeftConfig(type=peft, r=2, target_modules=["q_proj", "v_proj"]), 10).eval()
        if checkpointing:
            assert enable_gradient_checkpointing(lm) == 2
        calls = _forward_calls(lm)
        policy = PolicyModel(lm, bf16=False)
        logp, _ = policy(batch["input_ids"], batch["attention_mask"], batch["position_ids"], r_len)
        params = [p for p in lm.parameters() if p.requires_grad]
        grads = torch.autograd.grad(logp[mask].sum(), params)
        return grads, calls[0]

    plain, plain_calls = gradients(False)
    checkpointed, calls = gradients(True)
    assert plain_calls == 2 * 2 and calls == 2 * plain_calls  # prompt and response passes, then recomputed
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7 * float(a.abs().max()))


def test_dpo_gradients_with_checkpointing_equal_those_without(tmp_path, tiny_model):
    from trainers.dpo import DPOConfig, DPOTrainer

    values = yaml.safe_load(pairs_recipe(tmp_path, tiny_model, "dpo").read_text())

    def gradients(checkpointing: bool):
        values["train"]["gradient_checkpointing"] = checkpointing
        trainer = DPOTrainer(load_config(DPOConfig, values))
        calls = _forward_calls(trainer.model)
        trainer.module.train(trainer.dropout)
        loss, _ = trainer.loss(trainer.rows_of(0))
        loss.backward()
        return [p.grad for p in trainer.module.parameters() if p.requires_grad], calls[0]

    plain, plain_calls = gradients(False)
    checkpointed, calls = gradients(True)
    assert calls > plain_calls  # recomputed in the backward pass
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7 * float(a.abs().max()))


# ---- learning-rate schedules -----------------------------------------------------------------------------
def transformers_factor(name: str, k: int, warmup: int, total: int) -> float:
    """transformers' schedules (optimization.py): the lr factor after k optimizer steps."""
    if k < warmup:
        return k / max(1, warmup)
    if name == "linear":
        return max(0.0, (total - k) / max(1, total - warmup))
    return max(0.0, 0.5 * (1 + math.cos(math.pi * (k - warmup) / max(1, total - warmup))))


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_lr_schedules_follow_transformers(tmp_path, tiny_model, name):
    """`lr` at step k (logged after its update) is the rate after k optimizer steps."""
    out = tmp_path / "run"
    train(sft_recipe(tmp_path, tiny_model, max_steps=5, lr_scheduler=name, warmup_steps=2))
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for row in rows:
        assert row["lr"] == pytest.approx(1e-3 * transformers_factor(name, row["step"], 2, 5), abs=1e-12)


def test_online_schedules_span_every_optimizer_step(tiny_model):
    """An online run's schedule counts mini-batch updates: max_steps x mini_batches x passes."""
    from alignment.backend import Backend
    from alignment.config import TrainConfig

    cfg = TrainConfig(lr=1.0, warmup_steps=1, lr_scheduler="linear", bf16=False)
    backend = Backend(torch.nn.Linear(2, 1), cfg, 1, total_steps=4)
    lrs = []
    for _ in range(4):
        backend.backward(backend(torch.ones(1, 2)).sum())
        backend.step()
        lrs.append(backend.lr)
    assert lrs == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    with pytest.raises(ValueError, match="needs the run's total optimizer steps"):
        Backend(torch.nn.Linear(2, 1), cfg, 1)
