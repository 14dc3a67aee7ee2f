"""Bad input gets a clear error, a non-zero exit, and leaves no output directory behind."""

from __future__ import annotations

import json

import pytest

from alignment.cli import build_config, main
from alignment.config import BaseConfig, ConfigError, load_config, parse_overrides
from tests.helpers import REPO, toy_recipe


def _fails(capsys, args) -> str:
    assert main(args) == 2
    return capsys.readouterr().err


def test_unknown_key_names_it_and_the_nearest_valid_ones(capsys, tmp_path, tiny_model):
    recipe = toy_recipe(tmp_path, tiny_model)
    err = _fails(capsys, ["train", str(recipe), "train.lrr=1e-4", f"output_dir={tmp_path / 'out'}"])
    assert "unknown config key 'train.lrr'" in err and "did you mean train.lr" in err
    assert "train.max_steps" in err  # the valid keys are listed
    assert not (tmp_path / "out").exists()


def test_unknown_section_and_trainer_key(capsys, tmp_path, tiny_model):
    recipe = toy_recipe(tmp_path, tiny_model)
    assert "did you mean pmd.tau" in _fails(capsys, ["train", str(recipe), "pmd.taus=0.2"])
    assert "unknown trainer 'ppo2' (valid: dpo, grpo, pairwise_rlhf, pmd, ppo, preference_model, reward_model, routed_rl, sft, sr_ppo, think_rm)" in _fails(capsys, ["train", str(recipe), "trainer=ppo2"])


@pytest.mark.parametrize("override, message", [
    ("train.lr=fast", "train.lr: expected float, got 'fast' (str)"),
    ("train.max_steps=2.5", "train.max_steps: expected int, got 2.5 (float)"),
    ("pmd.baseline=median", "pmd.baseline: expected one of 'mean' | 'partition', got 'median'"),
    ("train.bf16=maybe", "train.bf16: expected bool, got 'maybe' (str)"),
    ("rollout=3", "rollout: expected RolloutConfig, got 3 (int)"),
])
def test_wrong_type_names_the_expected_type(capsys, tmp_path, tiny_model, override, message):
    recipe = toy_recipe(tmp_path, tiny_model)
    assert message in _fails(capsys, ["train", str(recipe), override, f"output_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


def test_overrides_parse_yaml_scalars_and_floats_without_a_dot():
    cfg = load_config(BaseConfig, parse_overrides(["train.lr=2e-5", "rollout.n=8", "train.bf16=false"]))
    assert cfg.train.lr == 2e-5 and cfg.rollout.n == 8 and cfg.train.bf16 is False
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_overrides(["train.lr"])


def test_missing_config_and_data_files(capsys, tmp_path, tiny_model):
    assert "config file not found" in _fails(capsys, ["train", str(tmp_path / "nope.yaml")])
    recipe = toy_recipe(tmp_path, tiny_model)
    missing = tmp_path / "missing.jsonl"
    err = _fails(capsys, ["train", str(recipe), f"data.path={missing}", f"output_dir={tmp_path / 'out'}"])
    assert f"data file not found: {missing}" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rows, message", [
    ('{"prompt": "a"}\n{"promt": "b"}\n', "row 2: missing field 'prompt'"),
    ('{"prompt": "a"}\n{"prompt": 7}\n', "row 2: field 'prompt' must be str or list, got int"),
    ('{"prompt": "a"}\n\n{"prompt": "b"\n', "row 3: invalid JSON"),
])
def test_malformed_row_names_file_and_row(capsys, tmp_path, tiny_model, rows, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(rows)
    recipe = toy_recipe(tmp_path, tiny_model)
    err = _fails(capsys, ["train", str(recipe), f"data.path={bad}", f"output_dir={tmp_path / 'out'}"])
    assert str(bad) in err and message in err
    assert not (tmp_path / "out").exists()


def test_json_list_file_rows_are_checked(capsys, tmp_path, tiny_model):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "a"}, "just a string"]))
    recipe = toy_recipe(tmp_path, tiny_model)
    assert "row 2: expected an object, got str" in _fails(capsys, ["train", str(recipe), f"data.path={bad}"])


def test_method_constraints(capsys, tmp_path, tiny_model):
    recipe = toy_recipe(tmp_path, tiny_model)
    assert "at least 2 samples per prompt" in _fails(capsys, ["train", str(recipe), "rollout.n=1"])
    assert "multiple of train.mini_batches" in _fails(capsys, ["train", str(recipe), "train.mini_batches=3"])
    assert "reward.function: file not found" in _fails(
        capsys, ["train", str(recipe), "reward.function=nowhere.py:fn"])


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe):
    """Each recipe in configs/ names a trainer and only keys its config has (judge_routing.yaml is the
    reward block that routed recipes and serve-rm read)."""
    if recipe.name == "judge_routing.yaml":
        pytest.skip("a reward block, not a recipe")
    trainer_cls, cfg = build_config(str(recipe), [])
    assert cfg.trainer and trainer_cls.config_class is type(cfg)
