"""Recipes for tests: toy prompt, preference and demonstration files, recipes on tiny local models, and
`run_align` to run them as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tests.support import REPO

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


def run_align(*args: str, env: dict | None = None, timeout: int = 600, launcher: list[str] | None = None):
    """Run `python -m alignment ARGS`, or `LAUNCHER alignment ARGS` where the launcher ends with its
    own module flag (`accelerate launch ... -m`, `deepspeed ... --module`); returns CompletedProcess."""
    cmd = (launcher or [sys.executable, "-m"]) + ["alignment", *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def train_in_process(recipe, *overrides: str):
    """`align train RECIPE OVERRIDES` in this process (no interpreter start-up): the trainer, trained."""
    from align.cli import build_config

    trainer_cls, cfg = build_config(str(recipe), list(overrides))
    trainer = trainer_cls(cfg)
    trainer.train()
    return trainer


def run_two_nodes(commands: list[list[str]], args: list[str], env: dict, timeout: int = 600,
                  cwd: Path = REPO) -> list[tuple[int, str]]:
    """Start the launcher line of each node at once, each followed by `alignment ARGS`; (exit code,
    output) of each."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    # output to files, not pipes: a node blocked on a full pipe would stall the other in a collective
    logs = [tempfile.TemporaryFile("w+") for _ in commands]
    procs = [subprocess.Popen([*cmd, "alignment", *args], cwd=cwd, env=full_env, stdout=log,
                              stderr=subprocess.STDOUT, text=True) for cmd, log in zip(commands, logs)]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    results = []
    for code, log in zip(codes, logs):
        log.seek(0)
        results.append((code, log.read()))
        log.close()
    return results


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
        "reward": {"type": "python", "function": str(REPO / "tests" / "support" / "toy_rewards.py") + ":vowels"},
    }
    if trainer == "pmd":
        recipe["algo"] = {"tau": 0.1}
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def write_pairs(path: Path, count: int = 24, flip: tuple[int, ...] = ()) -> Path:
    """An easy preference: kind answers beat rude ones; rows in `flip` carry the reversed label."""
    rows = []
    for i in range(count):
        kind, rude = f"Happy to help, {COLOURS[i % 8]} is lovely.", f"Go away, I hate {COLOURS[i % 8]}."
        chosen, rejected = (rude, kind) if i in flip else (kind, rude)
        rows.append({"prompt": f"Tell me about the colour {COLOURS[i % 8]} (question {i}).",
                     "chosen": chosen, "rejected": rejected})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs_recipe(folder: Path, model: Path, trainer: str, **sections) -> Path:
    """An offline recipe on the colour preference pairs; `sections` update the YAML."""
    values = {
        "trainer": trainer, "output_dir": str(folder / "run"), "model": {"path": str(model)},
        "data": {"path": str(write_pairs(folder / "pairs.jsonl")), "eval_path": str(write_pairs(folder / "eval.jsonl", 8))},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-3, "bf16": False},
    }
    for key, value in sections.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def write_demos(folder: Path) -> dict:
    """SFT demonstrations naming colours; returns the `data:` section that reads them."""
    demos = [{"prompt": f"Name colour {i}.", "completion": f"The colour is {COLOURS[i % 8]}."} for i in range(24)]
    (folder / "demos.jsonl").write_text("".join(json.dumps(d) + "\n" for d in demos))
    return {"path": str(folder / "demos.jsonl"), "eval_path": None}
