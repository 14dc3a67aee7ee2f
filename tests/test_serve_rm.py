"""`align serve-rm` run for real (a subprocess on a loopback port serving a tiny reward model), its
micro-batcher, and the client behind `reward: {type: remote}`."""

from __future__ import annotations

import asyncio
import http.server
import json
import math
import random
import signal
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from alignment.config import BaseConfig, ConfigError, load_config
from alignment.data import Example
from rewards import build_reward
from rewards.remote import RemoteReward, RemoteRewardClient, RemoteRewardError
from rewards.micro_batcher import MicroBatcher, ScoringError
from rewards.server import create_app, sigmoid
from tests.support.serve_rm import KEY, FlakyScorer, Server, free_port, post, running

MAX_ITEMS = 64
MAX_REQUEST_MB = 0.0625  # 64 KiB


@pytest.fixture(scope="module")
def servers(rm_dir, tmp_path_factory) -> dict[str, Server]:
    """Both servers start together (start-up is mostly imports): `main`, the one most tests use, takes
    its key from the environment variable; `graceful`, for the SIGTERM test, from --api-key."""
    logs = tmp_path_factory.mktemp("serve-rm")
    with running({
        "main": Server(rm_dir, logs / "main.log", "--batch-size", "16", "--max-items", str(MAX_ITEMS),
                       "--max-request-mb", str(MAX_REQUEST_MB), env={"ALIGN_RM_API_KEY": KEY}),
        "graceful": Server(rm_dir, logs / "graceful.log", "--api-key", KEY),
    }) as started:
        yield started


@pytest.fixture(scope="module")
def url(servers) -> str:
    return servers["main"].url


CHAT_PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
PROMPTS = ["What is 2 + 2?", "What is 2 + 2?", CHAT_PROMPT, "Say hello."]
RESPONSES = ["4", "5", [{"role": "assistant", "content": "Blue."}], "Hello there!"]


def test_score_and_health_match_in_process_scoring(url, scorer, rm_dir):
    assert httpx.get(url + "/health").json() == {"status": "ok", "model": rm_dir.name}  # no key needed
    reply = post(url, "/v1/score", {"prompts": PROMPTS, "responses": RESPONSES})
    assert reply.status_code == 200, reply.text
    expected = scorer.score(PROMPTS, RESPONSES)
    assert reply.json()["model"] == rm_dir.name
    assert reply.json()["rewards"] == pytest.approx(expected, abs=1e-5)
    assert max(expected) - min(expected) > 0.1  # rewards differ, so a mix-up would show
    assert post(url, "/v1/score", {"prompts": [], "responses": []}).json() == {"rewards": [], "model": rm_dir.name}


def test_get_reward_is_openrlhf_compatible(url, scorer):
    queries = [scorer.tokenizer.apply_chat_template([{"role": "user", "content": f"Count to {i}."},
                                                     {"role": "assistant", "content": " ".join(map(str, range(i)))}],
                                                    tokenize=False) for i in range(1, 6)]
    reply = post(url, "/get_reward", {"query": queries, "prompts": ["p"] * 5, "labels": [None, "a", 1, 2, 3]})
    assert reply.status_code == 200, reply.text
    expected = scorer.score_texts(queries)
    assert reply.json()["rewards"] == pytest.approx(expected, abs=1e-5)
    assert reply.json()["scores"] == pytest.approx([1 / (1 + math.exp(-r)) for r in expected], abs=1e-6)
    assert reply.json()["extra_logs"] == {}
    assert post(url, "/get_reward", {"query": []}).json() == {"rewards": [], "scores": [], "extra_logs": {}}


def test_compare_follows_reward_differences(url, scorer):
    prompts, a, b = PROMPTS[:3], RESPONSES[:3], ["5", "4", "Red."]
    reply = post(url, "/v1/compare", {"prompts": prompts, "responses_a": a, "responses_b": b}).json()
    diffs = [ra - rb for ra, rb in zip(scorer.score(prompts, a), scorer.score(prompts, b))]
    assert reply["prob_a"] == pytest.approx([1 / (1 + math.exp(-d)) for d in diffs], abs=1e-5)
    assert reply["uncertainty"] == pytest.approx([1 - abs(2 * p - 1) for p in reply["prob_a"]], abs=1e-9)
    assert reply["judged"] == [False] * 3
    same = post(url, "/v1/compare", {"prompts": prompts, "responses_a": a, "responses_b": a}).json()
    assert same["prob_a"] == pytest.approx([0.5] * 3) and same["uncertainty"] == pytest.approx([1.0] * 3)


@pytest.mark.parametrize("path", ["/v1/score", "/get_reward", "/v1/compare"])
@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_missing_or_wrong_key_is_401(url, path, key):
    reply = post(url, path, {"prompts": ["a"], "responses": ["b"]}, key=key)
    assert reply.status_code == 401
    assert "Authorization: Bearer" in reply.json()["error"]


@pytest.mark.parametrize("path, body, message", [
    ("/v1/score", {"prompts": ["a"]}, "responses: Field required"),
    ("/v1/score", {"prompts": [1], "responses": ["b"]}, "prompts[0]"),
    ("/v1/score", {"prompts": "a", "responses": "b"}, "prompts: Input should be a valid list"),
    ("/v1/score", {"prompts": ["a", "b"], "responses": ["c"]}, "2 prompts but 1 responses"),
    ("/v1/score", {"prompts": [[{"content": "hi"}]], "responses": ["b"]}, "prompts[0].list[ChatMessage][0].role"),
    ("/v1/score", ["a", "b"], "body: Input should be a valid dictionary"),
    ("/v1/compare", {"prompts": ["a"], "responses_a": ["b"], "responses_b": []}, "0 responses_b"),
    ("/get_reward", {"queries": ["a"]}, "query: Field required"),
])
def test_malformed_body_is_422_naming_the_field(url, path, body, message):
    reply = post(url, path, body)
    assert reply.status_code == 422
    assert message in reply.json()["error"]


def test_invalid_json_is_422(url):
    reply = httpx.post(url + "/v1/score", content=b'{"prompts": [', timeout=10,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert reply.status_code == 422 and "not valid JSON" in reply.json()["error"]


def test_oversized_requests_are_413(url):
    big = {"prompts": ["x" * 70_000], "responses": ["y"]}
    declared = post(url, "/v1/score", big)
    assert declared.status_code == 413 and "65536 bytes" in declared.json()["error"]
    body = json.dumps(big).encode()
    chunked = httpx.post(url + "/v1/score", content=(body[i:i + 8192] for i in range(0, len(body), 8192)),
                         headers={"Authorization": f"Bearer {KEY}"}, timeout=10)  # no Content-Length
    assert chunked.status_code == 413
    many = post(url, "/v1/score", {"prompts": ["a"] * (MAX_ITEMS + 1), "responses": ["b"] * (MAX_ITEMS + 1)})
    assert many.status_code == 413 and f"limit of {MAX_ITEMS}" in many.json()["error"]
    assert post(url, "/v1/score", {"prompts": ["a"], "responses": ["b"]}).status_code == 200


def test_concurrent_requests_get_their_own_results_in_order(url, scorer):
    rng = random.Random(0)
    requests = []
    for i in range(300):
        count = rng.randint(1, 4)
        requests.append(([f"Request {i}, item {j}: what is {i} + {j}?" for j in range(count)],
                         [f"It is {i + j}." for j in range(count)]))
    flat_prompts = [p for prompts, _ in requests for p in prompts]
    flat_responses = [r for _, responses in requests for r in responses]
    expected, offset = [], 0
    flat_expected = scorer.score(flat_prompts, flat_responses)
    for prompts, _ in requests:
        expected.append(flat_expected[offset:offset + len(prompts)])
        offset += len(prompts)

    async def send_all():
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                                     limits=httpx.Limits(max_connections=64)) as client:
            replies = await asyncio.gather(*(client.post(url + "/v1/score", json={"prompts": p, "responses": r})
                                             for p, r in requests))
        return replies

    replies = asyncio.run(send_all())
    assert [r.status_code for r in replies] == [200] * len(requests)
    for reply, want in zip(replies, expected):
        assert reply.json()["rewards"] == pytest.approx(want, abs=1e-5)


def test_sigterm_finishes_the_request_in_flight_then_exits_0(servers, scorer):
    proc, port, log = servers["graceful"].proc, servers["graceful"].port, servers["graceful"].log
    body = json.dumps({"prompts": ["Say hi."], "responses": ["Hi!"]}).encode()
    head = (f"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(head + body[:10])  # a request in flight: its body is still arriving
        time.sleep(0.5)  # time for the server to read the headers
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None, "the server quit with a request in flight"
        with pytest.raises(ConnectionRefusedError):  # no new connections once stopping
            socket.create_connection(("127.0.0.1", port), timeout=5)
        conn.sendall(body[10:])
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    status, _, payload = reply.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200"), reply
    assert json.loads(payload)["rewards"] == pytest.approx(scorer.score(["Say hi."], ["Hi!"]), abs=1e-5)
    assert proc.wait(timeout=15) == 0, log.read_text()
    assert "batcher drained and stopped" in log.read_text()


def test_batcher_pools_requests_splits_large_ones_and_drains_on_stop():
    batches = []

    def score(items):
        batches.append(len(items))
        return [10.0 * x for x in items]

    async def run():
        from concurrent.futures import ThreadPoolExecutor

        batcher = MicroBatcher(score, ThreadPoolExecutor(max_workers=1), batch_size=4, max_wait_ms=50)
        batcher.start()
        jobs = [[1], [2, 3], [4, 5, 6], list(range(7, 16))]
        pooled = await asyncio.gather(*(batcher.score(job) for job in jobs))
        assert pooled == [[10.0 * x for x in job] for job in jobs]
        queued = [asyncio.ensure_future(batcher.score([x])) for x in range(3)]
        await asyncio.sleep(0)  # submitted, not yet scored
        await batcher.stop()
        assert [q.result() for q in queued] == [[0.0], [10.0], [20.0]]
        with pytest.raises(ScoringError, match="shutting down"):
            await batcher.score([1])

    asyncio.run(run())
    assert batches[:4] == [4, 4, 4, 3]  # 15 items from 4 requests in full batches


def test_a_scoring_failure_is_a_500_for_its_request_only(caplog):
    with TestClient(create_app(FlakyScorer(), batch_size=8, max_wait_ms=1)) as client:
        failed = client.post("/v1/score", json={"prompts": ["a", "b"], "responses": ["ok", "boom"]})
        assert failed.status_code == 500
        assert failed.json() == {"error": "scoring failed: the reward model raised an error on this request's "
                                          "items (details in the server log)"}  # no internal exception text
        assert "scoring a request's 2 items failed" in caplog.text
        assert "RuntimeError: the model ran out of memory" in caplog.text
        fine = client.post("/v1/score", json={"prompts": ["a", "bb"], "responses": ["ok", "yes"]})
        assert fine.json()["rewards"] == [3.0, 5.0]
        assert client.post("/get_reward", json={"query": ["abc"]}).json()["rewards"] == [3.0]
        assert client.get("/nowhere").status_code == 404


def test_server_refuses_bad_limits():
    with pytest.raises(ConfigError, match="must be positive"):
        create_app(FlakyScorer(), max_items=0)


def test_sigmoid_is_stable_at_extremes():
    assert sigmoid(-1000.0) == 0.0 and sigmoid(1000.0) == 1.0 and sigmoid(0.0) == 0.5


# --- the client ---------------------------------------------------------------------------------


def test_client_retries_a_dead_server_then_raises():
    dead = f"http://127.0.0.1:{free_port()}"
    client = RemoteRewardClient(dead, timeout_s=1, retries=2, backoff_s=0.05)
    start = time.monotonic()
    with pytest.raises(RemoteRewardError) as err:
        client.score(["a"], ["b"])
    elapsed = time.monotonic() - start
    assert dead + "/v1/score" in str(err.value) and "3 attempts" in str(err.value) and "ConnectError" in str(err.value)
    assert 0.15 <= elapsed < 5  # two backoffs: 0.05 s, then 0.1 s


def test_client_does_not_retry_client_errors(url):
    for client, expected in [(RemoteRewardClient(url, api_key="wrong", backoff_s=10), "HTTP 401"),
                             (RemoteRewardClient(url, api_key=KEY, backoff_s=10), "HTTP 413")]:
        start = time.monotonic()
        with pytest.raises(RemoteRewardError, match=expected):
            client.score(["a"] * (MAX_ITEMS + 1), ["b"] * (MAX_ITEMS + 1))
        assert time.monotonic() - start < 5  # a retry would have slept 10 s
    assert RemoteRewardClient(url).health()["status"] == "ok"


class StubServer:
    """A reward server that answers with the next (status, body) of a script and counts requests."""

    def __init__(self, script: list[tuple[int, str]]):
        stub = self
        self.script, self.requests = list(script), 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                stub.requests += 1
                status, body = stub.script.pop(0)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_client_retries_server_errors_and_rejects_bad_replies():
    with StubServer([(503, '{"error": "busy"}'), (500, "oops"), (200, '{"rewards": [0.5, -1]}')]) as stub:
        assert RemoteRewardClient(stub.url, backoff_s=0.01).score(["a", "b"], ["c", "d"]) == [0.5, -1.0]
        assert stub.requests == 3
    with StubServer([(429, '{"error": "slow down"}')] * 2) as stub:
        with pytest.raises(RemoteRewardError, match="2 attempts; last error: HTTP 429: slow down"):
            RemoteRewardClient(stub.url, retries=1, backoff_s=0.01).score(["a"], ["b"])
    for reply, message in [('{"rewards": [1.0]}', "expected 2 rewards, got 1 rewards"),
                           ('{"rewards": [1.0, NaN]}', "reward 1 is nan"),
                           ('{"rewards": [1.0, "2"]}', "reward 1 is '2'"),
                           ('{"error": "?"}', "expected 2 rewards")]:
        with StubServer([(200, reply)]) as stub:
            with pytest.raises(RemoteRewardError, match=message):
                RemoteRewardClient(stub.url, backoff_s=0.01).score(["a", "b"], ["c", "d"])
            assert stub.requests == 1  # a wrong reply is not retried into a different one


def test_remote_reward_from_config_matches_in_process(url, scorer, monkeypatch):
    monkeypatch.setenv("ALIGN_RM_API_KEY", KEY)
    cfg = load_config(BaseConfig, {"reward": {"type": "remote", "url": url + "/", "batch_size": 3}})
    reward = build_reward(cfg.reward)
    assert isinstance(reward, RemoteReward)
    prompts = [CHAT_PROMPT if i % 3 == 0 else f"Question {i}?" for i in range(7)]
    responses = [f"Answer {i}." for i in range(7)]
    got = reward([Example(prompt=p) for p in prompts], responses)
    assert got == pytest.approx(scorer.score(prompts, responses), abs=1e-5)


def test_remote_reward_needs_a_url():
    with pytest.raises(ConfigError, match=r"reward\.url: required with reward\.type=remote"):
        load_config(BaseConfig, {"reward": {"type": "remote"}})
