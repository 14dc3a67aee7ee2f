"""The reward scoring HTTP server behind `align serve-rm` (contract: README.md, "Reward scoring server").

    GET  /health       -> {"status": "ok", "model": str}
    POST /get_reward   OpenRLHF's remote reward API: {"query": [full text]} -> {"rewards", "scores", "extra_logs"}
    POST /v1/score     {"prompts", "responses"} -> {"rewards", "model"}
    POST /v1/compare   {"prompts", "responses_a", "responses_b"} -> {"prob_a", "uncertainty", "judged"}

A request passes the guard (rewards/request_guard.py: API key, body size and deadline), its body is
parsed and checked (rewards/scoring_requests.py), and its items join those of concurrent requests in
model batches (rewards/micro_batcher.py). Errors are answered as {"error": message}.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import itertools
import logging
import math
import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
import torch
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from alignment.config import BaseConfig, ConfigError, RewardConfig, RouterConfig, load_config, read_yaml
from rewards.micro_batcher import MicroBatcher, ScoringError
from rewards.request_guard import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_REQUEST_BYTES, RequestGuard, unmap_large_blocks
from rewards.scoring_requests import (
    DEFAULT_MAX_ITEMS, CompareRequest, GetRewardRequest, ScoreRequest, parse_body, plain,
)

log = logging.getLogger("align.serve_rm")

API_KEY_ENV = "ALIGN_RM_API_KEY"


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1 / (1 + math.exp(-x))
    e = math.exp(x)  # no overflow for very negative x
    return e / (1 + e)


def _check_limits(batch_size: int, max_wait_ms: float, max_request_bytes: int, max_items: int,
                  body_timeout_s: float) -> None:
    if batch_size < 1 or max_wait_ms < 0 or max_request_bytes < 1 or max_items < 1 or not body_timeout_s > 0:
        raise ConfigError(f"serve-rm: batch_size ({batch_size}), max_items ({max_items}), max_request_bytes "
                          f"({max_request_bytes}) and body_timeout_s ({body_timeout_s}) must be positive, "
                          f"max_wait_ms ({max_wait_ms}) not negative")


class _ModelRoutes:
    """What the routes do on one model. Its `batchers` run from the app's start to its stop."""

    kind: str

    def __init__(self, name: str, max_items: int):
        self.name = name
        self.max_items = max_items
        self.batchers: list[MicroBatcher] = []

    async def parse(self, request: Request, schema: type[BaseModel]):
        return await asyncio.to_thread(parse_body, schema, await request.body(), request.headers.get("content-type"),
                                       self.max_items)

    async def health(self):
        return {"status": "ok", "model": self.name}

    def started(self) -> None:
        """Once the batchers run (a preference model logs its routing)."""

    def stopped(self) -> None:
        """Once the batchers have drained (a preference model lets its judge go)."""


class _RewardModelRoutes(_ModelRoutes):
    """A reward model (anything with `name`, `score` and `score_texts`): a reward per item."""

    kind = "reward model"

    def __init__(self, scorer, batcher: Callable[[Callable], MicroBatcher], max_items: int):
        super().__init__(scorer.name, max_items)
        self.pairs = batcher(lambda items: scorer.score([p for p, _ in items], [r for _, r in items]))
        self.texts = batcher(scorer.score_texts)
        self.batchers = [self.pairs, self.texts]

    async def get_reward(self, request: Request):
        body = await self.parse(request, GetRewardRequest)
        rewards = await self.texts.score(body.query)
        return {"rewards": rewards, "scores": [sigmoid(r) for r in rewards], "extra_logs": {}}

    async def score(self, request: Request):
        body = await self.parse(request, ScoreRequest)
        rewards = await self.pairs.score([(plain(p), plain(r)) for p, r in zip(body.prompts, body.responses)])
        return {"rewards": rewards, "model": self.name}

    async def compare(self, request: Request):
        """P(A better) from the reward difference under Bradley-Terry."""
        body = await self.parse(request, CompareRequest)
        count = body.count()
        prompts = [plain(p) for p in body.prompts]
        rewards = await self.pairs.score([(p, plain(r)) for p, r in zip(prompts, body.responses_a)]
                                         + [(p, plain(r)) for p, r in zip(prompts, body.responses_b)])
        prob_a = [sigmoid(a - b) for a, b in zip(rewards[:count], rewards[count:])]
        return {"prob_a": prob_a, "uncertainty": [1 - abs(2 * p - 1) for p in prob_a], "judged": [False] * count}


class _PreferenceModelRoutes(_ModelRoutes):
    """A pairwise preference model behind a `rewards.routing.PairRouter`: /v1/compare answers with the
    calibrated probability and uncertainty and routes uncertain pairs to the judge; no pointwise rewards."""

    kind = "preference model"

    def __init__(self, router, batcher: Callable[[Callable], MicroBatcher], max_items: int):
        super().__init__(router.scorer.name, max_items)
        self.router = router
        compare = router.scorer.compare  # items are (prompt, A, B) -> (S_ab, U_ab)
        self.pairs = batcher(lambda items: list(zip(*(t.tolist() for t in compare(*zip(*items))))))
        self.batchers = [self.pairs]
        self.judging = ThreadPoolExecutor(max_workers=4, thread_name_prefix="judge")  # blocking judge calls
        self.requests_seen = itertools.count()

    def started(self) -> None:
        log.info("routing: policy %s, judge %s", self.router.cfg.policy,
                 self.router.judge.cfg.type if self.router.judge is not None else "none")

    def stopped(self) -> None:
        self.judging.shutdown()
        self.router.close()
        log.info("judged %d of %d pairs, %d judge failures", self.router.routed, self.router.pairs,
                 self.router.failures)

    async def get_reward(self, request: Request):
        self._pointwise_only()

    async def score(self, request: Request):
        self._pointwise_only()

    def _pointwise_only(self) -> None:
        raise HTTPException(400, f"{self.name} is a pairwise preference model: it compares two responses "
                                 "(POST /v1/compare) and gives no reward to a single one")

    async def compare(self, request: Request):
        """The preference model for every pair, the judge for the uncertain ones."""
        body = await self.parse(request, CompareRequest)
        prompts = [plain(p) for p in body.prompts]
        responses_a, responses_b = [plain(r) for r in body.responses_a], [plain(r) for r in body.responses_b]
        scored = await self.pairs.score(list(zip(prompts, responses_a, responses_b)))
        scores = torch.tensor([s for s, _ in scored])
        uncertainty = torch.tensor([u for _, u in scored])
        routed = await asyncio.get_running_loop().run_in_executor(
            self.judging, self.router.route_and_judge, prompts, responses_a, responses_b, scores, uncertainty,
            next(self.requests_seen))
        return {"prob_a": routed.prob_a, "uncertainty": routed.uncertainty.tolist(),
                "judged": routed.judged.tolist()}


def _lifespan(routes: _ModelRoutes, worker: ThreadPoolExecutor, batch_size: int, max_wait_ms: float,
              api_key: str | None):
    @asynccontextmanager
    async def lifespan(app):
        for batcher in routes.batchers:
            batcher.start()
        log.info("serving %s %s (batches of up to %d items, %g ms wait, auth %s)", routes.kind, routes.name,
                 batch_size, max_wait_ms, "on" if api_key else "off")
        routes.started()
        yield
        for batcher in routes.batchers:
            await batcher.stop()
        worker.shutdown()
        routes.stopped()
        log.info("batcher drained and stopped")

    return lifespan


async def _http_error(request, exc: StarletteHTTPException):
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)


async def _scoring_error(request, exc: ScoringError):
    return JSONResponse({"error": str(exc)}, exc.status)


async def _internal_error(request, exc: Exception):  # the detail is logged by the server, not sent
    return JSONResponse({"error": "internal server error (details in the server log)"}, 500)


def create_app(scorer, api_key: str | None = None, batch_size: int = 32, max_wait_ms: float = 5.0,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_items: int = DEFAULT_MAX_ITEMS,
               router=None, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> FastAPI:
    """The ASGI app around `scorer`: a `RewardScorer` (anything with `name`, `score` and `score_texts`),
    or, with `router` (a `rewards.routing.PairRouter`), its pairwise preference model: /v1/compare then
    answers with the calibrated probability and uncertainty and routes uncertain pairs to the judge."""
    _check_limits(batch_size, max_wait_ms, max_request_bytes, max_items, body_timeout_s)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-model")
    batcher = functools.partial(MicroBatcher, worker=worker, batch_size=batch_size, max_wait_ms=max_wait_ms)
    routes = (_RewardModelRoutes(scorer, batcher, max_items) if router is None
              else _PreferenceModelRoutes(router, batcher, max_items))
    app = FastAPI(title="align serve-rm", lifespan=_lifespan(routes, worker, batch_size, max_wait_ms, api_key))
    app.add_middleware(RequestGuard, api_key=api_key, max_request_bytes=max_request_bytes,
                       body_timeout_s=body_timeout_s)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ScoringError, _scoring_error)
    app.add_exception_handler(Exception, _internal_error)
    app.get("/health")(routes.health)
    app.post("/get_reward")(routes.get_reward)
    app.post("/v1/score")(routes.score)
    app.post("/v1/compare")(routes.compare)
    return app


def load_routing(path: str | Path, preference_model: str) -> RewardConfig:
    """The `reward:` block of a judge-routing YAML (README.md), for the preference model being served."""
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
    unmap_large_blocks()
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
