"""`align serve-rm` in test processes: servers on free loopback ports, requests with the test key, and a
scorer that fails on demand."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.support import REPO

KEY = "test-key"
# One torch thread per server: beside the test's own process (and anything else running) on a
# small machine, more threads spin-wait on each other and a batch can take 50x longer.
SERVER_ENV = {"OMP_NUM_THREADS": "1"}


@contextmanager
def running(servers: dict):
    """Servers started together (start-up is mostly imports): ready on entry, stopped on exit."""
    try:
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m alignment serve-rm` on a free loopback port, its output in `log`."""

    def __init__(self, model: Path, log: Path, *args: str, env: dict | None = None):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "alignment", "serve-rm", "--model", str(model),
                                          "--port", str(self.port), *args], cwd=REPO,
                                         env={**os.environ, **SERVER_ENV, **(env or {})}, stdout=out,
                                         stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve-rm exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"serve-rm did not answer /health within {timeout_s} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def post(url: str, path: str, body, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=30)


class FlakyScorer:
    """Scores a text by its length; fails the whole batch when one item says 'boom'."""

    name = "flaky"

    def score(self, prompts, responses):
        if any("boom" in r for r in responses):
            raise RuntimeError("the model ran out of memory")
        return [float(len(p) + len(r)) for p, r in zip(prompts, responses)]

    def score_texts(self, texts):
        return [float(len(t)) for t in texts]
