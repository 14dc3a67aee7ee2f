"""A small OpenAI-compatible chat-completions server for judge tests, on a real loopback socket.

    base_url, server = start_judge_server(mode="ok", accuracy=1.0, seed=0)   # base_url ends in /v1
    ...
    server.stop()            # or: with server: ...

`POST /v1/chat/completions` reads the user message laid out by `rewards.judges.judge_messages` and
decides by a known rule: the response whose first integer is larger is better (a response with no
integer loses; equal -> tie). It answers "<think>...</think> <label>N</label>" in
choices[0].message.content (and a decoy opposite label in message.reasoning_content, which a client
must not parse). With accuracy < 1 the verdict is wrong with that probability, decided per request
from (seed, request text), so the same request always gets the same answer.

A request whose system message asks for Think-RM's binary format (`<answer>A</answer>`) is answered in
it: "<think>...</think>\n<answer>A</answer>"; there a tie becomes a coin flip (seeded per request) and a
wrong answer the other letter. `rule(response_a, response_b) -> 1 | 2 | 0` replaces the integer rule
(e.g. a gold reward for pairwise RLHF).

Modes: ok; always_a (label 1 whatever the pair); slow (waits `slow_s` before answering); error500;
error400; garbage (200, text without a label); badjson (200, a body that is not JSON); empty (200,
content null); flaky (the first call of each distinct request gets 503, later ones are ok); trickle
(the right answer, but the whole HTTP reply, status line and headers included, sent one byte every
`trickle_s`: each read is quick, the reply takes minutes).
`GET /v1/models` lists one model. The server counts requests and the most requests in flight at once.

`POST /v1/score {"prompts", "responses"}` answers as an `align serve-rm` reward server would (for the
remote reward client): {"rewards": [the first integer of each response, 0 without one]}, in the same
modes (slow, trickle, error500, ...).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import random
import re
import threading

MODES = ("ok", "always_a", "slow", "error500", "error400", "garbage", "badjson", "empty", "flaky", "trickle")
MODEL = "rule-judge"

_SECTION = r"\[The Start of {0}\]\n(.*?)\n\[The End of {0}\]"
_CONTEXT = re.compile(_SECTION.format("Context"), re.DOTALL)
_RESPONSE_A = re.compile(_SECTION.format(re.escape("Assistant A's Response")), re.DOTALL)
_RESPONSE_B = re.compile(_SECTION.format(re.escape("Assistant B's Response")), re.DOTALL)
_INTEGER = re.compile(r"-?\d+")


def rule_verdict(response_a: str, response_b: str) -> int:
    """The label the rule gives: 1 (A's first integer is larger), 2 (B's), 0 (equal, or neither has one)."""
    a, b = (_INTEGER.search(r) for r in (response_a, response_b))
    if a is None and b is None:
        return 0
    if a is None or b is None:
        return 2 if a is None else 1
    x, y = int(a.group()), int(b.group())
    return 0 if x == y else (1 if x > y else 2)


class JudgeServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a slow handler must not hold up stop()

    def __init__(self, mode: str, accuracy: float, seed: int, delay_s: float, slow_s: float, rule=rule_verdict,
                 port: int = 0, trickle_s: float = 0.5):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (valid: {', '.join(MODES)})")
        super().__init__(("127.0.0.1", port), _Handler)
        self.mode, self.accuracy, self.seed, self.delay_s, self.slow_s = mode, accuracy, seed, delay_s, slow_s
        self.trickle_s = trickle_s
        self.rule = rule
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.requests = 0  # chat-completion and score requests received
        self.trickled = 0  # trickle: replies sent to their last byte
        self.in_flight = 0
        self.max_in_flight = 0
        self.authorization: str | None = None  # the last Authorization header seen
        self.bodies: list[dict] = []  # parsed request bodies, in arrival order
        self._seen: set[str] = set()  # flaky: requests already answered with 503
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def stop(self) -> None:
        self.stopping.set()  # releases slow handlers
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def first_time(self, raw: bytes) -> bool:
        key = hashlib.sha256(raw).hexdigest()
        with self.lock:
            new = key not in self._seen
            self._seen.add(key)
            return new

    def label_for(self, user_text: str, binary: bool = False) -> int:
        sections = [p.search(user_text) for p in (_CONTEXT, _RESPONSE_A, _RESPONSE_B)]
        if any(s is None for s in sections):
            return -1  # not the judge layout
        context, a, b = (s.group(1) for s in sections)
        label = self.rule(a, b)
        rng = random.Random(f"{self.seed}|{context}|{a}|{b}")
        if binary and label == 0:
            label = rng.choice([1, 2])
        if self.accuracy < 1.0 and rng.random() >= self.accuracy:  # a wrong answer
            label = 3 - label if binary else rng.choice([x for x in (0, 1, 2) if x != label])
        return label


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
    server: JudgeServer

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        if self.server.mode == "trickle":
            self._trickle(status, body, content_type)
            return
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _trickle(self, status: int, body: bytes, content_type: str) -> None:
        reply = (f"HTTP/1.1 {status} {self.responses[status][0]}\r\nContent-Type: {content_type}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        for i in range(len(reply)):
            if self.server.stopping.wait(self.server.trickle_s):
                return
            self.wfile.write(reply[i:i + 1])
        self.server.trickled += 1

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode())

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "tests"}]})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/v1/score"):
            self._json(404, {"error": {"message": f"no route {self.path}"}})
            return
        server = self.server
        with server.lock:
            server.requests += 1
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
            server.authorization = self.headers.get("Authorization")
        try:
            self._answer(raw)
        except OSError:  # the client gave up (a timeout) and closed the connection
            pass
        finally:
            with server.lock:
                server.in_flight -= 1

    def _answer(self, raw: bytes) -> None:
        server, mode = self.server, self.server.mode
        if server.delay_s:
            server.stopping.wait(server.delay_s)
        score = self.path.rstrip("/") == "/v1/score"
        try:
            body = json.loads(raw)
            user = "" if score else next(m["content"] for m in body["messages"] if m["role"] == "user")
        except (ValueError, KeyError, TypeError, StopIteration):
            self._json(400, {"error": {"message": "expected {'model', 'messages': [..., {'role': 'user'}]}"}})
            return
        with server.lock:
            server.bodies.append(body)
        if mode == "slow":
            server.stopping.wait(server.slow_s)
        elif mode == "error500":
            self._json(500, {"error": {"message": "internal error"}})
            return
        elif mode == "error400":
            self._json(400, {"error": {"message": "bad request"}})
            return
        elif mode == "badjson":
            self._send(200, b"<html>not json", "text/html")
            return
        elif mode == "flaky" and server.first_time(raw):
            self._json(503, {"error": {"message": "overloaded, try again"}})
            return
        if score:
            self._json(200, {"rewards": [int(m.group()) if (m := _INTEGER.search(str(r))) else 0
                                         for r in body.get("responses", [])]})
            return
        system = next((m["content"] for m in body["messages"] if m["role"] == "system"), "")
        binary = "<answer>A</answer>" in system
        label = 1 if mode == "always_a" else server.label_for(user, binary)
        if mode == "garbage":
            content, thinking = "I would rather not say which one is better.", None
        elif mode == "empty":
            content, thinking = None, "thinking only"
        elif label < 0:
            content, thinking = "I cannot find the two responses.", None
        elif binary:
            content, thinking = f"<think>\nThe rule prefers {'AB'[label - 1]}.\n</think>\n<answer>{'AB'[label - 1]}</answer>", None
        else:
            decoy = 3 - label if label else 1  # a wrong label where a client must not look
            thinking = f"Comparing the first numbers of the two responses. <label>{decoy}</label>"
            content = f"<think>The rule gives {label}, not <label>{decoy}</label>.</think> <label>{label}</label>"
        message = {"role": "assistant", "content": content}
        if thinking is not None:
            message["reasoning_content"] = thinking
        self._json(200, {"id": "chatcmpl-test", "object": "chat.completion", "model": body.get("model", MODEL),
                         "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})


def start_judge_server(mode: str = "ok", accuracy: float = 1.0, seed: int = 0, delay_s: float = 0.0,
                       slow_s: float = 5.0, rule=rule_verdict, port: int = 0,
                       trickle_s: float = 0.5) -> tuple[str, JudgeServer]:
    """Start a judge server on a loopback port (0: a free one), served by a background thread of this
    process. `delay_s`: wait before every answer (to overlap requests); `slow_s`: the wait in mode "slow";
    `trickle_s`: the wait before each byte in mode "trickle"."""
    server = JudgeServer(mode, accuracy, seed, delay_s, slow_s, rule, port, trickle_s)
    return server.base_url, server
