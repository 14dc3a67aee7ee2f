"""Prompt data: file formats, chat messages, and the stateless per-step prompt order."""

from __future__ import annotations

import json

import datasets
import pytest
from transformers import AutoTokenizer

from alignment.config import DataConfig
from alignment.data import DataError, encode_prompt, load_prompts, read_rows, step_indices


def test_json_jsonl_and_parquet_rows(tmp_path):
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": [{"role": "user", "content": "b"}]}]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list([{"prompt": "a", "answer": "1"}, {"prompt": "c", "answer": "2"}]).to_parquet(
        str(tmp_path / "p.parquet"))
    assert read_rows(tmp_path / "p.json") == rows == read_rows(tmp_path / "p.jsonl")
    assert [r["prompt"] for r in read_rows(tmp_path / "p.parquet")] == ["a", "c"]
    with pytest.raises(DataError, match="unsupported data file type '.csv'"):
        (tmp_path / "p.csv").write_text("prompt\na\n")
        read_rows(tmp_path / "p.csv")


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
