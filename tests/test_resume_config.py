"""Resume under a changed config: keys the checkpoint depends on refuse, other changes are logged and
take effect (the restored optimizer's lr included); config.yaml holds what the run uses; `final/`
appears only complete."""

from __future__ import annotations

import logging
import shutil

import pytest
import yaml

from align.cli import build_config, main
from alignment.logging import read_metrics
from tests.support.recipes import toy_recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """A 2-step PMD run (lr 1e-3) with its checkpoint step-2."""
    folder = tmp_path_factory.mktemp("resume")
    recipe = toy_recipe(folder, tiny_model)
    trainer_cls, cfg = build_config(str(recipe), [])
    trainer_cls(cfg).train()
    return folder


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run: its recipe and output_dir (tests change both)."""
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    return tmp_path / "recipe.yaml", tmp_path / "run"


def _resume(recipe, out, *overrides):
    trainer_cls, cfg = build_config(str(recipe), [f"output_dir={out}", "resume=true", *overrides])
    trainer = trainer_cls(cfg)
    trainer.train()
    return trainer


@pytest.mark.parametrize("override, key, old", [
    ("trainer=grpo", "trainer", "'pmd'"),
    ("peft.type=lora", "peft.type", "'none'"),
    ("model.path={other}", "model.path", None),
])
def test_resume_refuses_a_key_the_checkpoint_depends_on(capsys, run, tiny_model, tmp_path, override, key, old):
    recipe, out = run
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    override = override.format(other=other)
    assert main(["train", str(recipe), f"output_dir={out}", "resume=true", override]) == 2
    err = capsys.readouterr().err
    new = override.split("=", 1)[1]
    assert f"error: resume: {key} is '{new}' but the checkpoint {out / 'checkpoints' / 'step-2'} was written with " \
           f"{old or repr(str(tiny_model))}; it cannot continue under a changed {key}" in err
    assert yaml.safe_load((out / "config.yaml").read_text())["trainer"] == "pmd"  # left as it was


def test_resume_without_resume_true_refuses_before_loading(capsys, run):
    recipe, out = run
    assert main(["train", str(recipe), f"output_dir={out}"]) == 2
    assert f"{out} already holds checkpoints (step-2): pass resume=true" in capsys.readouterr().err


def test_changed_keys_are_logged_and_the_new_values_used(caplog, run):
    recipe, out = run
    with caplog.at_level(logging.INFO, logger="alignment"):
        trainer = _resume(recipe, out, "train.max_steps=3", "train.lr=5e-4", "train.weight_decay=0.01",
                          "rollout.temperature=0.7")
    logged = caplog.text
    assert "resume: train.lr changed: 0.001 (checkpoint) -> 0.0005 (used from now on)" in logged
    assert "resume: train.max_steps changed: 2 (checkpoint) -> 3 (used from now on)" in logged
    assert "resume: rollout.temperature changed: 1.0 (checkpoint) -> 0.7 (used from now on)" in logged
    assert "resume: resume changed" not in logged
    group = trainer.backend.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], trainer.backend.scheduler.base_lrs) == (5e-4, 0.01, [5e-4])
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["lr"] for r in rows if r["step"] > 0] == [1e-3, 1e-3, 5e-4]  # steps 1-2 before, 3 after resume
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["train"]["lr"], saved["train"]["max_steps"], saved["resume"]) == (5e-4, 3, True)


def test_new_lr_keeps_the_warmup_position(run):
    """A resumed run mid-warmup: the new base lr times the warmup factor of the step it resumes at."""
    recipe, out = run
    trainer = _resume(recipe, out, "train.max_steps=3", "train.lr=4e-4", "train.warmup_steps=8")
    # the scheduler's lr after k optimizer steps is lr * k / warmup_steps (transformers' warmup); three
    # PMD steps of train.mini_batches = 2 optimizer steps each make k = 6
    assert trainer.backend.optimizer.param_groups[0]["lr"] == pytest.approx(4e-4 * 6 / 8)


def test_final_appears_only_complete(monkeypatch, run):
    recipe, out = run
    assert (out / "final" / "config.json").is_file() and not (out / "final.tmp").exists()
    shutil.rmtree(out / "final")
    trainer_cls, cfg = build_config(str(recipe), [f"output_dir={out}", "resume=true", "train.max_steps=3"])
    trainer = trainer_cls(cfg)

    save_tokenizer = trainer.tokenizer.save_pretrained

    def killed(folder, *args, **kwargs):  # checkpoints hold the tokenizer too: only final.tmp's dies
        if str(folder).endswith("final.tmp"):
            raise KeyboardInterrupt
        return save_tokenizer(folder, *args, **kwargs)

    monkeypatch.setattr(trainer.tokenizer, "save_pretrained", killed)  # the model is written, then the run dies
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not (out / "final").exists() and (out / "final.tmp" / "config.json").is_file()
