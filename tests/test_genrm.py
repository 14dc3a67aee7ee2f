"""Think-RM's format (rewards/generative.py) and the pairwise advantage: parser, rewards, strengths,
the warm-up data builder, data errors, and the format a judge reads from a trained model."""

from __future__ import annotations

import pytest
import torch

from alignment.config import ConfigError, DataConfig, JudgeConfig
from alignment.data import DataError
from rewards.comparisons import Comparison, load_comparisons
from rewards.generative import CRITERIA, THINK_PREFILL, GenRMFormat, pair_strength, verdict_reward
from rewards.sft_examples import build_sft_examples, reasoning_of
from rewards.judges import LabelFormat, OpenAIJudge, judge_format
from tests.support.judge_server import start_judge_server
from tests.support.verdict_task import comparison_rows, make_pairs, teacher, write_jsonl
from alignment.algos import group_normalised, normalised_preference

BINARY, MULTI = GenRMFormat("binary"), GenRMFormat("multiclass")


BINARY_CASES = [  # (output after the reasoning, strength)
    ("<answer>A</answer>", 1),
    ("\n\n<answer>B</answer>", -1),
    ("<answer> B\n</answer>", -1),  # whitespace aside
    ("<answer>A</answer> Final: <answer>A</answer>", 1),  # an identical repeat is one verdict
    (" <answer>A</answer>B</think>", 1),  # runs on after its answer (a tiny trained GenRM's output)
    ("<answer>A</answer><think>again</think><answer>B</answer>", None),  # re-thought: contradictory
    ("<answer>A</answer><think>again <answer>B</answer></think>", 1),
    ("<answer>A</answer> on reflection <answer>B</answer>", None),  # contradictory
    ("<answer>A or B</answer>", None),  # hedged: not the last letter
    ("<answer>A, no: B</answer>", None),
    ("<answer>Assistant B</answer>", None),
    ("<answer>C</answer>", None),
    ("<answer>A</answer> <answer>", None),  # an answer left open
    ("A is better", None),  # no block
    ("<answer>A", None),  # unclosed
    ("", None),
]
MULTICLASS_CASES = [
    ("<answer>-3</answer>", 3),  # the reference's -3: A much better -> strength +3 for A
    ("<answer>2</answer>", -2),
    ("<answer> -1 </answer>", 1),
    ("<answer>1</answer> then <answer>-2</answer>", None),  # contradictory
    ("<answer>-2</answer> so <answer>-2</answer>", 2),
    ("<answer>0</answer>", None),  # not a valid score
    ("<answer>13</answer>", None),
    ("<answer>-2.5</answer>", None),
    ("<answer>score: 3</answer>", None),
    ("<answer>2 or 3</answer>", None),
    ("<answer>B</answer>", None),
]


@pytest.mark.parametrize("prefill", [True, False])
@pytest.mark.parametrize("verdict, tail, strength", [("binary", *c) for c in BINARY_CASES]
                         + [("multiclass", *c) for c in MULTICLASS_CASES])
def test_parser_reads_one_choice_after_the_reasoning(prefill, verdict, tail, strength):
    fmt = GenRMFormat(verdict, think_prefill=prefill)
    opening = "" if prefill else "<think>\n"  # a prefilled output starts inside <think>
    text = f"{opening}Comparing: <answer>-1</answer> <answer>A</answer> seem fine.\n</think>{tail}"
    assert fmt.strength(text) == strength
    assert fmt.parse(text) == (None if strength is None else pytest.approx(strength / fmt.max_strength))
    if not prefill and "think>" not in tail:  # a model that does not reason at all is read whole
        assert fmt.strength(tail) == strength


@pytest.mark.parametrize("text", [
    "<think>maybe <answer>A</answer></think> so",  # the probe's: the answer is inside the reasoning
    "<think>maybe <answer>A</answer></think>",
    "<think>never closed <answer>A</answer>",
    "<answer>A</answer><think>on reflection</think>",  # before the reasoning
    "<think>a</think><think>b <answer>A</answer></think>",  # inside the last reasoning block
    "<think>a</think>\n<think>reopened <answer>A</answer>",
])
def test_answers_inside_the_reasoning_are_no_verdict(text):
    assert GenRMFormat("binary", think_prefill=False).strength(text) is None
    assert GenRMFormat("binary", think_prefill=True).strength(text) is None


def test_prefilled_output_is_reasoning_until_think_closes():
    prefilled, plain = GenRMFormat("binary", think_prefill=True), GenRMFormat("binary", think_prefill=False)
    assert prefilled.strength("A looks right <answer>A</answer>") is None  # </think> never came
    assert plain.strength("A looks right <answer>A</answer>") == 1
    assert prefilled.strength("A looks right\n</think>\n\n<answer>A</answer>") == 1
    assert prefilled.strength("</think><answer>B</answer>") == -1


def test_verdict_reward_partial_credit():
    assert verdict_reward(1, 1) == 1.0 and verdict_reward(-1, 1) == 0.0 and verdict_reward(None, 1) == 0.0
    assert verdict_reward(2, 2) == 1.0  # exact
    assert verdict_reward(3, 1) == 0.5 and verdict_reward(-1, -3) == 0.5  # right side, wrong strength
    assert verdict_reward(-2, 2) == 0.0 and verdict_reward(None, -3) == 0.0


def test_pair_strength_sign_convention():
    """d > 0 means the first response (shown as A) is better."""
    a_wins = "<think>x</think><answer>A</answer>"
    assert pair_strength(BINARY, a_wins) == pytest.approx(1 / len(a_wins))  # 1 / L, L in characters
    b_wins = "x</think><answer>B</answer>"
    assert pair_strength(BINARY, b_wins) == pytest.approx(-1 / len(b_wins))
    long = "<think>" + "hmm " * 50 + "</think><answer>A</answer>"
    assert 0 < pair_strength(BINARY, long) < pair_strength(BINARY, a_wins)  # longer deliberation, weaker
    assert pair_strength(BINARY, a_wins, length_weight=False) == 1.0
    assert pair_strength(MULTI, "</think><answer>-3</answer>") == pytest.approx(1.0)  # A much better
    assert pair_strength(MULTI, "</think><answer>1</answer>") == pytest.approx(-1 / 3)  # B slightly better
    assert pair_strength(BINARY, "no verdict") == 0.0
    assert pair_strength(BINARY, "<think>maybe <answer>A</answer></think> so") == 0.0  # unparsable: 0


def test_pairwise_advantage_equals_grpo_for_reward_differences():
    torch.manual_seed(0)
    rewards = torch.randn(5, 4)  # 5 prompts, G = 4
    d = rewards.unsqueeze(-1) - rewards.unsqueeze(-2)  # d_ij = r_i - r_j
    assert torch.allclose(normalised_preference(d), group_normalised(rewards), atol=1e-4)
    # Scale-free: multiclass strengths in thirds give the same advantages as the reference's integers.
    assert torch.allclose(normalised_preference(d / 3), normalised_preference(d), atol=1e-3)
    # The best response of a consistent ranking gets the largest advantage; advantages sum to zero.
    ranks = torch.tensor([[3.0, 1.0, 0.0, 2.0]])
    adv = normalised_preference(torch.sign(ranks.unsqueeze(-1) - ranks.unsqueeze(-2)))
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

    tokenizer = load_tokenizer(ModelConfig(path=str(tiny_model)))
    fmt = GenRMFormat("binary", think_prefill=True)
    prompt_ids, target_ids, cut = fmt.sft_ids(tokenizer, Comparison("q", "a", "b", -1, "B is right."), 4096)
    assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n" + THINK_PREFILL)
    target = tokenizer.decode(target_ids)
    assert target.startswith("B is right.") and target.endswith("<answer>B</answer><|im_end|>\n") and not cut


@pytest.mark.parametrize("prefill", [True, False])
def test_sft_ids_cut_the_middle_of_a_long_reasoning(tiny_model, prefill):
    """Over max_length the prompt stays whole and the target keeps the reasoning's beginning and end,
    </think>, the answer and the end of turn; a prompt too long for even that gets no ids."""
    from alignment.config import ModelConfig
    from alignment.models import load_tokenizer
    from rewards.generative import CUT_MARKER

    tokenizer = load_tokenizer(ModelConfig(path=str(tiny_model)))
    fmt = GenRMFormat("binary", think_prefill=prefill)
    reasoning = "START of the reasoning. " + " ".join(f"step{i}" for i in range(600)) + " so A it is. END"
    row = Comparison("What is 2 + 2?", "4", "5", 1, reasoning)
    full_prompt, full_target, cut = fmt.sft_ids(tokenizer, row, 100_000)
    assert not cut and len(full_target) > 600
    prompt_ids, target_ids, cut = fmt.sft_ids(tokenizer, row, 400)
    assert cut and prompt_ids == full_prompt  # the judge prompt, criteria and answer format included
    assert len(prompt_ids) + len(target_ids) == 400
    target = tokenizer.decode(target_ids)
    opening = "" if prefill else THINK_PREFILL
    assert target.startswith(opening + "START of the reasoning. step0 step1")
    assert target.endswith("so A it is. END\n</think>\n\n<answer>A</answer><|im_end|>\n")
    head, _, tail = target.partition(CUT_MARKER)
    assert "step300" not in target and fmt.strength(target) == 1
    assert abs(len(tokenizer(head)["input_ids"]) - len(tokenizer(tail)["input_ids"])) < 25  # both ends kept alike
    # The least a row can be cut to: the whole prompt and a target with no reasoning left; below, no ids.
    fits = [k for k in range(40) if fmt.sft_ids(tokenizer, row, len(prompt_ids) + k) is not None]
    assert fits == list(range(fits[0], 40)) and fits[0] > 5
    least = fmt.sft_ids(tokenizer, row, len(prompt_ids) + fits[0])
    assert least[0] == prompt_ids
    assert tokenizer.decode(least[1]) == opening + CUT_MARKER + "\n</think>\n\n<answer>A</answer><|im_end|>\n"


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
    train, _ = load_comparisons(DataConfig(path=str(good)), "binary", 0, reasoning=False)
    assert len(train) == 4 and {c.strength for c in train} <= {1, -1}
    with pytest.raises(DataError, match=r"ok.jsonl: row 1: missing field 'reasoning'"):
        load_comparisons(DataConfig(path=str(good)), "binary", 0, reasoning=True)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response_a": "a", "response_b": "b", "label": "A"},
                                               {"prompt": "p", "response_a": "a", "response_b": "b", "label": "C"}])
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: field 'label' must be \"A\" or \"B\""):
        load_comparisons(DataConfig(path=str(bad)), "binary", 0, reasoning=False)
    with pytest.raises(DataError, match=r"bad.jsonl: row 1: .*int in -3..3"):
        load_comparisons(DataConfig(path=str(bad)), "multiclass", 0, reasoning=False)


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


UNPARSABLE = [  # each would have given a verdict to a parser that reads the last letter anywhere
    "<think>maybe <answer>A</answer></think> so",
    "A is better, so <answer>A</answer>",  # prefilled: the reasoning never closed
    "x</think><answer>A or B</answer>",
    "x</think><answer>A</answer> no, <answer>B</answer>",
]


def test_rl_reward_and_parse_fail_frac_count_unparsable_outputs():
    """The RL stage's reward and `genrm/parse_fail_frac` read verdicts as the parser does."""
    from alignment.data import Example
    from alignment.online import RolloutBatch
    from trainers.think_rm import VerdictReward

    texts = UNPARSABLE + ["x</think>\n<answer>A</answer>", "x</think><answer>B</answer>"]
    batch = RolloutBatch([Example("p", answer=1)] * len(texts), None, texts, {}, torch.zeros(len(texts), 1))
    assert VerdictReward(BINARY)(batch).tolist() == [0.0] * len(UNPARSABLE) + [1.0, 0.0]
    assert batch.stats["genrm/parse_fail_frac"] == pytest.approx(len(UNPARSABLE) / len(texts))


def test_judge_counts_unparsable_outputs_as_failures():
    """A judge (and pairwise RLHF, which reads its Judgements) gets no verdict from them: d = 0."""
    from rewards.judges import Judge

    class Canned(Judge):
        def _ask(self, prompts, responses_a, responses_b):
            return [self._read(text) for text in prompts]

    judge = Canned(JudgeConfig(type="openai", model="m", verdict="binary"))
    calls = judge.judge(UNPARSABLE + ["x</think><answer>A</answer>"], ["a"] * 5, ["b"] * 5)
    assert [c.verdict for c in calls] == [None] * 4 + [1.0] and judge.failures == 4
    assert [pair_strength(judge.fmt, c.text) for c in calls[:4]] == [0.0] * 4
