"""LLM judges of pairs (rewards/judges.py): the prompt and parsers, the OpenAI-compatible client
against a real loopback server (verdicts, position swap, failures, retries, concurrency), and the
local / generative-RM judges on the hf engine with a tiny random Llama."""

from __future__ import annotations

import logging
import socket

import pytest

from alignment.config import ConfigError, JudgeConfig
from rewards.generative import GenRMFormat
from rewards.judges import (TIE, VERDICT_A, VERDICT_B, GenerativeRMJudge, LabelFormat, LocalJudge, OpenAIJudge,
                            build_judge, parse_verdict)
from tests.support.judge_server import rule_verdict, start_judge_server

# (prompt, A, B) and the rule server's verdict: the response with the larger first integer wins
PAIRS = [
    ("Pick a big number.", "7", "3", VERDICT_A),
    ("Pick a big number.", "I say 2", "9 is mine", VERDICT_B),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A number?"}], "5", "5", TIE),
    ("Any number?", "none at all", "1", VERDICT_B),
]


def ask(judge, pairs=PAIRS):
    prompts, a, b, _ = zip(*pairs)
    return judge.compare(list(prompts), list(a), list(b))


def openai_judge(base_url: str, **overrides) -> OpenAIJudge:
    cfg = JudgeConfig(type="openai", base_url=base_url, model="rule-judge", timeout_s=5.0, retries=1,
                      max_concurrency=4, max_tokens=64)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return OpenAIJudge(cfg, backoff_s=0.01)


# ---- prompt and parsers ------------------------------------------------------------------------

@pytest.mark.parametrize("text, verdict", [
    ("<label>1</label>", VERDICT_A),
    ("<label>2</label>", VERDICT_B),
    ("<label>0</label>", TIE),
    ("<label> 1 </label>", VERDICT_A),  # whitespace aside
    ("<think>maybe <label>2</label></think>\nA is right. <label>1</label>", VERDICT_A),
    ("thinking opened by the template <label>2</label></think> <label>1</label>", VERDICT_A),
    ("<think>a</think> <label>1</label> so: <label>1</label>", VERDICT_A),  # an identical repeat is one verdict
    # after the reasoning only: a label inside it, or before it, is no verdict
    ("<think>only thinking <label>1</label></think>", None),
    ("<think>only thinking <label>1</label></think> so", None),
    ("<think>never closed <label>1</label>", None),
    ("thinking opened by the template <label>2</label></think> no label after", None),
    ("<label>1</label><think>no, <label>2</label></think>", None),
    ("<think>x</think><label>1</label><think>reopened <label>2</label>", VERDICT_A),
    ("<think>x</think><label>1</label><think>again</think><label>2</label>", None),  # contradictory
    ("<think>x</think><label>2</label> 1</think>", VERDICT_B),  # ran on after its label
    # hedged or contradictory
    ("first <label>2</label> then, on reflection, <label> 1 </label>", None),
    ("<think>x</think><label>1 or 2</label>", None),
    ("<label>1, 2</label>", None),
    ("<label>Assistant 1</label>", None),
    ("<label>1</label> <label>", None),  # a label left open
    ("<label>2</label> ... <label>3</label>", None),
    ("<label>A</label>", None),
    ("Assistant A is better.", None),
    ("", None),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_judge_messages_layout():
    system, user = LabelFormat().messages("What is 2+2?", "4", "5")
    assert system["role"] == "system" and user["role"] == "user"
    for criterion in ("Helpfulness", "Correctness", "Coherence", "Complexity", "Verbosity", "Safety"):
        assert criterion in system["content"]
    for label in ("<label>1</label>", "<label>2</label>", "<label>0</label>"):
        assert label in system["content"]
    assert user["content"] == (
        "[The Start of Context]\nWhat is 2+2?\n[The End of Context]\n\n"
        "[The Start of Assistant A's Response]\n4\n[The End of Assistant A's Response]\n\n"
        "[The Start of Assistant B's Response]\n5\n[The End of Assistant B's Response]")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert LabelFormat().messages(chat, "4", "5")[1]["content"].startswith(
        "[The Start of Context]\nsystem: Be brief.\nuser: 2+2?\n[The End of Context]\n\n")
    grm_system = GenRMFormat().messages("q", "a", "b")[0]["content"]  # Think-RM's binary format (tests/test_genrm.py)
    assert "<answer>A</answer>" in grm_system and "<answer>B</answer>" in grm_system
    assert "<label>" not in grm_system and "Safety" in grm_system


def test_rule_server_rule():
    assert [rule_verdict(a, b) for _, a, b, _ in PAIRS] == [1, 2, 0, 2]
    assert rule_verdict("none", "none") == 0 and rule_verdict("-3", "-7") == 1


# ---- OpenAI-compatible client against a real server --------------------------------------------

def test_openai_judge_verdicts(monkeypatch):
    monkeypatch.setenv("JUDGE_API_KEY", "secret")
    base_url, server = start_judge_server("ok")
    with server:
        judge = openai_judge(base_url)
        assert ask(judge) == [v for *_, v in PAIRS]
        assert (judge.calls, judge.failures, server.requests) == (4, 0, 4)
        assert server.authorization == "Bearer secret"
        body = server.bodies[0]
        assert body["model"] == "rule-judge" and body["max_tokens"] == 64
        assert (body["temperature"], body["top_p"]) == (0.6, 0.9)
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert judge.compare([], [], []) == []
        with pytest.raises(ValueError, match="one pair per prompt"):
            judge.compare(["p"], ["a"], [])
        judge.close()


def test_openai_judge_no_key_no_header(monkeypatch):
    monkeypatch.delenv("JUDGE_API_KEY", raising=False)
    base_url, server = start_judge_server("ok")
    with server:
        judge = openai_judge(base_url)
        assert ask(judge, PAIRS[:1]) == [VERDICT_A]
        assert server.authorization is None


def test_position_swap_consistent_judge():
    base_url, server = start_judge_server("ok")
    with server:
        judge = openai_judge(base_url, position_swap=True)
        assert ask(judge) == [v for *_, v in PAIRS]
        assert (judge.calls, judge.failures, server.requests) == (8, 0, 8)
        users = sorted(b["messages"][1]["content"] for b in server.bodies if "Pick" in b["messages"][1]["content"])
        assert len(users) == 4  # both orders of both "Pick" pairs were asked


def test_position_swap_cancels_position_bias():
    base_url, server = start_judge_server("always_a")
    with server:
        assert ask(openai_judge(base_url)) == [VERDICT_A] * 4
        assert ask(openai_judge(base_url, position_swap=True)) == [TIE] * 4


def test_noisy_judge_is_seeded():
    base_url, server = start_judge_server("ok", accuracy=0.0, seed=3)
    with server:
        wrong = ask(openai_judge(base_url))
        assert all(w != v for w, (*_, v) in zip(wrong, PAIRS))  # accuracy 0: always a wrong verdict
        assert ask(openai_judge(base_url)) == wrong  # the same request, the same answer


@pytest.mark.parametrize("mode, tries_per_call", [
    ("slow", 2), ("error500", 2), ("error400", 1), ("garbage", 1), ("badjson", 1), ("empty", 1),
])
def test_failed_calls_give_none(mode, tries_per_call, caplog):
    base_url, server = start_judge_server(mode, slow_s=5.0)
    with server:
        judge = openai_judge(base_url, timeout_s=0.3, retries=1, position_swap=mode == "garbage")
        calls = 8 if judge.cfg.position_swap else 4
        with caplog.at_level(logging.WARNING, logger="alignment"):
            assert ask(judge) == [None] * 4
        assert (judge.calls, judge.failures) == (calls, calls)
        assert server.requests == calls * tries_per_call  # 5xx and timeouts retried, the rest not
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and f"{calls} of {calls} calls gave no verdict" in warnings[0].getMessage()


def test_unreachable_server_gives_none():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = openai_judge(f"http://127.0.0.1:{port}/v1", retries=1)
    assert ask(judge) == [None] * 4
    assert (judge.calls, judge.failures) == (4, 4)


def test_flaky_server_retried():
    base_url, server = start_judge_server("flaky")
    with server:
        judge = openai_judge(base_url, retries=1)
        assert ask(judge) == [v for *_, v in PAIRS]
        assert (judge.failures, server.requests) == (0, 8)  # each request: a 503, then the answer
        no_retry = openai_judge(base_url, retries=0)
        assert ask(no_retry, [("fresh", "1", "2", VERDICT_B)]) == [None]


def test_max_concurrency_respected():
    base_url, server = start_judge_server("ok", delay_s=0.15)
    with server:
        judge = openai_judge(base_url, max_concurrency=2)
        pairs = [(f"p{i}", str(i), str(i + 1), VERDICT_B) for i in range(8)]
        assert ask(judge, pairs) == [VERDICT_B] * 8
        assert server.max_in_flight == 2


def test_build_judge_checks_model():
    with pytest.raises(ConfigError, match="judge.model"):
        build_judge(JudgeConfig(type="openai"))
    with pytest.raises(ConfigError, match="judge.model"):
        build_judge(JudgeConfig(type="local"))


# ---- judges on our rollout engine --------------------------------------------------------------

VALID = {VERDICT_A, VERDICT_B, TIE, None}


def test_local_judge_on_hf_engine(tiny_model):
    judge = build_judge(JudgeConfig(type="local", model=str(tiny_model), backend="hf", max_tokens=8))
    assert type(judge) is LocalJudge
    verdicts = ask(judge, PAIRS[:2])
    assert len(verdicts) == 2 and set(verdicts) <= VALID
    assert judge.calls == 2 and judge.failures == verdicts.count(None)
    assert ask(judge, PAIRS[:2]) == verdicts  # fixed seed


def test_generative_rm_judge_on_hf_engine(tiny_model):
    judge = build_judge(JudgeConfig(type="generative_rm", model=str(tiny_model), backend="hf", max_tokens=8,
                                    position_swap=True))
    assert type(judge) is GenerativeRMJudge
    verdicts = ask(judge, PAIRS[:2])
    assert len(verdicts) == 2 and set(verdicts) <= VALID | {0.5, -0.5}
    assert judge.calls == 4 and judge.failures <= 4
