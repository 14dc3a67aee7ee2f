"""Wall-clock deadlines of the HTTP clients (rewards/remote.py `BoundedClient`): a server that trickles
its reply one byte at a time (tests/support/judge_server.py, mode "trickle") cannot hold a judge call or a
remote reward call past `timeout_s` per attempt, although each of its reads is quick."""

from __future__ import annotations

import time

import pytest

from alignment.config import JudgeConfig
from rewards.judges import VERDICT_A, OpenAIJudge
from rewards.remote import RemoteRewardClient, RemoteRewardError
from tests.support.judge_server import start_judge_server

MARGIN_S = 0.5  # thread start-up and cancellation; a trickled reply takes minutes


def openai_judge(base_url: str, timeout_s: float, retries: int) -> OpenAIJudge:
    return OpenAIJudge(JudgeConfig(base_url=base_url, model="rule-judge", timeout_s=timeout_s, retries=retries,
                                   max_concurrency=4, max_tokens=64), backoff_s=0.01)


def timed(fn, *args):
    start = time.monotonic()
    out = fn(*args)
    return out, time.monotonic() - start


@pytest.mark.parametrize("retries", [0, 1])
def test_trickling_judge_gives_no_verdict_by_the_deadline(retries):
    base_url, server = start_judge_server("trickle", trickle_s=0.2)  # a ~330-byte reply: over a minute
    with server:
        judge = openai_judge(base_url, timeout_s=1.0, retries=retries)
        pairs = (["q"] * 4, ["7", "1", "5", "8"], ["3", "9", "2", "1"])  # four calls in flight at once
        calls, elapsed = timed(judge.judge, *pairs)
        assert elapsed < (retries + 1) * 1.0 + MARGIN_S, elapsed
        assert [c.verdict for c in calls] == [None] * 4 and (judge.calls, judge.failures) == (4, 4)
        assert all(c.reason == f"no reply after {retries + 1} attempts: TimeoutException: no complete reply "
                   "within 1 s" for c in calls), calls[0].reason
        assert server.requests == 4 * (retries + 1) and server.trickled == 0
        _, closing = timed(judge.close)
        assert closing < MARGIN_S  # nothing left waiting on the trickler


def test_a_slow_reply_that_ends_in_time_is_accepted():
    """The same trickle, fast enough to end within timeout_s: the deadline cuts calls, not slow replies."""
    base_url, server = start_judge_server("trickle", trickle_s=0.001)
    with server:
        judge = openai_judge(base_url, timeout_s=10.0, retries=0)
        verdicts, elapsed = timed(judge.compare, ["q"], ["7"], ["3"])
        assert verdicts == [VERDICT_A] and server.trickled == 1 and elapsed > 0.3  # one byte at a time
        judge.close()


def test_trickling_reward_server_fails_the_remote_call_by_the_deadline():
    base_url, server = start_judge_server("trickle", trickle_s=0.2)
    with server:
        client = RemoteRewardClient(base_url.removesuffix("/v1"), timeout_s=1.0, retries=1, backoff_s=0.01)
        start = time.monotonic()
        with pytest.raises(RemoteRewardError, match=r"/v1/score: no valid reply after 2 attempts; last error: "
                                                    r"TimeoutException: no complete reply within 1 s"):
            client.score(["q"], ["5 apples"])
        assert time.monotonic() - start < 2 * 1.0 + MARGIN_S
        assert server.requests == 2 and server.trickled == 0
        client.close()


def test_remote_client_reads_a_reply_that_ends_in_time():
    base_url, server = start_judge_server("trickle", trickle_s=0.001)
    with server:
        client = RemoteRewardClient(base_url.removesuffix("/v1"), timeout_s=10.0, retries=0)
        assert client.score(["q", "q"], ["5 apples", "none"]) == [5.0, 0.0]
        assert server.trickled == 1
        client.close()
        client.close()  # closing twice is harmless
