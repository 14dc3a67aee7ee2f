"""Recipes for tests: a toy prompt file and a PMD config on a tiny local model."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def write_prompts(path: Path, count: int = 32) -> Path:
    rows = [{"prompt": f"Write a short sentence about topic number {i}."} for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy_recipe(folder: Path, model: Path, trainer: str = "pmd", **sections) -> Path:
    """A recipe on the toy vowel reward (PMD's by default); `sections` update the YAML (e.g. train={...})."""
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {
        "trainer": trainer,
        "output_dir": str(folder / "run"),
        "model": {"path": str(model)},
        "data": {"source": "file", "path": str(write_prompts(folder / "prompts.jsonl")),
                 "eval_path": str(write_prompts(folder / "held_out.jsonl", 8))},
        "rollout": {"n": 4, "max_new_tokens": 8},
        "train": {"max_steps": 2, "lr": 1e-3, "batch_size": 4, "mini_batches": 2, "bf16": False},
        "reward": {"type": "python", "function": str(REPO / "tests" / "toy_rewards.py") + ":vowels"},
    }
    if trainer == "pmd":
        recipe["pmd"] = {"tau": 0.1}
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
