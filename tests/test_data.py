"""Prompt data: file formats, chat messages, and the stateless per-step prompt order."""

from __future__ import annotations

import json
import re

import datasets
import pytest
from transformers import AutoTokenizer

from alignment.config import DataConfig
from alignment.data import (
    DataError, encode_prompt, load_demonstrations, load_pairs, load_prompts, read_rows, step_indices,
)


def test_json_jsonl_and_parquet_rows(tmp_path):
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": [{"role": "user", "content": "b"}]}]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list([{"prompt": "a", "answer": "1"}, {"prompt": "c", "answer": "2"}]).to_parquet(
        str(tmp_path / "p.parquet"))
    assert read_rows(tmp_path / "p.json") == rows == read_rows(tmp_path / "p.jsonl")
    assert [r["prompt"] for r in read_rows(tmp_path / "p.parquet")] == ["a", "c"]
    with pytest.raises(DataError, match="unsupported data file type '.txt'"):
        (tmp_path / "p.txt").write_text("prompt\na\n")  # csv is read since issue 27 (tests/test_data_sources.py)
        read_rows(tmp_path / "p.txt")


def test_chat_messages_and_suffix(tmp_path, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n"
                                      + json.dumps({"prompt": "hi"}) + "\n")
    train, held_out = load_prompts(DataConfig(source="file", path=str(tmp_path / "p.jsonl"), prompt_suffix="!"),
                                   seed=0)
    assert held_out == [] and train[1].prompt == "hi!" and train[0].prompt[0]["content"] == "hi"
    chat = tokenizer.decode(encode_prompt(tokenizer, "hi", chat_template=True))
    assert "<|im_start|>user\nhi<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(encode_prompt(tokenizer, "hi", chat_template=False)) == "hi"


def test_reasoning_gym_train_and_held_out_sets_differ():
    cfg = DataConfig(source="reasoning_gym", task="chain_sum", size=20, eval_size=10,
                     task_args={"min_terms": 2, "max_terms": 2})
    train, held_out = load_prompts(cfg, seed=0)
    assert len(train) == 20 and len(held_out) == 10
    assert [e.prompt for e in train] != [e.prompt for e in held_out[:10]]
    assert all(e.entry["metadata"]["source_dataset"] == "chain_sum" for e in train)


def test_step_order_is_a_permutation_per_epoch_and_stateless():
    epoch = [i for step in range(5) for i in step_indices(step, 4, 20, seed=3)]
    assert sorted(epoch) == list(range(20))
    assert step_indices(2, 4, 20, seed=3) == epoch[8:12]  # any step can be recomputed on resume
    assert step_indices(5, 4, 20, seed=3) != step_indices(0, 4, 20, seed=3)  # a new order next epoch


GOOD = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No.", "completion": "Hi!"}
MALFORMED = [  # (field, value, what the message says after `field 'NAME'`)
    ("prompt", ["a", "b"], "[0]: expected a message object, got str"),
    ("prompt", [{"role": "user"}], "[0]: message has no 'content'"),
    ("prompt", [{"role": "user", "content": "a"}, {"content": "b"}], "[1]: message has no 'role'"),
    ("prompt", [{"role": "robot", "content": "a"}], "[0]: message role must be one of system, user, assistant, tool"),
    ("prompt", [{"role": "user", "content": ["a"]}], "[0]: message 'content' must be str, got list"),
    ("prompt", [{"role": "user", "content": " "}], ": every message is empty"),
    ("prompt", [], ": no messages"),
    ("prompt", "", ": empty text"),
    ("chosen", [1, 2], "[0]: expected a message object, got int"),
    ("rejected", "  \n", ": empty text"),
    ("completion", [], ": no messages"),
]


def _loaders():
    from rewards.comparisons import load_comparisons

    def comparisons(cfg, seed):
        return load_comparisons(cfg, "binary", seed, reasoning=False)

    return {"prompts": (load_prompts, ("prompt",)), "pairs": (load_pairs, ("prompt", "chosen", "rejected")),
            "demonstrations": (load_demonstrations, ("prompt", "completion")),
            "comparisons": (comparisons, ("prompt",))}


@pytest.mark.parametrize("loader", ["prompts", "pairs", "demonstrations", "comparisons"])
@pytest.mark.parametrize("field, value, problem", MALFORMED, ids=lambda v: str(v)[:30])
def test_malformed_conversation_names_file_row_and_field(tmp_path, loader, field, value, problem):
    load, fields = _loaders()[loader]
    good = {**GOOD, "response_a": "Hi!", "response_b": "No.", "label": "A"}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n" + json.dumps({**good, field: value}) + "\n")
    if field not in fields:  # a field this loader does not read: the rows load
        assert len(load(DataConfig(path=str(path)), 0)[0]) == 3
        return
    with pytest.raises(DataError) as error:
        load(DataConfig(path=str(path)), 0)
    assert str(error.value) == f"{path}: row 4: field '{field}'{problem}" + (
        f", got {value[0]['role']!r}" if "role must be" in problem else "")


def test_demonstration_messages_need_a_prompt_and_a_final_assistant_text(tmp_path):
    path = tmp_path / "demos.json"
    for messages, problem in [
        ([{"role": "assistant", "content": "x"}], "must be a prompt, then an assistant message with text"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], "must be a prompt, then an"),
        ([{"role": "user", "content": "q"}, {"role": "assistant"}], "[1]: message has no 'content'"),
        ("q", "must be list, got str"),
    ]:
        path.write_text(json.dumps([{"messages": messages}]))
        with pytest.raises(DataError, match=rf"{path}: row 1: field 'messages'.*{re.escape(problem)}"):
            load_demonstrations(DataConfig(path=str(path)), 0)
    path.write_text(json.dumps([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]))
    assert load_demonstrations(DataConfig(path=str(path)), 0)[0][0].completion == [{"role": "assistant", "content": "a"}]


def test_non_utf8_file_names_file_row_and_byte(tmp_path):
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{jsonl}: row 2: not UTF-8 text \(byte 31 of the file\)$"):
        load_prompts(DataConfig(path=str(jsonl)), 0)
    whole = tmp_path / "latin1.json"
    whole.write_bytes(b'[{"prompt": "a"},\n {"prompt": "caf\xe9"}]')
    with pytest.raises(DataError, match=rf"^{whole}: not UTF-8 text \(byte 34, line 2\)$"):
        load_pairs(DataConfig(path=str(whole)), 0)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    with pytest.raises(DataError, match=rf"^{deep}: JSON nested too deeply$"):
        read_rows(deep)


def test_missing_answer_under_a_verifiable_reward_fails_at_load(capsys, tmp_path, tiny_model):
    from align.cli import main
    from tests.support.recipes import toy_recipe

    prompts = tmp_path / "math.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n" + json.dumps({"prompt": "2+2?"}) + "\n")
    recipe = toy_recipe(tmp_path, tiny_model, data={"path": str(prompts), "eval_path": None})
    assert main(["train", str(recipe), "reward.type=verifiable", f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert f"error: {prompts}: row 2: missing field 'answer' (reward.type=verifiable checks each response" in err
    assert not (tmp_path / "out").exists()
    prompts.write_text(json.dumps({"prompt": "1+1?", "answer": ["2"]}) + "\n")
    assert main(["train", str(recipe), "reward.type=verifiable", f"output_dir={tmp_path / 'out'}"]) == 2
    assert "row 1: field 'answer' must be str or int or float, got list" in capsys.readouterr().err
    # without a verifiable reward the answer is optional
    train, _ = load_prompts(DataConfig(path=str(prompts)), 0)
    assert train[0].answer == ["2"]
