"""Reward and preference encodings past max_length: the response stays whole, the prompt loses its
start, and a reward model is served at the length it was trained at."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from alignment.config import load_config
from alignment.models import builtin_minilm
from rewards.preference_model import encode_comparison
from rewards.reward_model import RewardScorer, encode_for_reward, encode_texts
from trainers.reward_model import RewardModelConfig, RewardModelTrainer

LONG_PROMPT = "Tell me everything about the history of the number " + " and ".join(str(i) for i in range(200)) + "."
RESPONSES = ["It is a lovely number, truly.", "No idea, sorry.", "Numbers are boring, ask something else."]


def _decoded(tokenizer, encoded) -> list[str]:
    return tokenizer.batch_decode([ids[mask.bool()] for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])])


def test_chat_template_keeps_the_response_whole(rm_dir):
    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    encoded = encode_for_reward(tokenizer, [LONG_PROMPT] * 3, RESPONSES, max_length=64)
    assert encoded["input_ids"].shape[1] == 64
    for text, response in zip(_decoded(tokenizer, encoded), RESPONSES):
        assert text.rstrip().endswith(f"{response}<|im_end|>")  # the turn's end, read by the model
        assert "history of the number" not in text  # the prompt lost its start
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": LONG_PROMPT},
                                            {"role": "assistant", "content": r}], tokenize=False) for r in RESPONSES]
    same = encode_texts(tokenizer, texts, max_length=64)  # /get_reward's full texts are cut alike
    assert torch.equal(same["input_ids"], encoded["input_ids"])


def test_encoder_pairs_keep_the_response_and_the_end_of_the_prompt():
    tokenizer = AutoTokenizer.from_pretrained(builtin_minilm())
    encoded = encode_for_reward(tokenizer, [LONG_PROMPT] * 3, RESPONSES, max_length=48)
    assert encoded["input_ids"].shape[1] == 48 and "token_type_ids" in encoded
    for text, response in zip(_decoded(tokenizer, encoded), RESPONSES):
        assert text.startswith("[CLS]") and text.endswith(f"[SEP] {response.lower()} [SEP]")
        assert "199. [SEP]" in text and "history" not in text  # the prompt's end stays next to the response
    short = encode_for_reward(tokenizer, ["Hi."], ["Hello there."], max_length=48)
    assert _decoded(tokenizer, short) == ["[CLS] hi. [SEP] hello there. [SEP]"]  # nothing cut when it fits
    # a response longer than the whole budget keeps its start (and the [CLS]/[SEP] frame)
    (text,) = _decoded(tokenizer, encode_for_reward(tokenizer, ["Hi."], [LONG_PROMPT], max_length=16))
    assert text.startswith("[CLS] [SEP] tell me everything") and text.endswith("[SEP]")


def test_preference_encoding_keeps_both_responses():
    tokenizer = AutoTokenizer.from_pretrained(builtin_minilm())
    (text,) = _decoded(tokenizer, encode_comparison(tokenizer, [LONG_PROMPT], ["Yes."], ["No."], max_length=40))
    assert text.endswith("[SEP] response a : yes. response b : no. [SEP]") and "history" not in text


def test_long_prompts_still_tell_responses_apart_in_training_and_serving(tmp_path, rm_dir):
    """Before: past max_length the three responses scored the same and long pairs had margin 0."""
    scorer = RewardScorer.from_dir(rm_dir, max_length=64)
    rewards = scorer.score([LONG_PROMPT] * 3, RESPONSES)
    assert min(abs(a - b) for a, b in [(rewards[0], rewards[1]), (rewards[0], rewards[2]), (rewards[1], rewards[2])]) > 1e-3

    rows = [{"prompt": LONG_PROMPT, "chosen": RESPONSES[0], "rejected": r} for r in RESPONSES[1:]]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    values = {"trainer": "reward_model", "output_dir": str(tmp_path / "run"), "model": {"path": str(rm_dir)},
              "data": {"path": str(tmp_path / "pairs.jsonl")}, "rm": {"max_length": 64},
              "train": {"max_steps": 1, "batch_size": 2, "bf16": False}}
    trainer = RewardModelTrainer(load_config(RewardModelConfig, values))
    with torch.no_grad():
        margins, _ = trainer.margins(trainer.train_set)
    assert margins.abs().min() > 1e-3

    trainer.train()  # final/ records the trained length; the scorer (and so serve-rm) uses it
    final = tmp_path / "run" / "final"
    assert json.loads((final / "config.json").read_text())["reward_max_length"] == 64
    served = RewardScorer.from_dir(final)
    assert served.max_length == 64
    with torch.no_grad():
        trained = trainer.module(**encode_for_reward(trainer.tokenizer, [LONG_PROMPT] * 3, RESPONSES, 64)).tolist()
    assert served.score([LONG_PROMPT] * 3, RESPONSES) == pytest.approx(trained, abs=1e-4)
