"""Think-RM's format (rewards/generative.py) and the pairwise advantage: parser, rewards, strengths,
the warm-up data builder, data errors, and the format a judge reads from a trained model."""

from __future__ import annotations

import pytest
import torch

from alignment.config import ConfigError, DataConfig, JudgeConfig
from alignment.data import DataError
from rewards.generative import (
    CRITERIA, THINK_PREFILL, GenRMFormat, build_sft_examples, load_comparisons, pair_strength, reasoning_of,
    verdict_reward,
)
from rewards.judges import LabelFormat, OpenAIJudge, judge_format
from tests.judge_server import start_judge_server
from tests.verdict_task import comparison_rows, make_pairs, teacher, write_jsonl
from trainers.grpo import group_normalised
from trainers.pairwise_rlhf import pairwise_group_advantage

BINARY, MULTI = GenRMFormat("binary"), GenRMFormat("multiclass")


@pytest.mark.parametrize("text, strength", [
    ("<think>A looks right</think><answer>A</answer>", 1),
    ("<answer>B</answer>", -1),
    ("<answer>A</answer> on reflection <answer>B</answer>", -1),  # the last block wins
    ("<answer>Assistant B</answer>", -1),  # the A of "Assistant" is not a verdict
    ("<answer>A, no: B</answer>", -1),  # the last valid token inside the block
    ("<answer>C</answer>", None),
    ("A is better", None),  # no block
    ("<answer>A", None),  # unclosed
    ("", None),
])
def test_binary_parser(text, strength):
    assert BINARY.strength(text) == strength
    assert BINARY.parse(text) == (None if strength is None else float(strength))


@pytest.mark.parametrize("text, strength", [
    ("<answer>-3</answer>", 3),  # the reference's -3: A much better -> strength +3 for A
    ("<answer>2</answer>", -2),
    ("<answer>-1</answer>", 1),
    ("<answer>1</answer> then <answer>-2</answer>", 2),
    ("<answer>0</answer>", None),  # not a valid score
    ("<answer>13</answer>", None),  # not a digit of a larger number
    ("<answer>-2.5</answer>", None),
    ("<answer>score: 3</answer>", -3),
    ("<answer>B</answer>", None),
])
def test_multiclass_parser(text, strength):
    assert MULTI.strength(text) == strength
    if strength is not None:
        assert MULTI.parse(text) == pytest.approx(strength / 3)


def test_verdict_reward_partial_credit():
    assert verdict_reward(1, 1) == 1.0 and verdict_reward(-1, 1) == 0.0 and verdict_reward(None, 1) == 0.0
    assert verdict_reward(2, 2) == 1.0  # exact
    assert verdict_reward(3, 1) == 0.5 and verdict_reward(-1, -3) == 0.5  # right side, wrong strength
    assert verdict_reward(-2, 2) == 0.0 and verdict_reward(None, -3) == 0.0


def test_pair_strength_sign_convention():
    """d > 0 means the first response (shown as A) is better."""
    a_wins = "<think>x</think><answer>A</answer>"
    assert pair_strength(BINARY, a_wins) == pytest.approx(1 / len(a_wins))  # 1 / L, L in characters
    assert pair_strength(BINARY, "<answer>B</answer>") == pytest.approx(-1 / len("<answer>B</answer>"))
    long = "<think>" + "hmm " * 50 + "</think><answer>A</answer>"
    assert 0 < pair_strength(BINARY, long) < pair_strength(BINARY, a_wins)  # longer deliberation, weaker
    assert pair_strength(BINARY, a_wins, length_weight=False) == 1.0
    assert pair_strength(MULTI, "<answer>-3</answer>") == pytest.approx(1.0)  # A much better
    assert pair_strength(MULTI, "<answer>1</answer>") == pytest.approx(-1 / 3)  # B slightly better
    assert pair_strength(BINARY, "no verdict") == 0.0


def test_pairwise_advantage_equals_grpo_for_reward_differences():
    torch.manual_seed(0)
    rewards = torch.randn(5, 4)  # 5 prompts, G = 4
    d = rewards.unsqueeze(-1) - rewards.unsqueeze(-2)  # d_ij = r_i - r_j
    assert torch.allclose(pairwise_group_advantage(d), group_normalised(rewards), atol=1e-4)
    # Scale-free: multiclass strengths in thirds give the same advantages as the reference's integers.
    assert torch.allclose(pairwise_group_advantage(d / 3), pairwise_group_advantage(d), atol=1e-3)
    # The best response of a consistent ranking gets the largest advantage; advantages sum to zero.
    ranks = torch.tensor([[3.0, 1.0, 0.0, 2.0]])
    adv = pairwise_group_advantage(torch.sign(ranks.unsqueeze(-1) - ranks.unsqueeze(-2)))
    assert adv.argmax() == 0 and adv.argmin() == 2 and abs(float(adv.sum())) < 1e-5


def test_prompt_layout_and_targets():
    fmt = GenRMFormat("binary", think_prefill=True, criteria="Check the sums.")
    system, user = fmt.messages("What is 2 + 2?", "4", "5")
    assert system["content"].startswith("Check the sums.") and "<answer>A</answer>" in system["content"]
    assert user["content"] == ("[The Start of Context]\nWhat is 2 + 2?\n[The End of Context]\n\n"
                               "[The Start of Assistant A's Response]\n4\n[The End of Assistant A's Response]\n\n"
                               "[The Start of Assistant B's Response]\n5\n[The End of Assistant B's Response]")
    assert GenRMFormat().messages("q", "a", "b")[0]["content"].startswith(CRITERIA)
    assert "-3: Assistant A's response is much better" in MULTI.messages("q", "a", "b")[0]["content"]
    # The target closes the prefilled <think> and parses back to its strength.
    target = fmt.target("2 + 2 = 4, A is right.", 1)
    assert target.endswith("</think>\n\n<answer>A</answer>") and not target.startswith(THINK_PREFILL)
    assert fmt.strength(target) == 1
    assert GenRMFormat("multiclass", think_prefill=False).target("r", -2).startswith(THINK_PREFILL)
    assert MULTI.strength(MULTI.target("r", -2)) == -2


def test_sft_ids_prefill_is_context_and_the_turn_closes(tiny_model):
    from alignment.config import ModelConfig
    from alignment.models import load_tokenizer
    from rewards.generative import Comparison

    tokenizer = load_tokenizer(ModelConfig(path=str(tiny_model)))
    fmt = GenRMFormat("binary", think_prefill=True)
    prompt_ids, target_ids = fmt.sft_ids(tokenizer, Comparison("q", "a", "b", -1, "B is right."), 4096)
    assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n" + THINK_PREFILL)
    target = tokenizer.decode(target_ids)
    assert target.startswith("B is right.") and target.endswith("<answer>B</answer><|im_end|>\n")


def test_builder_keeps_the_longest_correct_trace():
    pairs = make_pairs(60, seed=0)
    rows, counts = build_sft_examples(pairs, teacher, BINARY, seed=0)
    assert counts == {"pairs": 60, "kept": 60, "dropped": 0}
    assert {r["label"] for r in rows} == {"A", "B"}  # both positions occur
    for row, pair in zip(rows, pairs):
        chosen_is_a = row["response_a"] == pair["chosen"]
        assert row["label"] == ("A" if chosen_is_a else "B")
        assert row["reasoning"].startswith("A is worth")  # the long trace, not the terse "4 2"
        assert "Checked twice" not in row["reasoning"]  # the longer but wrong trace is never taken
        assert "<think>" not in row["reasoning"] and "<answer>" not in row["reasoning"]
    # A teacher that always says A keeps exactly the pairs whose chosen response was shown as A.
    always_a = [["<think>A</think><answer>A</answer>"] for _ in pairs]
    kept, counts = build_sft_examples(pairs, lambda p, a, b: always_a, BINARY, seed=0)
    assert counts["kept"] == sum(r["label"] == "A" for r in rows) == len(kept)
    assert counts["dropped"] == 60 - len(kept)
    rows, _ = build_sft_examples(pairs, lambda p, a, b: teacher(p, a, b, verdict="multiclass"), MULTI, seed=0)
    assert rows and all(r["label"] in (-3, -2, -1, 1, 2, 3) for r in rows)
    for row, pair in zip(rows, pairs):
        assert abs(row["label"]) == pair["strength"]
        assert (row["label"] < 0) == (row["response_a"] == pair["chosen"])  # negative: A better
    with pytest.raises(DataError, match="strength"):
        build_sft_examples([{"prompt": "p", "chosen": "a", "rejected": "b"}], teacher, MULTI)
    assert reasoning_of("<think>\nx\n</think>\n<answer>A</answer>") == "x"


def test_comparison_data_errors_name_the_file_and_row(tmp_path):
    good = write_jsonl(tmp_path / "ok.jsonl", comparison_rows(make_pairs(4, 0), 0))
    train, _ = load_comparisons(DataConfig(path=str(good)), BINARY, 0, reasoning=False)
    assert len(train) == 4 and {c.strength for c in train} <= {1, -1}
    with pytest.raises(DataError, match=r"ok.jsonl: row 1: missing field 'reasoning'"):
        load_comparisons(DataConfig(path=str(good)), BINARY, 0, reasoning=True)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response_a": "a", "response_b": "b", "label": "A"},
                                               {"prompt": "p", "response_a": "a", "response_b": "b", "label": "C"}])
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: field 'label' must be \"A\" or \"B\""):
        load_comparisons(DataConfig(path=str(bad)), BINARY, 0, reasoning=False)
    with pytest.raises(DataError, match=r"bad.jsonl: row 1: .*int in -3..3"):
        load_comparisons(DataConfig(path=str(bad)), MULTI, 0, reasoning=False)


def test_judge_format_comes_from_the_model_folder(tmp_path):
    GenRMFormat("multiclass", think_prefill=False, criteria="Sums.").save(tmp_path)
    fmt = judge_format(JudgeConfig(type="generative_rm", model=str(tmp_path)))
    assert fmt == GenRMFormat("multiclass", think_prefill=False, criteria="Sums.")
    fmt = judge_format(JudgeConfig(type="generative_rm", model=str(tmp_path), verdict="binary", think_prefill=True))
    assert fmt == GenRMFormat("binary", think_prefill=True, criteria="Sums.")  # explicit keys win
    assert isinstance(judge_format(JudgeConfig(type="openai", model="m")), LabelFormat)
    assert judge_format(JudgeConfig(type="openai", model="m", verdict="binary")) == GenRMFormat("binary")
    with pytest.raises(ConfigError, match="verdict"):
        GenRMFormat("ternary")


def test_openai_judge_in_think_rm_format_prefills_and_keeps_the_text():
    """A GenRM behind an OpenAI-compatible server: <answer> verdicts, the output text kept per call
    (for 1/L), and the <think> prefill sent as vLLM's continue_final_message."""
    with start_judge_server()[1] as server:
        judge = OpenAIJudge(JudgeConfig(base_url=server.base_url, model="rule-judge", verdict="binary",
                                        think_prefill=True))
        calls = judge.judge(["q", "q"], ["7", "1"], ["3", "9"])
        judge.close()
        body = server.bodies[0]
    assert [c.verdict for c in calls] == [1.0, -1.0]
    assert calls[0].text.endswith("<answer>A</answer>") and pair_strength(judge.fmt, calls[0].text) > 0
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["messages"][-1] == {"role": "assistant", "content": THINK_PREFILL}
