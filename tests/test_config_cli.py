"""`align config` and the README's key table: generated from the config classes and their comments."""

from __future__ import annotations

import re

import yaml

from align.cli import key_table, main
from alignment.config import config_keys, load_config
from tests.support import REPO
from trainers import TRAINERS, get_trainer


def test_the_readme_key_table_is_the_generated_one_and_every_key_is_documented():
    readme = (REPO / "README.md").read_text()
    written = re.search(r"<!-- config-keys:start -->\n(.*?)\n<!-- config-keys:end -->", readme, re.S).group(1)
    assert written == key_table(), "README's key table is stale: paste `align config --keys` between its markers"
    undocumented = sorted({key for name in TRAINERS for key, _, doc in config_keys(get_trainer(name).config_class)
                           if not doc})
    assert undocumented == [], f"config fields without a comment (the README's meaning column): {undocumented}"


def test_a_trainers_own_defaults_are_shown_per_trainer():
    rows = {line.split(" | ")[0].strip("| `"): line for line in key_table().splitlines()[2:]}
    assert "`rloo` (pmd)" in rows["algo.advantage"] and "`grpo` (others)" in rows["algo.advantage"]
    assert rows["dpo.beta"].endswith("(dpo) DPO's beta: the implicit KL strength to the reference |")


def test_align_config_prints_the_resolved_recipe(capsys):
    assert main(["config", "configs/dpo_hhh.yaml", "train.lr=3e-6", "dpo.loss=r3m"]) == 0
    text = capsys.readouterr().out
    values = yaml.safe_load(text)
    cfg = load_config(get_trainer("dpo").config_class, values)  # every key, loadable as a recipe
    assert (cfg.train.lr, cfg.dpo.loss, cfg.dpo.beta) == (3e-6, "r3m", 0.1)
    assert values["train"]["lr_scheduler"] == "constant"  # defaults the recipe leaves out are filled in
    assert re.search(r"^# train.bf16: auto resolves to (bf16|fp32) here \(", text, re.M)


def test_align_config_errors_name_the_key(capsys):
    assert main(["config", "configs/dpo_hhh.yaml", "train.lrr=1"]) == 2
    assert "unknown config key 'train.lrr'; did you mean train.lr" in capsys.readouterr().err


def test_train_help_lists_the_sections_and_points_to_align_config(capsys):
    try:
        main(["train", "--help"])
    except SystemExit:
        pass
    text = capsys.readouterr().out
    assert "config sections: algo, data, dpo" in text and "align config --keys" in text
    assert all(name in text for name in TRAINERS)
