"""Rewards from an `align serve-rm` server: the HTTP client and the trainer-facing `reward.type: remote`.

A failure is raised, never turned into a reward: transient faults (connection errors, timeouts,
429, 5xx) are retried with exponential backoff, other 4xx are raised at once with the server's
message, and every reply is checked to hold one finite float per response. `timeout_s` bounds each
HTTP call (attempt) in wall-clock time, from connecting to the last byte of the reply however slowly
the server sends it (`BoundedClient`, shared with the judges of rewards/judges.py).
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from typing import Callable

import httpx

from alignment.config import RewardConfig
from alignment.data import Example


class RemoteRewardError(RuntimeError):
    """The reward server could not give a valid answer."""


def _server_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        return str(body.get("error") or body.get("detail") or body)
    return str(body)[:500]


class BoundedClient:
    """An HTTP client whose every request has a hard wall-clock bound, from connecting to the last byte
    of the reply. httpx's own timeouts bound each network read, so a server that trickles its reply
    (or its headers) one byte at a time could hold a call for ever; here a request runs on a private
    event-loop thread and is cancelled at the deadline, which raises httpx.TimeoutException (a
    TransportError: callers retry it as a timeout). Safe to call from several threads at once."""

    def __init__(self, base_url: str, timeout_s: float, headers: dict | None = None,
                 limits: httpx.Limits | None = None):
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="http-client", daemon=True)
        self._thread.start()
        self._http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout_s,
                                       limits=limits or httpx.Limits())

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """The reply, read in full within `timeout_s`."""
        bounded = asyncio.wait_for(self._http.request(method, path, **kwargs), self.timeout_s)
        try:
            return asyncio.run_coroutine_threadsafe(bounded, self._loop).result()
        except asyncio.TimeoutError:
            raise httpx.TimeoutException(f"no complete reply within {self.timeout_s:g} s") from None

    def request_retried(self, method: str, path: str, retries: int, backoff_s: float,
                        describe: Callable[[httpx.Response], str], **kwargs) -> tuple[httpx.Response | None, str]:
        """(the first reply that is not a transient fault, ""): transport errors, timeouts, 429 and 5xx are
        asked again up to `retries` times with exponential backoff; any other reply, a 4xx included, is
        returned (asking again cannot help). (None, the last fault, a reply told by `describe`) when
        every try failed."""
        last_error = ""
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(backoff_s * 2 ** (attempt - 1))
            try:
                response = self.request(method, path, **kwargs)
            except httpx.TransportError as e:  # refused or dropped connections, timeouts (the deadline's included)
                last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last_error = f"HTTP {response.status_code}: {describe(response)}"
                continue
            return response, ""
        return None, last_error

    def close(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._http.aclose(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


class RemoteRewardClient:
    """Blocking client of one reward server; `retries` is the number of tries after the first."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 30.0, retries: int = 3,
                 backoff_s: float = 0.5):
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff_s = backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = BoundedClient(self.url, timeout_s, headers)

    def close(self) -> None:
        self._http.close()

    def health(self) -> dict:
        return self._request("GET", "/health")

    def score(self, prompts: list, responses: list) -> list[float]:
        """One reward per (prompt, response); prompts and responses are text or chat messages."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return []
        reply = self._request("POST", "/v1/score", {"prompts": prompts, "responses": responses})
        return self._rewards(reply, len(responses))

    def _rewards(self, reply: dict, count: int) -> list[float]:
        rewards = reply.get("rewards") if isinstance(reply, dict) else None
        if not isinstance(rewards, list) or len(rewards) != count:
            got = f"{len(rewards)} rewards" if isinstance(rewards, list) else f"{str(reply)[:200]!r}"
            raise RemoteRewardError(f"{self.url}/v1/score: expected {count} rewards, got {got}")
        for i, r in enumerate(rewards):
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
                raise RemoteRewardError(f"{self.url}/v1/score: reward {i} is {r!r}, not a finite number")
        return [float(r) for r in rewards]

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        response, last_error = self._http.request_retried(method, path, self.retries, self.backoff_s, _server_message,
                                                          json=body)
        if response is None:
            raise RemoteRewardError(f"{self.url}{path}: no valid reply after {self.retries + 1} attempts; last error: "
                                    f"{last_error}")
        if response.status_code >= 400:  # our request is wrong: asking again cannot help
            raise RemoteRewardError(f"{self.url}{path}: HTTP {response.status_code}: {_server_message(response)}")
        try:
            return response.json()
        except ValueError:
            raise RemoteRewardError(f"{self.url}{path}: the reply is not JSON: {response.text[:200]!r}") from None


class RemoteReward:
    """`reward: {type: remote, url: ...}`: scores a trainer's responses on a reward server, in
    requests of at most `reward.batch_size` items."""

    def __init__(self, cfg: RewardConfig):
        self.batch_size = cfg.batch_size
        self.client = RemoteRewardClient(cfg.url, api_key=os.environ.get(cfg.api_key_env) or None,
                                         timeout_s=cfg.timeout_s, retries=cfg.retries)

    def __call__(self, examples: list[Example], responses: list[str]) -> list[float]:
        prompts = [e.prompt for e in examples]
        rewards: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            end = start + self.batch_size
            rewards += self.client.score(prompts[start:end], responses[start:end])
        return rewards
