"""The reward scoring HTTP server behind `align serve-rm` (contract: DESIGN.md, "Reward scoring HTTP API").

    GET  /health       -> {"status": "ok", "model": str}
    POST /get_reward   OpenRLHF's remote reward API: {"query": [full text]} -> {"rewards", "scores", "extra_logs"}
    POST /v1/score     {"prompts", "responses"} -> {"rewards", "model"}
    POST /v1/compare   {"prompts", "responses_a", "responses_b"} -> {"prob_a", "uncertainty", "judged"}

Concurrent requests are pooled: a micro-batcher gathers their items into model batches of up to
`batch_size` (waiting at most `max_wait_ms` for a batch to fill) and runs the batches one at a time
in a single worker thread, since the model must not be called from two threads at once. Each
request gets its own results back in its own order. Each batch deals its places round-robin over the
waiting requests, so a huge request shares the model with small ones rather than starving them; a
request whose client has gone is cancelled and its remaining items are not scored; and when a
batch fails, its requests are scored again one at a time, so only the request that fails gets a
500 (its detail goes to the log, never to the client).

Bad input is answered before it costs anything, and never with a 500: the bearer token and the body
size are checked before the body is read (401, 413); the body must arrive within `body_timeout_s`
(408); then, in a thread so that other clients are not held up, its encoding and JSON, the schema
and every item (422: strings valid Unicode, chat messages non-empty lists of {role, content},
/get_reward texts not empty) and the item count (413).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import hmac
import ipaddress
import itertools
import json
import logging
import math
import signal
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable, Union

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
import torch
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from alignment.config import BaseConfig, ConfigError, RewardConfig, RouterConfig, load_config, read_yaml

log = logging.getLogger("align.serve_rm")

API_KEY_ENV = "ALIGN_RM_API_KEY"
DEFAULT_MAX_REQUEST_BYTES = 32 * 2**20
DEFAULT_MAX_ITEMS = 8192
DEFAULT_BODY_TIMEOUT_S = 60.0  # a whole body, however slow the link: 32 MiB at ~0.5 MiB/s
MAX_NESTING = 32  # levels of JSON inside a chat message's extra keys
MAX_ERRORS_SHOWN = 5
TRIM_AFTER_BYTES = 2**20  # hand freed heap back to the OS after bodies this large


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # chat templates may read more keys (name, tool calls)
    role: str
    content: str


Text = Union[str, list[ChatMessage]]


def _plain(text: Text) -> str | list[dict]:
    return text if isinstance(text, str) else [m.model_dump() for m in text]


def _text_fault(text: str) -> str | None:
    """Why a string cannot reach a tokenizer, or None: JSON's \\u escapes can make lone surrogates."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not valid Unicode: a lone surrogate \\u{ord(text[e.start]):04x} at character {e.start}"
    return None


def _value_fault(value: Any) -> str | None:
    """The first string fault inside a JSON value (a chat message's extra keys), as 'where: why'.
    Iterative, so a deeply nested value cannot exhaust the stack."""
    stack = [(value, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_NESTING:
            return f"{where}: nested deeper than {MAX_NESTING} levels"
        if isinstance(value, str):
            if fault := _text_fault(value):
                return f"{where}: {fault}"
        elif isinstance(value, dict):
            for key, inner in value.items():
                if fault := _text_fault(key):
                    return f"{where}: key {fault}"
                stack.append((inner, f"{where}.{key}", depth + 1))
        elif isinstance(value, list):
            stack.extend((inner, f"{where}[{i}]", depth + 1) for i, inner in enumerate(value))
    return None


def _item_fault(text: Text, allow_empty: bool = True) -> str | None:
    """Why one prompt / response / query cannot be scored, or None."""
    if isinstance(text, str):
        return "an empty text (nothing to score)" if not text and not allow_empty else _text_fault(text)
    if not text:
        return "an empty conversation: send at least one {role, content} message"
    for j, message in enumerate(text):
        for key, value in (("role", message.role), ("content", message.content)):
            if fault := _text_fault(value):
                return f"[{j}].{key}: {fault}"
        if fault := _value_fault(message.model_extra or {}):
            return f"[{j}]{fault}"
    return None


def _check_items(fields: dict[str, list], allow_empty: bool = True) -> None:
    """422 naming the field and index of every item that would fail in a model batch (up to
    MAX_ERRORS_SHOWN), before it can join one and fail other clients' items with it."""
    faults = [f"{name}[{i}]{'' if fault.startswith(('[', '.')) else ': '}{fault}"
              for name, items in fields.items() for i, item in enumerate(items)
              if (fault := _item_fault(item, allow_empty))]
    if faults:
        raise HTTPException(422, "invalid request: " + _join_faults(faults))


def _join_faults(faults: list[str]) -> str:
    more = len(faults) - MAX_ERRORS_SHOWN
    return "; ".join(faults[:MAX_ERRORS_SHOWN]) + (f"; and {more} more" if more > 0 else "")


class ScoreRequest(BaseModel):
    prompts: list[Text]
    responses: list[Text]

    @model_validator(mode="after")
    def _one_response_per_prompt(self):
        if len(self.prompts) != len(self.responses):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.responses)} responses "
                             "(one response per prompt)")
        return self

    def count(self) -> int:
        return len(self.prompts)

    def check_items(self) -> None:
        _check_items({"prompts": self.prompts, "responses": self.responses})


class CompareRequest(BaseModel):
    prompts: list[Text]
    responses_a: list[Text]
    responses_b: list[Text]

    @model_validator(mode="after")
    def _one_pair_per_prompt(self):
        if not len(self.prompts) == len(self.responses_a) == len(self.responses_b):
            raise ValueError(f"{len(self.prompts)} prompts, {len(self.responses_a)} responses_a and "
                             f"{len(self.responses_b)} responses_b (one pair per prompt)")
        return self

    def count(self) -> int:
        return len(self.prompts)

    def check_items(self) -> None:
        _check_items({"prompts": self.prompts, "responses_a": self.responses_a, "responses_b": self.responses_b})


class GetRewardRequest(BaseModel):
    query: list[str]  # prompt + response, already formatted (chat template applied)
    prompts: list[str] | None = None  # sent by OpenRLHF's client; not used for scoring
    labels: list[Any] | None = None

    def count(self) -> int:
        return len(self.query)

    def check_items(self) -> None:
        _check_items({"query": self.query}, allow_empty=False)  # an empty text is zero tokens to a chat model


def _describe(error: dict) -> str:
    field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
    return f"{field or 'body'}: {error['msg']}"


def parse_body(model: type[BaseModel], body: bytes, content_type: str | None, max_items: int):
    """The body as a checked `model`, or an HTTPException: 415 for a content type other than JSON,
    413 for more than `max_items` items, 422 for everything else. Runs in a thread: a large body takes
    a while to decode and check."""
    if content_type and content_type.split(";")[0].strip().lower() != "application/json":
        raise HTTPException(415, f"Content-Type must be application/json (got {content_type})")
    try:
        values = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise HTTPException(422, f"the body is not valid UTF-8 (byte {e.start}: {body[e.start:e.start + 1]!r})")
    except json.JSONDecodeError as e:
        raise HTTPException(422, f"the body is not valid JSON ({e.msg}: line {e.lineno} column {e.colno})")
    except RecursionError:
        raise HTTPException(422, "the body is not valid JSON for this API (nested too deeply)")
    try:
        request = model.model_validate(values)
    except ValidationError as e:
        raise HTTPException(422, "invalid request: " + _join_faults([_describe(err) for err in e.errors()]))
    if request.count() > max_items:
        raise HTTPException(413, f"{request.count()} items in one request, over the limit of {max_items} "
                                 "(align serve-rm --max-items); split the request")
    request.check_items()
    return request


class ScoringError(RuntimeError):
    """Scoring a request failed: a server fault (500), not bad input; or the server is stopping (503).
    The message is what the client sees: the cause goes to the log only."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


class _Job:
    """One request's items, and how far they have got."""

    def __init__(self, items: list, future: asyncio.Future, arrived: float):
        self.items = items
        self.future = future
        self.arrived = arrived
        self.results: list[float | None] = [None] * len(items)
        self.taken = 0  # items handed to a batch
        self.scored = 0


class MicroBatcher:
    """Pools the items of concurrent `score` calls into batches of up to `batch_size` for `score_fn`,
    run in `worker` (a one-thread executor shared by every batcher of the model)."""

    def __init__(self, score_fn: Callable[[list], list[float]], worker: ThreadPoolExecutor, batch_size: int,
                 max_wait_ms: float):
        self._score_fn = score_fn
        self._worker = worker
        self._batch_size = batch_size
        self._max_wait_s = max_wait_ms / 1000
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()  # None: stop once drained
        self._pending: deque[_Job] = deque()  # jobs with items not yet handed to a batch
        self._task: asyncio.Task | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Score everything already submitted, then end."""
        self._closing = True
        self._queue.put_nowait(None)
        await self._task

    async def score(self, items: list) -> list[float]:
        """The items' results in order. Cancelling the caller (its client has gone) cancels the job:
        its items not yet in a batch are never scored."""
        if not items:
            return []
        if self._closing:
            raise ScoringError("the server is shutting down: retry on another replica", status=503)
        loop = asyncio.get_running_loop()
        job = _Job(items, loop.create_future(), loop.time())
        self._queue.put_nowait(job)
        return await job.future

    async def _run(self) -> None:
        stopping = False
        while self._pending or not stopping:
            if not self._pending:
                job = await self._queue.get()
                if job is None:
                    break
                self._pending.append(job)
            if not stopping:  # once stopping, nothing more can arrive: score what is left at once
                stopping = await self._fill()
            await self._score(self._take())

    async def _fill(self) -> bool:
        """Take every queued job, then wait for more until a full batch is open or the oldest job has
        waited `max_wait_ms`. Returns True when the stop marker was taken."""
        loop = asyncio.get_running_loop()
        deadline = self._pending[0].arrived + self._max_wait_s
        while True:
            while not self._queue.empty():  # jobs that arrived during the last batch join this one
                job = self._queue.get_nowait()
                if job is None:
                    return True
                self._pending.append(job)
            if self._open_items() >= self._batch_size:
                return False
            try:
                job = await asyncio.wait_for(self._queue.get(), deadline - loop.time())
            except asyncio.TimeoutError:
                return False
            if job is None:
                return True
            self._pending.append(job)

    def _open_items(self) -> int:
        return sum(len(job.items) - job.taken for job in self._pending if not job.future.done())

    def _take(self) -> list[tuple[_Job, int, int]]:
        """Up to `batch_size` items as (job, start, end) slices, the places dealt one at a time
        round-robin over the waiting jobs, oldest first: a large request is split across batches and
        every batch has room for the requests that arrived meanwhile."""
        # a done job failed in an earlier batch, or was abandoned by its client
        self._pending = deque(job for job in self._pending if not job.future.done())
        counts, room = dict.fromkeys(self._pending, 0), self._batch_size
        while room:
            dealt = room
            for job in self._pending:
                if room and job.taken + counts[job] < len(job.items):
                    counts[job] += 1
                    room -= 1
            if dealt == room:  # every job is in full
                break
        parts = [(job, job.taken, job.taken + count) for job, count in counts.items() if count]
        for job, _, end in parts:
            job.taken = end
        self._pending = deque(job for job in self._pending if job.taken < len(job.items))
        return parts

    async def _score(self, parts: list[tuple[_Job, int, int]]) -> None:
        """Score a batch; if it fails, score its requests one at a time, so that only the one whose
        items fail gets an error."""
        if not parts:
            return
        try:
            rewards = await self._run_model([item for job, start, end in parts for item in job.items[start:end]])
        except Exception:
            if len(parts) == 1:
                return self._fail(parts[0][0])
            log.warning("a batch of %d items from %d requests failed: scoring each request alone",
                        sum(end - start for _, start, end in parts), len(parts), exc_info=True)
            for part in parts:
                if not part[0].future.done():
                    await self._score([part])
            return
        offset = 0
        for job, start, end in parts:
            job.results[start:end] = rewards[offset:offset + end - start]
            offset += end - start
            job.scored += end - start
            if job.scored == len(job.items) and not job.future.done():
                job.future.set_result(job.results)

    async def _run_model(self, items: list) -> list:
        rewards = await asyncio.get_running_loop().run_in_executor(self._worker, self._score_fn, items)
        # a float per item (a reward), or a tuple of floats (a preference model's score, uncertainty)
        rewards = [tuple(map(float, r)) if isinstance(r, (tuple, list)) else float(r) for r in rewards]
        if len(rewards) != len(items):
            raise ValueError(f"the model returned {len(rewards)} rewards for {len(items)} items")
        if not all(math.isfinite(x) for r in rewards for x in (r if isinstance(r, tuple) else (r,))):
            raise ValueError(f"the model returned a non-finite reward: {rewards}")
        return rewards

    @staticmethod
    def _fail(job: _Job) -> None:
        log.exception("scoring a request's %d items failed", len(job.items))
        if not job.future.done():
            job.future.set_exception(ScoringError("scoring failed: the reward model raised an error on this "
                                                  "request's items (details in the server log)"))


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1 / (1 + math.exp(-x))
    e = math.exp(x)  # no overflow for very negative x
    return e / (1 + e)


class _TooLarge(Exception):
    pass


try:  # glibc: malloc_trim hands the heap's free pages back to the OS
    _libc = ctypes.CDLL("libc.so.6")
    _malloc_trim = _libc.malloc_trim
except (OSError, AttributeError):  # another C library: memory is returned as it manages to
    _libc = _malloc_trim = None
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _release_memory() -> None:
    gc.collect()  # a failed parse's exception keeps the parsed body alive in reference cycles
    _malloc_trim(0)


class RequestGuard:
    """ASGI middleware: the bearer token (every path but /health), then the body size, both checked
    before the app reads or parses anything; the body must arrive within `body_timeout_s`. The body is
    buffered here and replayed to the app, which is cancelled if its client disconnects before the
    reply. After large bodies the freed heap is handed back to the OS: glibc would keep it, and the
    server's memory would stay at its peak."""

    def __init__(self, app, api_key: str | None, max_request_bytes: int, body_timeout_s: float):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_bytes = max_request_bytes
        self.body_timeout_s = body_timeout_s
        self.bytes_since_trim = 0
        self.trimmer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="malloc-trim")  # walks the heap
        self.next_trim = None

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        # the scheme is case-insensitive (RFC 7235); the token is compared in constant time
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] != "/health" and not self._authorized(headers.get(b"authorization", b"")):
            return await JSONResponse({"error": "missing or wrong API key: send 'Authorization: Bearer <key>'"},
                                      401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        too_large = JSONResponse({"error": f"request body over the limit of {self.max_bytes} bytes "
                                           "(align serve-rm --max-request-mb)"}, 413)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large(scope, receive, send)
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.body_timeout_s)
            if body is not None:  # else the client has gone
                await self._run_app(scope, receive, send, body)
        except _TooLarge:
            await too_large(scope, receive, send)
        except asyncio.TimeoutError:
            await JSONResponse({"error": f"the request body did not arrive within {self.body_timeout_s:g} s"}, 408,
                               headers={"Connection": "close"})(scope, receive, send)
        finally:
            body = None
            self._trim_if_due()

    async def _read_body(self, receive) -> bytes | None:
        """The whole body, or None if the client disconnected; _TooLarge past the limit."""
        chunks, size, more = [], 0, True
        while more:  # the declared length may be absent (chunked) or wrong: count what arrives
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            self.bytes_since_trim += len(chunks[-1])
            if size > self.max_bytes:
                raise _TooLarge
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _run_app(self, scope, receive, send, body: bytes) -> None:
        """The app on the buffered body, cancelled if the client disconnects before the reply is sent
        (the request's items still waiting for a batch are then never scored)."""
        gone, replayed, replied = asyncio.Event(), False, False

        async def replay():
            nonlocal replayed
            if replayed:  # the app asks whether its client has gone
                await gone.wait()
                return {"type": "http.disconnect"}
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send_noting_reply(message):
            nonlocal replied
            replied = replied or (message["type"] == "http.response.body" and not message.get("more_body", False))
            await send(message)

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        app = asyncio.create_task(self.app(scope, replay, send_noting_reply))
        watcher = asyncio.create_task(watch())
        try:
            await asyncio.wait({app, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not app.done() and not replied:
                log.info("%s %s: the client disconnected; request cancelled", scope["method"], scope["path"])
                app.cancel()
            await asyncio.wait({app})
        finally:  # also when this task is cancelled (the shutdown drain ran out): the app goes with it
            watcher.cancel()
            app.cancel()
        if not app.cancelled():
            app.result()  # the app's own error, for the server to log

    def _trim_if_due(self) -> None:
        """After a large request, a trim that starts once this request's memory is free: one queued
        behind the trim in progress, unless one is queued already."""
        if _malloc_trim is None or self.bytes_since_trim < TRIM_AFTER_BYTES:
            return
        self.bytes_since_trim = 0
        if self.next_trim is None or self.next_trim.running() or self.next_trim.done():
            self.next_trim = self.trimmer.submit(_release_memory)


def _check_limits(batch_size: int, max_wait_ms: float, max_request_bytes: int, max_items: int,
                  body_timeout_s: float) -> None:
    if batch_size < 1 or max_wait_ms < 0 or max_request_bytes < 1 or max_items < 1 or not body_timeout_s > 0:
        raise ConfigError(f"serve-rm: batch_size ({batch_size}), max_items ({max_items}), max_request_bytes "
                          f"({max_request_bytes}) and body_timeout_s ({body_timeout_s}) must be positive, "
                          f"max_wait_ms ({max_wait_ms}) not negative")


def create_app(scorer, api_key: str | None = None, batch_size: int = 32, max_wait_ms: float = 5.0,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_items: int = DEFAULT_MAX_ITEMS,
               router=None, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> FastAPI:
    """The ASGI app around `scorer`: a `RewardScorer` (anything with `name`, `score` and `score_texts`),
    or, with `router` (a `rewards.routing.PairRouter`), its pairwise preference model: /v1/compare then
    answers with the calibrated probability and uncertainty and routes uncertain pairs to the judge."""
    _check_limits(batch_size, max_wait_ms, max_request_bytes, max_items, body_timeout_s)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-model")
    if router is not None:  # a preference model: items are (prompt, A, B) -> (S_ab, U_ab)
        scorer = router.scorer
        pairs = MicroBatcher(lambda items: list(zip(*(t.tolist() for t in scorer.compare(*zip(*items))))),
                             worker, batch_size, max_wait_ms)
        texts = None
        judging = ThreadPoolExecutor(max_workers=4, thread_name_prefix="judge")  # blocking judge calls
        requests_seen = itertools.count()
    else:
        pairs = MicroBatcher(lambda items: scorer.score([p for p, _ in items], [r for _, r in items]),
                             worker, batch_size, max_wait_ms)
        texts = MicroBatcher(scorer.score_texts, worker, batch_size, max_wait_ms)
    batchers = [b for b in (pairs, texts) if b is not None]

    @asynccontextmanager
    async def lifespan(app):
        for batcher in batchers:
            batcher.start()
        log.info("serving %s %s (batches of up to %d items, %g ms wait, auth %s)",
                 "preference model" if router else "reward model", scorer.name, batch_size, max_wait_ms,
                 "on" if api_key else "off")
        if router is not None:
            log.info("routing: policy %s, judge %s", router.cfg.policy,
                     router.judge.cfg.type if router.judge is not None else "none")
        yield
        for batcher in batchers:
            await batcher.stop()
        worker.shutdown()
        if router is not None:
            judging.shutdown()
            router.close()
            log.info("judged %d of %d pairs, %d judge failures", router.routed, router.pairs, router.failures)
        log.info("batcher drained and stopped")

    app = FastAPI(title="align serve-rm", lifespan=lifespan)
    app.add_middleware(RequestGuard, api_key=api_key, max_request_bytes=max_request_bytes,
                       body_timeout_s=body_timeout_s)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)

    @app.exception_handler(ScoringError)
    async def scoring_error(request, exc: ScoringError):
        return JSONResponse({"error": str(exc)}, exc.status)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):  # the detail is logged by the server, not sent
        return JSONResponse({"error": "internal server error (details in the server log)"}, 500)

    async def parse(request: Request, model: type[BaseModel]):
        return await asyncio.to_thread(parse_body, model, await request.body(), request.headers.get("content-type"),
                                       max_items)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": scorer.name}

    def pointwise_only() -> None:
        if router is not None:
            raise HTTPException(400, f"{scorer.name} is a pairwise preference model: it compares two responses "
                                     "(POST /v1/compare) and gives no reward to a single one")

    @app.post("/get_reward")
    async def get_reward(request: Request):
        pointwise_only()
        body = await parse(request, GetRewardRequest)
        rewards = await texts.score(body.query)
        return {"rewards": rewards, "scores": [sigmoid(r) for r in rewards], "extra_logs": {}}

    @app.post("/v1/score")
    async def score(request: Request):
        pointwise_only()
        body = await parse(request, ScoreRequest)
        rewards = await pairs.score([(_plain(p), _plain(r)) for p, r in zip(body.prompts, body.responses)])
        return {"rewards": rewards, "model": scorer.name}

    @app.post("/v1/compare")
    async def compare(request: Request):
        body = await parse(request, CompareRequest)
        count = body.count()
        prompts = [_plain(p) for p in body.prompts]
        if router is not None:  # the preference model for every pair, the judge for the uncertain ones
            responses_a, responses_b = [_plain(r) for r in body.responses_a], [_plain(r) for r in body.responses_b]
            scored = await pairs.score(list(zip(prompts, responses_a, responses_b)))
            scores = torch.tensor([s for s, _ in scored])
            uncertainty = torch.tensor([u for _, u in scored])
            routed = await asyncio.get_running_loop().run_in_executor(
                judging, router.route_and_judge, prompts, responses_a, responses_b, scores, uncertainty,
                next(requests_seen))
            return {"prob_a": routed.prob_a, "uncertainty": routed.uncertainty.tolist(),
                    "judged": routed.judged.tolist()}
        # a reward model: P(A better) from the reward difference under Bradley-Terry
        rewards = await pairs.score([(p, _plain(r)) for p, r in zip(prompts, body.responses_a)]
                                    + [(p, _plain(r)) for p, r in zip(prompts, body.responses_b)])
        prob_a = [sigmoid(a - b) for a, b in zip(rewards[:count], rewards[count:])]
        return {"prob_a": prob_a, "uncertainty": [1 - abs(2 * p - 1) for p in prob_a], "judged": [False] * count}

    return app


def load_routing(path: str | Path, preference_model: str) -> RewardConfig:
    """The `reward:` block of a judge-routing YAML (DESIGN.md), for the preference model being served."""
    values = read_yaml(path)
    if set(values) != {"reward"}:
        raise ConfigError(f"{path}: a judge-routing file holds one top-level key, reward: (got {', '.join(values)})")
    if not isinstance(values["reward"], dict):
        raise ConfigError(f"{path}: reward: must be a mapping of routing keys")
    block = {**values["reward"], "type": "routed", "preference_model": preference_model}
    return load_config(BaseConfig, {"reward": block}).reward


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve to any interface
        return False


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          batch_size: int = 32, max_wait_ms: float = 5.0, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
          max_items: int = DEFAULT_MAX_ITEMS, log_level: str = "info", routing: str | None = None,
          body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S, drain_timeout_s: float = 30.0,
          keep_alive_s: float = 5.0) -> None:
    """Load the reward model, or the preference model (with `routing`: its judge-routing YAML), in
    `model_dir` and serve it until SIGINT / SIGTERM. On a signal, requests in flight get up to
    `drain_timeout_s` to finish (then they are cancelled); idle keep-alive connections are closed after
    `keep_alive_s`."""
    import uvicorn

    from alignment.models import BUILTIN_PREFIX, resolve_path
    from rewards.preference_model import is_preference_model
    from rewards.reward_model import RewardScorer
    from rewards.routing import PairRouter

    _check_limits(batch_size, max_wait_ms, max_request_bytes, max_items, body_timeout_s)  # before the model load
    if not drain_timeout_s > 0 or not keep_alive_s > 0:
        raise ConfigError(f"serve-rm: drain_timeout_s ({drain_timeout_s}) and keep_alive_s ({keep_alive_s}) "
                          "must be positive")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if _libc is not None:  # blocks over 1 MiB (bodies, their text) get their own mappings, unmapped when freed:
        _libc.mallopt(M_MMAP_THRESHOLD, 2**20)  # glibc would otherwise raise the threshold and keep them in the heap
    if not api_key and not is_loopback(host):
        log.warning("serving on %s, which other machines can reach, WITHOUT an API key: anyone who can reach "
                    "port %d can use the model. Set --api-key or %s, or serve on 127.0.0.1.", host, port, API_KEY_ENV)
    path = resolve_path(str(model_dir)) if str(model_dir).startswith(BUILTIN_PREFIX) else str(model_dir)
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"serve-rm --model: {model_dir} is not a model folder (no config.json)")
    router = None
    if is_preference_model(path):
        cfg = (load_routing(routing, path) if routing else
               RewardConfig(type="routed", preference_model=path, router=RouterConfig(policy="never")))
        cfg.batch_size = batch_size
        router = PairRouter.from_config(cfg)
        scorer = router.scorer
    elif routing:
        raise ConfigError(f"serve-rm --routing: {model_dir} is a reward model; judge routing needs a pairwise "
                          "preference model (trainer: preference_model)")
    else:
        scorer = RewardScorer.from_dir(path, batch_size=batch_size)
    app = create_app(scorer, api_key=api_key, batch_size=batch_size, max_wait_ms=max_wait_ms,
                     max_request_bytes=max_request_bytes, max_items=max_items, router=router,
                     body_timeout_s=body_timeout_s)
    # uvicorn shuts down gracefully on SIGINT / SIGTERM (stops accepting, lets in-flight requests finish
    # for up to drain_timeout_s, then the lifespan drains the batchers), then re-raises the signal under
    # the handler found at start-up: a no-op there ends the process with status 0 rather than death by signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    # Access logs only at debug level: one line per request costs CPU under load.
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                timeout_keep_alive=keep_alive_s, timeout_graceful_shutdown=drain_timeout_s)
