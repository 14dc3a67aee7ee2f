"""The reward scoring HTTP server behind `align serve-rm` (contract: DESIGN.md, "Reward scoring HTTP API").

    GET  /health       -> {"status": "ok", "model": str}
    POST /get_reward   OpenRLHF's remote reward API: {"query": [full text]} -> {"rewards", "scores", "extra_logs"}
    POST /v1/score     {"prompts", "responses"} -> {"rewards", "model"}
    POST /v1/compare   {"prompts", "responses_a", "responses_b"} -> {"prob_a", "uncertainty", "judged"}

Concurrent requests are pooled: a micro-batcher gathers their items into model batches of up to
`batch_size` (waiting at most `max_wait_ms` for a batch to fill) and runs the batches one at a time
in a single worker thread, since the model must not be called from two threads at once. Each
request gets its own results back in its own order.

Bad input is answered before it costs anything: the bearer token and the body size are checked
before the body is parsed (401, 413), then the schema (422) and the item count (413).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import math
import signal
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable, Union

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
import torch
from pydantic import BaseModel, ConfigDict, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from alignment.config import BaseConfig, ConfigError, RewardConfig, RouterConfig, load_config, read_yaml

log = logging.getLogger("align.serve_rm")

API_KEY_ENV = "ALIGN_RM_API_KEY"
DEFAULT_MAX_REQUEST_BYTES = 32 * 2**20
DEFAULT_MAX_ITEMS = 8192


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # chat templates may read more keys (name, tool calls)
    role: str
    content: str


Text = Union[str, list[ChatMessage]]


def _plain(text: Text) -> str | list[dict]:
    return text if isinstance(text, str) else [m.model_dump() for m in text]


class ScoreRequest(BaseModel):
    prompts: list[Text]
    responses: list[Text]

    @model_validator(mode="after")
    def _one_response_per_prompt(self):
        if len(self.prompts) != len(self.responses):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.responses)} responses "
                             "(one response per prompt)")
        return self


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


class GetRewardRequest(BaseModel):
    query: list[str]  # prompt + response, already formatted (chat template applied)
    prompts: list[str] | None = None  # sent by OpenRLHF's client; not used for scoring
    labels: list[Any] | None = None


class ScoringError(RuntimeError):
    """The model failed on a batch: a server fault (500), not bad input."""


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
        if not items:
            return []
        if self._closing:
            raise ScoringError("the server is shutting down")
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
        """Take queued jobs until a full batch is pending or the oldest job has waited `max_wait_ms`.
        Returns True when the stop marker was taken."""
        loop = asyncio.get_running_loop()
        deadline = self._pending[0].arrived + self._max_wait_s
        while self._open_items() < self._batch_size:
            if self._queue.empty():
                try:
                    job = await asyncio.wait_for(self._queue.get(), deadline - loop.time())
                except asyncio.TimeoutError:
                    return False
            else:
                job = self._queue.get_nowait()
            if job is None:
                return True
            self._pending.append(job)
        return False

    def _open_items(self) -> int:
        return sum(len(job.items) - job.taken for job in self._pending if not job.future.done())

    def _take(self) -> list[tuple[_Job, int, int]]:
        """Up to `batch_size` items from the oldest jobs, as (job, start, end) slices; a large request
        is split across batches."""
        parts, room = [], self._batch_size
        while self._pending and room:
            job = self._pending[0]
            if job.future.done():  # failed in an earlier batch, or abandoned by its client
                self._pending.popleft()
                continue
            end = min(len(job.items), job.taken + room)
            parts.append((job, job.taken, end))
            room -= end - job.taken
            job.taken = end
            if end == len(job.items):
                self._pending.popleft()
        return parts

    async def _score(self, parts: list[tuple[_Job, int, int]]) -> None:
        items = [item for job, start, end in parts for item in job.items[start:end]]
        if not items:
            return
        try:
            rewards = await asyncio.get_running_loop().run_in_executor(self._worker, self._score_fn, items)
            # a float per item (a reward), or a tuple of floats (a preference model's score, uncertainty)
            rewards = [tuple(map(float, r)) if isinstance(r, (tuple, list)) else float(r) for r in rewards]
            if len(rewards) != len(items):
                raise ValueError(f"the model returned {len(rewards)} rewards for {len(items)} items")
            if not all(math.isfinite(x) for r in rewards for x in (r if isinstance(r, tuple) else (r,))):
                raise ValueError(f"the model returned a non-finite reward: {rewards}")
        except Exception as e:  # only the requests in this batch fail; the server goes on
            log.exception("scoring a batch of %d items failed", len(items))
            for job, _, _ in parts:
                if not job.future.done():
                    job.future.set_exception(ScoringError(f"scoring failed: {type(e).__name__}: {e}"))
            return
        offset = 0
        for job, start, end in parts:
            job.results[start:end] = rewards[offset:offset + end - start]
            offset += end - start
            job.scored += end - start
            if job.scored == len(job.items) and not job.future.done():
                job.future.set_result(job.results)


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1 / (1 + math.exp(-x))
    e = math.exp(x)  # no overflow for very negative x
    return e / (1 + e)


class RequestGuard:
    """ASGI middleware: the bearer token (every path but /health), then the body size, both checked
    before the app reads or parses anything. The body is buffered here and replayed to the app."""

    def __init__(self, app, api_key: str | None, max_request_bytes: int):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_bytes = max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if (self.expected and scope["path"] != "/health"
                and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected)):
            return await JSONResponse({"error": "missing or wrong API key: send 'Authorization: Bearer <key>'"},
                                      401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        too_large = JSONResponse({"error": f"request body over the limit of {self.max_bytes} bytes "
                                           "(align serve-rm --max-request-mb)"}, 413)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:  # the declared length may be absent (chunked) or wrong: count what arrives
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _describe(error: dict) -> str:
    if error["type"] == "json_invalid":
        return f"the body is not valid JSON ({error.get('ctx', {}).get('error', error['msg'])})"
    field = ".".join(str(part) for part in error["loc"][1:])  # loc[0] is "body"
    return f"{field or 'body'}: {error['msg']}"


def _check_limits(batch_size: int, max_wait_ms: float, max_request_bytes: int, max_items: int) -> None:
    if batch_size < 1 or max_wait_ms < 0 or max_request_bytes < 1 or max_items < 1:
        raise ConfigError(f"serve-rm: batch_size ({batch_size}), max_items ({max_items}) and max_request_bytes "
                          f"({max_request_bytes}) must be positive, max_wait_ms ({max_wait_ms}) not negative")


def create_app(scorer, api_key: str | None = None, batch_size: int = 32, max_wait_ms: float = 5.0,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_items: int = DEFAULT_MAX_ITEMS,
               router=None) -> FastAPI:
    """The ASGI app around `scorer`: a `RewardScorer` (anything with `name`, `score` and `score_texts`),
    or, with `router` (a `rewards.routing.PairRouter`), its pairwise preference model: /v1/compare then
    answers with the calibrated probability and uncertainty and routes uncertain pairs to the judge."""
    _check_limits(batch_size, max_wait_ms, max_request_bytes, max_items)
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
    app.add_middleware(RequestGuard, api_key=api_key, max_request_bytes=max_request_bytes)

    @app.exception_handler(RequestValidationError)
    async def schema_error(request, exc: RequestValidationError):
        return JSONResponse({"error": "invalid request: " + "; ".join(_describe(e) for e in exc.errors())}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)

    @app.exception_handler(ScoringError)
    async def scoring_error(request, exc: ScoringError):
        return JSONResponse({"error": str(exc)}, 500)

    def check_count(count: int) -> None:
        if count > max_items:
            raise HTTPException(413, f"{count} items in one request, over the limit of {max_items} "
                                     "(align serve-rm --max-items); split the request")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": scorer.name}

    def pointwise_only() -> None:
        if router is not None:
            raise HTTPException(400, f"{scorer.name} is a pairwise preference model: it compares two responses "
                                     "(POST /v1/compare) and gives no reward to a single one")

    @app.post("/get_reward")
    async def get_reward(body: GetRewardRequest):
        pointwise_only()
        check_count(len(body.query))
        rewards = await texts.score(body.query)
        return {"rewards": rewards, "scores": [sigmoid(r) for r in rewards], "extra_logs": {}}

    @app.post("/v1/score")
    async def score(body: ScoreRequest):
        pointwise_only()
        check_count(len(body.prompts))
        rewards = await pairs.score([(_plain(p), _plain(r)) for p, r in zip(body.prompts, body.responses)])
        return {"rewards": rewards, "model": scorer.name}

    @app.post("/v1/compare")
    async def compare(body: CompareRequest):
        count = len(body.prompts)
        check_count(count)
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


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          batch_size: int = 32, max_wait_ms: float = 5.0, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
          max_items: int = DEFAULT_MAX_ITEMS, log_level: str = "info", routing: str | None = None) -> None:
    """Load the reward model, or the preference model (with `routing`: its judge-routing YAML), in
    `model_dir` and serve it until SIGINT / SIGTERM."""
    import uvicorn

    from alignment.models import BUILTIN_PREFIX, resolve_path
    from rewards.preference_model import is_preference_model
    from rewards.reward_model import RewardScorer
    from rewards.routing import PairRouter

    _check_limits(batch_size, max_wait_ms, max_request_bytes, max_items)  # before the slow model load
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
                     max_request_bytes=max_request_bytes, max_items=max_items, router=router)
    # uvicorn shuts down gracefully on SIGINT / SIGTERM (stops accepting, lets in-flight requests
    # finish, then the lifespan drains the batchers), then re-raises the signal under the handler
    # found at start-up: a no-op there ends the process with status 0 rather than death by signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    # Access logs only at debug level: one line per request costs CPU under load.
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug")
