"""Data sources as TRL and OpenRLHF users have them (issue 27): csv / arrow files, save_to_disk folders,
folders of data files, hub-style datasets (loaded from local folders through the same code path), column
maps, weighted mixtures, prompt-length caps, and TRL's implicit-prompt and repeated-prompt preference rows."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import datasets
import pytest
from pyarrow import feather

from alignment.config import BaseConfig, ConfigError, DataConfig, load_config
from alignment.data import (
    DataError, Example, cap_prompt_length, encode_conversations, encode_prompt, load_demonstrations, load_pairs,
    load_prompts,
)

MATH = [{"question": f"What is {i} + {i}?", "solution": str(2 * i), "level": i % 3} for i in range(6)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from alignment.models import builtin_smollm2

    return AutoTokenizer.from_pretrained(builtin_smollm2())


# ---- item 2: where the data comes from ----------------------------------------------------------------

def test_csv_arrow_and_save_to_disk_files(tmp_path):
    table = datasets.Dataset.from_list(MATH)
    table.to_csv(str(tmp_path / "math.csv"), index=False)
    feather.write_feather(table.data.table, str(tmp_path / "ipc.arrow"))  # an Arrow IPC (Feather v2) file
    table.save_to_disk(str(tmp_path / "saved"))  # a Dataset folder, whose shard is an .arrow stream file
    shard = next((tmp_path / "saved").glob("*.arrow"))
    columns = {"prompt": "question", "answer": "solution"}
    for path in [tmp_path / "math.csv", tmp_path / "ipc.arrow", shard, tmp_path / "saved"]:
        train, held = load_prompts(DataConfig(path=str(path), columns=columns), seed=0)
        assert [e.prompt for e in train] == [r["question"] for r in MATH], path
        assert [str(e.answer) for e in train] == [r["solution"] for r in MATH]
        assert held == []  # one table: no eval split
        assert train[4].row == 5 and train[4].origin == str(path)


def test_dataset_dict_folder_picks_split_and_eval_split(tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict({
        "train_prefs": datasets.Dataset.from_list(MATH[:4]), "test_prefs": datasets.Dataset.from_list(MATH[4:]),
    }).save_to_disk(str(folder))
    cfg = DataConfig(path=str(folder), split="train_prefs", eval_split="test_prefs", columns={"prompt": "question"})
    train, held = load_prompts(cfg, seed=0)
    assert [e.prompt for e in train] == [r["question"] for r in MATH[:4]]
    assert [e.prompt for e in held] == [r["question"] for r in MATH[4:]]
    assert held[0].origin == f"{folder}[test_prefs]" and held[0].row == 1
    # eval_size caps the held-out split; a split that is not there is an error naming the ones that are
    assert len(load_prompts(DataConfig(**{**vars(cfg), "eval_size": 1}), seed=0)[1]) == 1
    with pytest.raises(DataError, match=rf"^{folder}: no split 'train' \(it has train_prefs, test_prefs\)"):
        load_prompts(DataConfig(path=str(folder), columns={"prompt": "question"}), seed=0)
    # eval_path: its eval split, or its only split
    _jsonl(tmp_path / "held" / "only.jsonl", [{"question": "held?"}])
    cfg = DataConfig(path=str(folder), split="train_prefs", eval_path=str(tmp_path / "held"),
                     columns={"prompt": "question"})
    assert [e.prompt for e in load_prompts(cfg, seed=0)[1]] == ["held?"]


def test_folder_of_data_files_and_hub_style_dataset_with_config_name(tmp_path):
    plain = tmp_path / "plain"
    _jsonl(plain / "train.jsonl", MATH[:5])
    _jsonl(plain / "test.jsonl", MATH[5:])
    train, held = load_prompts(DataConfig(path=str(plain), columns={"prompt": "question"}), seed=0)
    assert (len(train), len(held)) == (5, 1) and held[0].origin == f"{plain}[test]"
    # a hub repository's layout (gsm8k: configs `main` and `socratic`), loaded by name with
    # data.source=datasets: datasets.load_dataset(path, name) exactly as for a hub name
    hub = tmp_path / "gsm8k"
    _jsonl(hub / "main" / "train.jsonl", MATH[:4])
    _jsonl(hub / "main" / "test.jsonl", MATH[4:])
    _jsonl(hub / "socratic" / "train.jsonl", [{**r, "question": "Socratic: " + r["question"]} for r in MATH])
    (hub / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train.jsonl\n"
        "  - split: test\n    path: main/test.jsonl\n- config_name: socratic\n  data_files:\n  - split: train\n"
        "    path: socratic/train.jsonl\n---\n")
    cfg = DataConfig(source="datasets", path=str(hub), name="main",
                     columns={"prompt": "question", "answer": "solution"})
    train, held = load_prompts(cfg, seed=0, answer_needed_by="reward.type=verifiable")
    assert [e.answer for e in train] == ["0", "2", "4", "6"] and [e.answer for e in held] == ["8", "10"]
    assert train[0].origin == f"{hub}:main[train]"
    held = load_prompts(DataConfig(**{**vars(cfg), "eval_path": str(plain / "test.jsonl")}), seed=0)[1]
    assert [e.answer for e in held] == ["10"]  # a local eval file next to a hub dataset
    train, held = load_prompts(DataConfig(**{**vars(cfg), "name": "socratic"}), seed=0)
    assert len(train) == 6 and train[0].prompt.startswith("Socratic: ") and held == []  # no test split there
    with pytest.raises(DataError, match=rf"^cannot load dataset '{hub}' \(config nope\): ValueError: .*'nope'"):
        load_prompts(DataConfig(**{**vars(cfg), "name": "nope"}), seed=0)
    with pytest.raises(DataError, match=r"data file not found: no/such/dataset \(a hub dataset needs data.source="):
        load_prompts(DataConfig(path="no/such/dataset"), seed=0)


def test_column_map_fills_extra_and_names_missing_columns(tmp_path):
    rows = [{**r, "id": f"q{i}"} for i, r in enumerate(MATH[:3])]
    path = _jsonl(tmp_path / "math.jsonl", rows)
    train, _ = load_prompts(DataConfig(path=str(path), columns={"prompt": "question", "answer": "solution"}), seed=0)
    assert train[1].prompt == "What is 1 + 1?" and train[1].answer == "2"
    # every field but ours (prompt, answer), mapped names included, without the internal _row
    assert train[1].extra == {"question": "What is 1 + 1?", "solution": "2", "level": 1, "id": "q1"}
    unmapped, _ = load_prompts(DataConfig(path=str(_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "answer": 1,
                                                                                   "solution": "s"}]))), seed=0)
    assert unmapped[0].extra == {"solution": "s"}
    _jsonl(path, rows[:2] + [{"question": "no solution"}])
    with pytest.raises(DataError) as error:
        load_prompts(DataConfig(path=str(path), columns={"prompt": "question", "answer": "solution"}), seed=0)
    assert str(error.value) == f"{path}: row 3: missing column 'solution' (data.columns maps answer <- solution)"
    # pairs and demonstrations are mapped the same way
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"instruction": "Hi?", "good": "Hello!", "bad": "Go."}])
    (pair,), _ = load_pairs(DataConfig(path=str(pairs), columns={"prompt": "instruction", "chosen": "good",
                                                                   "rejected": "bad"}), seed=0)
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Hi?", "Hello!", "Go.")
    demos = _jsonl(tmp_path / "demos.jsonl", [{"conversations": [_user("Hi?"), _bot("Hello!")]}])
    (demo,), _ = load_demonstrations(DataConfig(path=str(demos), columns={"messages": "conversations"}), seed=0)
    assert demo.completion == [_bot("Hello!")]
    with pytest.raises(ConfigError, match=r"^data.columns: unknown field 'promt' \(ours: prompt, answer, chosen"):
        DataConfig(path=str(path), columns={"promt": "question"})
    with pytest.raises(ConfigError, match=r"^data.columns.prompt: expected the name of a field of the data"):
        load_config(BaseConfig, {"data": {"path": "x.jsonl", "columns": {"prompt": 3}}})


def test_bad_rows_of_csv_and_datasets_name_file_row_and_field(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,answer\nfine,1\n   ,2\n")
    with pytest.raises(DataError, match=rf"^{path}: row 2: field 'prompt': empty text$"):
        load_prompts(DataConfig(path=str(path)), seed=0)
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"},
                                                               {"prompt": "a", "chosen": "b", "rejected": ""}])
                          }).save_to_disk(str(folder))
    with pytest.raises(DataError, match=rf"^{folder}\[train\]: row 2: field 'rejected': empty text$"):
        load_pairs(DataConfig(path=str(folder)), seed=0)


# ---- mixtures --------------------------------------------------------------------------------------------

def test_mixture_shares_are_exact_and_seeded(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}"} for i in range(30)])
    b = _jsonl(tmp_path / "b" / "train.jsonl", [{"question": f"b{i}"} for i in range(10)])
    _jsonl(tmp_path / "b" / "test.jsonl", [{"question": f"held b{i}"} for i in range(3)])

    def mix(wa, wb, seed=0, **data):
        cfg = load_config(BaseConfig, {"data": {"mixture": [
            {"path": str(a), "weight": wa, "eval_fraction": 0.1},
            {"path": str(tmp_path / "b"), "weight": wb, "columns": {"prompt": "question"}}], **data}}).data
        return load_prompts(cfg, seed)

    train, held = mix(1, 1)
    # the mix has as many rows as its sources together (27 + 10 = 37 after a's held-out tenth)
    origins = Counter(e.prompt[0] for e in train)
    assert len(train) == 37 and origins == {"a": 19, "b": 18}  # 18.5 each: the larger remainder goes first
    assert Counter(Counter(e.prompt for e in train if e.prompt[0] == "b").values()) == {2: 8, 1: 2}  # upsampled
    assert len({e.prompt for e in train if e.prompt[0] == "a"}) == 19  # drawn without replacement
    assert [e.prompt for e in train] == [e.prompt for e in mix(1, 1)[0]]  # reproducible for a seed
    assert [e.prompt for e in train] != [e.prompt for e in mix(1, 1, seed=1)[0]]
    # held-out: each source's own (a's eval_fraction, b's test split), interleaved
    assert [e.prompt[0] for e in held] == ["a", "h"] * 3 and [e.prompt for e in held[1::2]] == ["held b0", "held b1",
                                                                                                 "held b2"]
    train, _ = mix(1, 2)
    assert Counter(e.prompt[0] for e in train) == {"a": 12, "b": 25}  # 12.33 / 24.67
    train, _ = mix(27, 10)
    assert sorted(e.prompt for e in train if e.prompt[0] == "b") == sorted(f"b{i}" for i in range(10))
    _, held = mix(1, 1, eval_path=str(a), eval_size=5)  # one held-out set for the whole mix
    assert [e.prompt for e in held] == [f"a{i}" for i in range(5)]


def test_mixture_of_a_file_and_a_reasoning_gym_task_and_of_pairs(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "answer": i} for i in range(8)])
    cfg = DataConfig(mixture=[{"path": str(a), "weight": 1},
                              {"source": "reasoning_gym", "task": "chain_sum", "size": 8, "weight": 3}], eval_size=4)
    train, held = load_prompts(cfg, seed=0, answer_needed_by="reward.type=verifiable")
    assert Counter(e.origin for e in train) == {str(a): 4, "reasoning_gym:chain_sum": 12}
    assert len(held) == 4 and all(e.origin == "reasoning_gym:chain_sum" for e in held)
    gym = next(e for e in train if e.entry is not None)
    assert set(gym.extra) == {"metadata"}  # the entry's fields besides question and answer
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(6)])
    train, _ = load_pairs(DataConfig(mixture=[{"path": str(pairs)}, {"path": str(pairs), "weight": 2}]), seed=0)
    assert [p.index for p in train] == list(range(12))  # renumbered by place in the mix (outliers.jsonl)


@pytest.mark.parametrize("entry, message", [
    ({"path": "a.jsonl", "wieght": 2}, "data.mixture[1]: unknown key 'wieght' (valid keys: weight, source, path, name, "
                                       "split, eval_split, eval_path, eval_fraction, eval_size, columns, task"),
    ({"path": "a.jsonl", "weight": 0}, "data.mixture[1].weight: expected a number > 0, got 0"),
    ({"path": "a.jsonl", "weight": "high"}, "data.mixture[1].weight: expected a number > 0, got 'high'"),
    ({"weight": 1}, "data.mixture[1].path: required"),
    ({"path": "a.jsonl", "split": 3}, "data.mixture[1].split: expected str, got 3"),
    ({"path": "a.jsonl", "columns": {"prompt": "q", "bogus": "x"}}, "data.columns: unknown field 'bogus'"),
])
def test_mixture_entries_are_checked(entry, message):
    with pytest.raises(ConfigError) as error:
        load_config(BaseConfig, {"data": {"mixture": [{"path": "b.jsonl"}, entry]}})
    assert str(error.value).startswith(message), str(error.value)
    with pytest.raises(ConfigError, match="give either data.mixture or data.path"):
        load_config(BaseConfig, {"data": {"path": "a.jsonl", "mixture": [{"path": "b.jsonl"}]}})


# ---- prompt caps ---------------------------------------------------------------------------------------

def _capped_prompts(tmp_path, **data):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi."}, {"prompt": "word " * 60}, {"prompt": "Yo."},
                                         {"prompt": "many " * 80}])
    cfg = DataConfig(path=str(path), eval_path=str(path), max_prompt_length=48, **data)
    return path, cfg, *load_prompts(cfg, seed=0)


def test_prompt_cap_drop_truncate_and_error(tmp_path, tokenizer):
    def encode(prompt):
        return encode_prompt(tokenizer, prompt, chat_template=True)

    path, cfg, train, held = _capped_prompts(tmp_path, long_prompts="drop")
    assert len(encode(train[0].prompt)) < 48 < len(encode(train[1].prompt))  # the chat template counts
    same, kept, kept_held, line = cap_prompt_length(cfg, encode, train, held)
    assert same is encode and [e.row for e in kept] == [1, 3] and [e.row for e in kept_held] == [1, 3]
    assert line == ("data.max_prompt_length=48: 2 of 4 training prompts and 2 of 4 held-out ones are longer "
                    "(tokens after the chat template): dropped")
    path, cfg, train, held = _capped_prompts(tmp_path, long_prompts="truncate_left")
    cut, kept, _, line = cap_prompt_length(cfg, encode, train, held)
    assert len(kept) == 4 and line.endswith("cut to their last 48 tokens")
    assert cut(train[1].prompt) == encode(train[1].prompt)[-48:] and cut(train[0].prompt) == encode(train[0].prompt)
    assert tokenizer.decode(cut(train[1].prompt)).endswith("<|im_start|>assistant\n")  # TRL's side: the start goes
    path, cfg, train, held = _capped_prompts(tmp_path, long_prompts="error")
    with pytest.raises(DataError) as error:
        cap_prompt_length(cfg, encode, train, held)
    assert str(error.value).startswith(f"{path}: rows 2, 4 (and 2 more): prompt longer than "
                                       "data.max_prompt_length=48 tokens (the longest has ")
    assert cap_prompt_length(DataConfig(path=str(path)), encode, train, held)[3] is None  # no cap: untouched


def test_online_trainers_apply_the_cap_at_setup(capsys, caplog, tmp_path, tiny_model):
    from align.cli import build_config, main
    from tests.support.recipes import toy_recipe

    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say {i}."} for i in range(4)] + [{"prompt": "long " * 90}])
    recipe = toy_recipe(tmp_path, tiny_model, data={"path": str(prompts), "eval_path": None,
                                                    "max_prompt_length": 40, "long_prompts": "error"})
    assert main(["train", str(recipe), f"output_dir={tmp_path / 'out'}"]) == 2
    assert f"error: {prompts}: row 5: prompt longer than data.max_prompt_length=40 tokens" in capsys.readouterr().err
    trainer_cls, cfg = build_config(str(recipe), ["data.long_prompts=drop", f"output_dir={tmp_path / 'out'}"])
    with caplog.at_level(logging.INFO, logger="alignment"):
        trainer = trainer_cls(cfg)  # OnlineTrainer.setup_policy
    assert [e.row for e in trainer.train_set] == [1, 2, 3, 4]
    assert ("data.max_prompt_length=40: 1 of 5 training prompts and 0 of 0 held-out ones are longer (tokens after "
            "the chat template): dropped") in caplog.messages


def test_dpo_and_sft_apply_the_cap_and_reward_models_refuse_it(capsys, caplog, tmp_path, tiny_model):
    from align.cli import build_config, main
    from alignment.data import encode_conversations, encode_prompt
    from tests.support.recipes import pairs_recipe

    pairs = _jsonl(tmp_path / "capped.jsonl", [{"prompt": f"Say {i}.", "chosen": "Yes.", "rejected": "No."}
                                               for i in range(4)] + [{"prompt": "long " * 90, "chosen": "A", "rejected": "B"}])
    recipe = pairs_recipe(tmp_path, tiny_model, "dpo", data={"path": str(pairs), "eval_path": None,
                                                             "max_prompt_length": 40, "long_prompts": "error"})
    assert main(["train", str(recipe), f"output_dir={tmp_path / 'out'}"]) == 2
    assert f"error: {pairs}: row 5: prompt longer than data.max_prompt_length=40 tokens" in capsys.readouterr().err
    trainer_cls, cfg = build_config(str(recipe), ["data.long_prompts=drop", f"output_dir={tmp_path / 'out'}"])
    with caplog.at_level(logging.INFO, logger="alignment"):
        trainer = trainer_cls(cfg)
    assert [p.row for p in trainer.train_set] == [1, 2, 3, 4]
    assert any("1 of 5 training prompts" in m and m.endswith("dropped") for m in caplog.messages)
    # truncate_left: the prompt keeps its last 40 tokens, the response is whole (TRL's DPO max_prompt_length)
    tok = trainer.tokenizer
    long_prompt = "long " * 90
    prompts, responses = encode_conversations(tok, [long_prompt], ["A"], True, 512, max_prompt_length=40)
    full = encode_prompt(tok, long_prompt, True)
    assert prompts[0] == full[-40:] and len(full) > 40 and responses[0] == encode_conversations(
        tok, [long_prompt], ["A"], True, 512)[1][0]
    rm = pairs_recipe(tmp_path, tiny_model, "reward_model", data={"path": str(pairs), "max_prompt_length": 40})
    assert main(["train", str(rm), f"output_dir={tmp_path / 'rm-out'}"]) == 2
    assert "data.max_prompt_length: trainer reward_model cuts prompt and responses together" in capsys.readouterr().err


# ---- item 3: preference data as TRL defines it ------------------------------------------------------------

def test_implicit_prompt_is_the_shared_leading_turns(tmp_path):
    system = {"role": "system", "content": "Be kind."}
    rows = [
        {"chosen": [system, _user("Hi?"), _bot("Hello!")], "rejected": [system, _user("Hi?"), _bot("Go.")]},
        {"chosen": [_user("1?"), _bot("one"), _user("2?"), _bot("two")],
         "rejected": [_user("1?"), _bot("one"), _user("2?"), _bot("three")], "strength": 2},
        {"chosen": [_user("Same")], "rejected": [_user("Same"), _bot("x")]},  # TRL keeps each side's last turn
    ]
    path = _jsonl(tmp_path / "implicit.jsonl", rows[:2])
    (first, second), _ = load_pairs(DataConfig(path=str(path)), seed=0)
    assert first.prompt == [system, _user("Hi?")]
    assert first.chosen == [_bot("Hello!")] and first.rejected == [_bot("Go.")]
    assert second.prompt == [_user("1?"), _bot("one"), _user("2?")] and second.rejected == [_bot("three")]
    assert second.strength == 2 and second.index == 1
    for row, problem in [
        ({"chosen": [_user("A?"), _bot("a")], "rejected": [_user("B?"), _bot("b")]},
         "row 2: missing field 'prompt' (and 'chosen' and 'rejected' share no leading turns to read as the prompt)"),
        ({"chosen": [_user("A?"), _bot("a"), _user("more?"), _bot("b")], "rejected": [_user("A?"), _bot("c")]},
         "row 2: field 'chosen'[2]: after the prompt, a response holds assistant turns only, got role 'user'"),
        ({"chosen": "Hello!", "rejected": "Go."}, "row 2: missing field 'prompt'"),  # plain text: no implicit prompt
    ]:
        _jsonl(path, [rows[0], row])
        with pytest.raises(DataError) as error:
            load_pairs(DataConfig(path=str(path)), seed=0)
        assert str(error.value) == f"{path}: {problem}"


def test_repeated_prompt_turns_are_used_once(tmp_path, tokenizer):
    # HuggingFaceH4/ultrafeedback_binarized: the prompt string again as the first turn of chosen and rejected
    question = "Name a colour of the sky."
    row = {"prompt": question, "chosen": [_user(question), _bot("Blue.")],
           "rejected": [_user(question), _bot("Green.")], "score_chosen": 9.0}
    folder = tmp_path / "h4"
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list([row] * 2),
                          "test_prefs": datasets.Dataset.from_list([row])}).save_to_disk(str(folder))
    train, held = load_pairs(DataConfig(path=str(folder), split="train_prefs", eval_split="test_prefs"), seed=0)
    assert len(train) == 2 and len(held) == 1
    pair = train[0]
    assert pair.prompt == question and pair.chosen == [_bot("Blue.")] and pair.rejected == [_bot("Green.")]
    # what DPO encodes (trainers/dpo.py: encode_conversations of prompts twice, chosen then rejected)
    prompts, responses = encode_conversations(tokenizer, [pair.prompt] * 2, [pair.chosen, pair.rejected],
                                              chat_template=True, max_length=512)
    for p_ids, r_ids, answer in zip(prompts, responses, ["Blue.", "Green."]):
        text = tokenizer.decode(p_ids + r_ids)
        assert text.count(question) == 1 and text.count("<|im_start|>user") == 1 and answer in text
    # the same with a message-list prompt (a system turn too), and demonstrations
    msgs = [{"role": "system", "content": "Be brief."}, _user(question)]
    path = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": msgs, "chosen": msgs + [_bot("Blue.")], "rejected": "Green."}])
    (pair,), _ = load_pairs(DataConfig(path=str(path)), seed=0)
    assert pair.prompt == msgs and pair.chosen == [_bot("Blue.")] and pair.rejected == "Green."
    demos = _jsonl(tmp_path / "demos.jsonl", [{"prompt": question, "completion": [_user(question), _bot("Blue.")]}])
    (demo,), _ = load_demonstrations(DataConfig(path=str(demos)), seed=0)
    assert demo.completion == [_bot("Blue.")]
    # a response that holds anything but assistant turns after the prompt is an error naming the row
    for bad, problem in [
        ([_user("Another question?"), _bot("Blue.")], "field 'chosen'[0]: after the prompt, a response holds "
                                                       "assistant turns only, got role 'user'"),
        ([_user(question)], "field 'chosen': no response after the prompt's turns"),
        ([_user(question), _bot("Blue."), {"role": "tool", "content": "x"}],
         "field 'chosen'[2]: after the prompt, a response holds assistant turns only, got role 'tool'"),
    ]:
        _jsonl(path, [{**row, "chosen": bad}])
        with pytest.raises(DataError) as error:
            load_pairs(DataConfig(path=str(path)), seed=0)
        assert str(error.value) == f"{path}: row 1: {problem}"


def test_example_extra_never_holds_the_row_number():
    assert Example("x").extra == {}
