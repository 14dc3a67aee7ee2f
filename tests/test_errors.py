"""Bad input gets a clear error, a non-zero exit, and leaves no output directory behind."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from align.cli import build_config, main
from alignment.config import BaseConfig, ConfigError, _section_type, check_ranges, load_config, parse_overrides
from tests.support import REPO
from tests.support.recipes import toy_recipe


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
    assert "did you mean algo.tau" in _fails(capsys, ["train", str(recipe), "algo.taus=0.2"])
    assert "unknown trainer 'ppo2' (valid: dpo, grpo, pairwise_rlhf, pmd, ppo, preference_model, reward_model, routed_rl, sft, sr_ppo, think_rm_rl, think_rm_sft)" in _fails(capsys, ["train", str(recipe), "trainer=ppo2"])


OUT_OF_RANGE = [
    ("train.lr=-1", "train.lr: expected > 0, got -1.0"),
    ("train.lr=.nan", "train.lr: expected float, got nan (float)"),
    ("train.lr=nan", "train.lr: expected float, got 'nan' (str)"),
    ("train.log_every=0", "train.log_every: expected >= 1, got 0"),
    ("train.max_steps=0", "train.max_steps: expected >= 1, got 0"),
    ("train.max_steps=-2", "train.max_steps: expected >= 1, got -2"),
    ("train.save_every=-1", "train.save_every: expected >= 0, got -1"),
    ("data.eval_fraction=1.5", "data.eval_fraction: expected a value in [0, 1), got 1.5"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens: expected >= 1, got 0"),
    ("rollout.temperature=-1", "rollout.temperature: expected >= 0, got -1.0"),
    ("rollout.top_p=2", "rollout.top_p: expected a value in (0, 1], got 2.0"),
    ("rollout.vllm.gpu_memory_utilization=0", "rollout.vllm.gpu_memory_utilization: expected a value in (0, 1], got 0.0"),
    ("peft.dropout=1.5", "peft.dropout: expected a value in [0, 1), got 1.5"),
    ("reward.timeout_s=0", "reward.timeout_s: expected > 0, got 0.0"),
    ("reward.router.budget=1.5", "reward.router.budget: expected a value in [0, 1], got 1.5"),
    ("reward.judge.max_concurrency=0", "reward.judge.max_concurrency: expected >= 1, got 0"),
    ("reward.judge.retries=-1", "reward.judge.retries: expected >= 0, got -1"),
    ("reward.judge.timeout_s=-5", "reward.judge.timeout_s: expected > 0, got -5.0"),
]


@pytest.mark.parametrize("override, message", [
    ("train.lr=fast", "train.lr: expected float, got 'fast' (str)"),
    ("train.max_steps=2.5", "train.max_steps: expected int, got 2.5 (float)"),
    ("algo.advantage=median", "algo.advantage: unknown reward advantage estimator 'median' (valid: grpo, ploo, rloo)"),
    ("algo.policy_loss=dpo", "algo.policy_loss: unknown policy loss 'dpo' (valid: pmd, ppo)"),
    ("algo.kl_estimator=k4", "algo.kl_estimator: unknown KL estimator 'k4' (valid: k1, k2, k3)"),
    ("train.bf16=maybe", "train.bf16: expected bool | 'auto', got 'maybe' (str)"),
    ("rollout=3", "rollout: expected RolloutConfig, got 3 (int)"),
    *OUT_OF_RANGE,
    # renamed keys name their new spelling
    ("pmd.tau=0.2", "use algo.tau"),
    ("pmd.baseline=partition", "use algo.advantage (mean: rloo, partition: ploo)"),
    ("grpo.kl_coef=0.1", "use algo.kl_coef"),
    ("trainer=think_rm", "use trainer: think_rm_sft (warm-up on reasoning) or trainer: think_rm_rl"),
])
def test_wrong_value_names_the_key_and_what_it_expects(capsys, tmp_path, tiny_model, override, message):
    """A wrong type names the expected type, a number out of range the range, a renamed key its new
    spelling; nothing is written."""
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


def _sections(cls, prefix=""):
    import dataclasses

    yield prefix, cls
    for f in dataclasses.fields(cls):
        section = _section_type(typing.get_type_hints(cls)[f.name])
        if section is not None:
            yield from _sections(section, f"{prefix}{f.name}.")


def test_every_default_lies_in_its_declared_range():
    """Each trainer's config, sections included: the declared ranges accept the defaults (and at least
    the shared numeric keys declare one)."""
    from trainers import TRAINERS, get_trainer

    ranged = set()
    for name in TRAINERS:
        for prefix, section in _sections(get_trainer(name).config_class):
            check_ranges(section(), prefix)  # raises if a default lies outside its range
            ranged |= {prefix + f.name for f in dataclasses.fields(section) if "range" in f.metadata}
    assert {"train.lr", "train.max_steps", "rollout.top_p", "data.eval_fraction", "peft.dropout",
            "reward.judge.timeout_s", "reward.router.threshold"} <= ranged


def test_malformed_yaml_names_the_file_or_override_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: pmd\ntrain:\n  lr: 1e-3\n  batch_size: [4\n")
    err = _fails(capsys, ["train", str(bad)])
    assert f"{bad}: invalid YAML: " in err and "(line 4, column 15)" in err
    bad.write_text("trainer: pmd\n\tlr: 1\n")
    assert "line 2, column 1" in _fails(capsys, ["train", str(bad)])
    bad.write_bytes(b"trainer: pmd\n# caf\xe9\n")
    assert f"{bad}: not UTF-8 text (byte 18)" in _fails(capsys, ["train", str(bad)])
    with pytest.raises(ConfigError, match=r"override 'train.lr=\[1e-3': the value is not valid YAML .*line 1, column 6"):
        parse_overrides(["train.lr=[1e-3"])
    with pytest.raises(ConfigError, match=r"override 'train.lr=!!float fast': the value is not valid YAML"):
        parse_overrides(["train.lr=!!float fast"])


def test_serve_rm_routing_file_goes_through_read_yaml(tmp_path):
    from rewards.server import load_routing

    bad = tmp_path / "routing.yaml"
    bad.write_text("reward:\n  type: routed\n  router: {policy: never\n")
    with pytest.raises(ConfigError, match=rf"{bad}: invalid YAML: .*\(line 3, column 11\)"):
        load_routing(bad, "unused")


def test_missing_local_model_folder_says_so(capsys, monkeypatch, tmp_path, tiny_model):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # no network: fail at once
    recipe = toy_recipe(tmp_path, tiny_model)
    missing = tmp_path / "no" / "such" / "model"
    err = _fails(capsys, ["train", str(recipe), f"model.path={missing}", f"output_dir={tmp_path / 'out'}"])
    assert f"model.path: local folder {missing} does not exist" in err and "Repo id" not in err
    assert "model.path: local folder ./nope does not exist" in _fails(capsys, ["train", str(recipe), "model.path=./nope"])
    assert f"model.path: {recipe} is a file" in _fails(capsys, ["train", str(recipe), f"model.path={recipe}"])
    # a hub name is still tried: offline, it fails naming the key
    err = _fails(capsys, ["train", str(recipe), "model.path=nobody-here/no-such-model", f"output_dir={tmp_path / 'out'}"])
    assert "model.path: cannot load a tokenizer from nobody-here/no-such-model" in err
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file(capsys, tmp_path, tiny_model):
    recipe = toy_recipe(tmp_path, tiny_model)
    (tmp_path / "taken").write_text("not a folder")
    err = _fails(capsys, ["train", str(recipe), f"output_dir={tmp_path / 'taken'}"])
    assert f"output_dir: {tmp_path / 'taken'} is a file" in err


def test_bench_overrides_go_only_to_benchmarks_that_take_them(capsys):
    """`align bench NAME [--quick] KEY=VALUE`: overrides after --quick still count as overrides; a
    benchmark without a recipe refuses them by name, and a stray option is still an error."""
    err = _fails(capsys, ["bench", "rollout", "--quick", "rollout.n=2"])
    assert "benchmark 'rollout' takes no KEY=VALUE overrides (got rollout.n=2)" in err
    with pytest.raises(SystemExit):
        main(["bench", "rollout", "--quick", "--steps=3"])
    assert "unrecognized arguments: --steps=3" in capsys.readouterr().err
