"""Seeded fuzzing of what users hand in: malformed data rows through every loader raise DataError
naming the file and the row; malformed config overrides raise ConfigError; valid ones still load."""

from __future__ import annotations

import json
import random

import pytest

from align.cli import build_config
from alignment.config import ConfigError, DataConfig, _all_keys
from alignment.data import DataError, load_demonstrations, load_pairs, load_prompts
from rewards.comparisons import load_comparisons
from tests.support.recipes import toy_recipe

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]


def _comparisons(cfg, seed):
    return load_comparisons(cfg, "binary", seed, reasoning=True)


def _verifiable_prompts(cfg, seed):
    return load_prompts(cfg, seed, answer_needed_by="reward.type=verifiable")


# loader -> (load function, a valid row, {field: kind} of what the loader reads)
LOADERS = {
    "prompts": (load_prompts, {"prompt": "Say hi."}, {"prompt": "conversation"}),
    "verifiable_prompts": (_verifiable_prompts, {"prompt": MESSAGES, "answer": "7"},
                           {"prompt": "conversation", "answer": "answer"}),
    "pairs": (load_pairs, {"prompt": MESSAGES, "chosen": "Hi!", "rejected": [{"role": "assistant", "content": "No."}],
                           "strength": 2}, {"prompt": "conversation", "chosen": "conversation",
                                            "rejected": "conversation", "strength": "strength"}),
    "demonstrations": (load_demonstrations, {"prompt": "Say hi.", "completion": "Hi!"},
                       {"prompt": "conversation", "completion": "conversation"}),
    "comparisons": (_comparisons, {"prompt": "Say hi.", "response_a": "Hi!", "response_b": "No.", "label": "B",
                                   "reasoning": "A is rude."},
                    {"prompt": "conversation", "response_a": "text", "response_b": "text", "label": "label",
                     "reasoning": "text"}),
}

# values each kind of field cannot take
_ANY_BAD = [None, True, 3.5, {"role": "user", "content": "x"}]
BAD = {
    "conversation": _ANY_BAD + [7, "", "  \n", [], ["Say hi."], [1, 2], [[MESSAGES[1]]], [None],
                                [{"role": "user"}], [{"content": "x"}], [{"role": "robot", "content": "x"}],
                                [{"role": ["user"], "content": "x"}], [{"role": "user", "content": 3}],
                                [{"role": "user", "content": None}], [{"role": "user", "content": ["x"]}],
                                [{"role": "user", "content": " "}], [MESSAGES[1], "tail"]],
    "text": _ANY_BAD + [7, "", " ", ["Hi!"], [{"role": "assistant", "content": "Hi!"}]],
    "answer": [None, True, "", " ", [], ["7"], {"value": 7}],
    "strength": [True, 1.5, "2", [2], {"s": 2}],
    "label": _ANY_BAD + [0, 4, -4, "C", "", "a", ["A"]],
}
NOT_OBJECTS = [None, 1, "row", [], [{"prompt": "x"}], 2.5, True]


def _malformed_file(rng: random.Random, folder, case: int, loader: str) -> tuple[str, int | None, str]:
    """A json or jsonl file of valid rows with (mostly) one malformed row; returns (path, the bad row's
    number or None when every row is valid, what was done)."""
    _, good, fields = LOADERS[loader]
    rows = [json.dumps(good) for _ in range(rng.randint(1, 6))]
    suffix = rng.choice([".json", ".jsonl"])
    path = folder / f"case{case}{suffix}"
    bad_at = rng.randrange(len(rows) + 1)
    kind = rng.choice(["valid", "value", "value", "value", "missing", "not_object", "bad_json", "bad_bytes", "nesting"])
    field = rng.choice(sorted(fields))
    row = dict(good)
    if kind == "valid":
        bad_at = None
    elif kind == "value":
        row[field] = rng.choice(BAD[fields[field]])
    elif kind == "missing" and fields[field] != "strength":  # strength is optional
        del row[field]
    elif kind == "nesting":
        value = MESSAGES
        for _ in range(rng.randint(1, 30)):
            value = [value] if rng.random() < 0.7 else {"content": value}
        row[field] = value
    else:
        row = rng.choice(NOT_OBJECTS)
    text = json.dumps(row)
    if kind == "bad_json":
        text = text[: rng.randrange(1, len(text))] if len(text) > 1 else "{"
    if bad_at is not None:
        rows.insert(bad_at, text)
    if suffix == ".jsonl":
        body = "\n".join(rows).encode() + b"\n"
    else:
        body = ("[" + ",\n".join(rows) + "]").encode()
    if kind == "bad_bytes" and bad_at is not None:
        lines = body.split(b"\n")
        line = lines[bad_at]
        cut = rng.randrange(len(line) + 1)
        lines[bad_at] = line[:cut] + rng.choice([b"\xe9", b"\xff", b"\xc3\x28", b"\x80abc", b"\xed\xa0\x80"]) + line[cut:]
        body = b"\n".join(lines)
    path.write_bytes(body)
    return str(path), (None if bad_at is None else bad_at + 1), f"{kind} {field}"


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_malformed_rows_raise_data_error_naming_file_and_row(tmp_path, loader):
    rng = random.Random(f"rows-{loader}")
    load, _, _ = LOADERS[loader]
    outcomes = {"valid": 0, "error": 0}
    for case in range(80):
        path, bad_row, what = _malformed_file(rng, tmp_path, case, loader)
        cfg = DataConfig(path=path, eval_fraction=rng.choice([0.0, 0.3]))
        try:
            train, held = load(cfg, seed=case)
        except DataError as e:
            message = str(e)
            assert message.startswith(f"{path}: "), (what, message)
            if bad_row is not None:  # a whole-json syntax or byte error is placed by line (= row here)
                assert f"row {bad_row}:" in message or f"line {bad_row}" in message, (what, message)
            outcomes["error"] += 1
        else:
            assert bad_row is None or what.startswith("missing strength"), (what, path)
            assert len(train) + len(held) >= 1
            outcomes["valid"] += 1
    assert outcomes["valid"] >= 5 and outcomes["error"] >= 50, outcomes


VALUES = ["-1", "0", "1", "2", "0.5", "1.5", "-0.5", "1e309", ".nan", ".inf", "-.inf", "nan", "[1,", "{a: 1}",
          "{", "'x'", '"unterminated', "true", "null", "", "abc", "!!float x", "!!int 1.5", "2020-01-01",
          "caf\u00e9", "9" * 40, "[]", "[a, b]", "&a [*a]", "*undefined", "a: b: c", "@x", "- 1", "\t", "~",
          "0x1F", "1_000", "+3"]
ODD_KEYS = ["", ".", "train..lr", "train.lr.x", "train.", "=", "model", "rollout", "unknown.key", "pmd.tau.x",
            "reward.judge", "reward.judge.nope", " train.lr", "train.lr "]


def test_malformed_overrides_raise_config_error(tmp_path, tiny_model):
    recipe = toy_recipe(tmp_path, tiny_model)
    keys = [k for k in _all_keys(build_config(str(recipe), [])[0].config_class) if k != "trainer"]
    rng = random.Random("overrides")
    outcomes = {"valid": 0, "error": 0}
    for _ in range(300):
        overrides = [f"{rng.choice(keys + ODD_KEYS)}={rng.choice(VALUES)}" for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.05:
            overrides.append(rng.choice(["train.lr", "no equals sign"]))
        try:
            build_config(str(recipe), overrides)
        except ConfigError as e:
            assert str(e), overrides
            outcomes["error"] += 1
        else:
            outcomes["valid"] += 1
    assert outcomes["error"] >= 150 and outcomes["valid"] >= 10, outcomes


def test_valid_overrides_still_load(tmp_path, tiny_model):
    recipe = toy_recipe(tmp_path, tiny_model)
    _, cfg = build_config(str(recipe), ["train.lr=2e-5", "rollout.top_p=1", "rollout.temperature=0",
                                        "data.eval_fraction=0.25", "train.save_every=0", "reward.judge.retries=0",
                                        "peft.type=lora", "peft.dropout=0.1", "rollout.sync_tolerance=null"])
    assert (cfg.train.lr, cfg.rollout.top_p, cfg.rollout.temperature, cfg.data.eval_fraction) == (2e-5, 1.0, 0.0, 0.25)
    assert cfg.reward.judge.retries == 0 and cfg.peft.dropout == 0.1 and cfg.rollout.sync_tolerance is None
