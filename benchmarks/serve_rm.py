"""Throughput and latency of `align serve-rm` (POST /v1/score), against in-process scoring of the same items.

    align bench serve_rm            # 1, 8 and 32 items per request, 16 concurrent clients (~1-2 min on 2 cores)
    align bench serve_rm --quick    # a few requests per size (smoke check)

Model: all-MiniLM-L6-v2 (embedded, offline) loaded as a one-logit classifier with a fresh head: the
rewards mean nothing, the cost per item is a real small reward model's. Items: a one-line prompt and
a ~40-word response (about 70 tokens as a text pair).
The server runs in a subprocess on a loopback port (`python -m alignment serve-rm`, batches of up
to 32 items, 5 ms wait); CLIENTS concurrent clients (asyncio + httpx, in this process) each send
their next request as soon as the last one is answered. Latency is per request, send to reply.
Reference: `RewardScorer.score` in this process on batches of 32, before the server starts; the
"http cost" column is in-process items/s over served items/s.
Client and server share the machine, so torch gets one thread fewer than there are cores (in the
server and in the reference alike): the event loop and the load generator need a core, and torch
threads that lose their core to them spin-wait on each other and slow every batch.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import _common as C

ROOT = C.ROOT

NAME = "serve_rm"
CLIENTS = 16
SIZES = [1, 8, 32]
BATCH_SIZE = 32
THREADS = max(1, (os.cpu_count() or 2) - 1)
TOPICS = ["tides", "volcanoes", "bread", "bridges", "owls", "glaciers", "compilers", "violins"]


def _items(count: int) -> tuple[list[str], list[str]]:
    prompts = [f"Question {i}: explain how {TOPICS[i % len(TOPICS)]} work, in a few sentences." for i in range(count)]
    responses = [f"Answer {i}: " + " ".join(f"{TOPICS[(i + k) % len(TOPICS)]} matter because of step {k}."
                                            for k in range(6)) for i in range(count)]
    return prompts, responses


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _in_process(model: Path, items: int) -> dict:
    import torch

    from rewards.reward_model import RewardScorer

    torch.set_num_threads(THREADS)
    scorer = RewardScorer.from_dir(model, batch_size=BATCH_SIZE)
    prompts, responses = _items(items)
    scorer.score(prompts[:BATCH_SIZE], responses[:BATCH_SIZE])  # warm-up
    start = time.perf_counter()
    scorer.score(prompts, responses)
    seconds = time.perf_counter() - start
    return {"items": items, "seconds": seconds, "items_per_s": items / seconds}


def _start_server(model: Path) -> tuple[subprocess.Popen, str, float]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "alignment", "serve-rm", "--model", str(model), "--port", str(port),
                             "--batch-size", str(BATCH_SIZE), "--max-wait-ms", "5", "--log-level", "warning"],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    while time.perf_counter() - start < 120:
        if proc.poll() is not None:
            raise RuntimeError(f"serve-rm exited with status {proc.returncode} at start-up")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url, time.perf_counter() - start
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("serve-rm did not answer /health within 120 s")


async def _load(url: str, size: int, requests: int) -> dict:
    """`requests` requests of `size` items from CLIENTS clients; every reply is checked."""
    import httpx

    prompts, responses = _items(requests * size)
    latencies: list[float] = []
    errors: list[str] = []
    next_request = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_request
        while next_request < requests:
            i, next_request = next_request, next_request + 1
            body = {"prompts": prompts[i * size:(i + 1) * size], "responses": responses[i * size:(i + 1) * size]}
            start = time.perf_counter()
            reply = await http.post(url + "/v1/score", json=body)
            latencies.append(time.perf_counter() - start)
            if reply.status_code != 200 or len(reply.json().get("rewards", [])) != size:
                errors.append(f"HTTP {reply.status_code}: {reply.text[:200]}")

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=CLIENTS)) as http:
        warm = [http.post(url + "/v1/score", json={"prompts": prompts[:size], "responses": responses[:size]})
                for _ in range(CLIENTS)]
        await asyncio.gather(*warm)
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
        seconds = time.perf_counter() - start
    latencies.sort()
    return {
        "items_per_request": size, "requests": requests, "seconds": seconds, "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "requests_per_s": requests / seconds, "items_per_s": requests * size / seconds,
        "latency_ms": {f"p{q}": 1000 * _percentile(latencies, q / 100) for q in (50, 90, 99)},
    }


def main(quick: bool = False) -> dict:
    import torch

    from alignment.models import builtin_minilm

    model = builtin_minilm()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    counts = {size: 16 for size in SIZES} if quick else {size: max(256, 4096 // size) for size in SIZES}
    reference_items = 256 if quick else 4096
    print(f"serve-rm on all-MiniLM-L6-v2, {CLIENTS} clients, batches of {BATCH_SIZE}, {THREADS} torch "
          f"thread(s), device {device}", flush=True)
    reference = _in_process(model, reference_items)
    print(f"  in-process: {reference['items_per_s']:.1f} items/s ({reference_items} items)", flush=True)
    proc, url, startup_s = _start_server(model)
    served = {}
    try:
        for size, requests in counts.items():
            served[str(size)] = res = asyncio.run(_load(url, size, requests))
            print(f"  {size:2d} items/request: {res['requests_per_s']:.1f} requests/s, {res['items_per_s']:.1f} "
                  f"items/s, p50 {res['latency_ms']['p50']:.1f} ms, {res['errors']} errors", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        exit_status = proc.wait(timeout=60)

    rows = [[size, res["requests"], f"{res['requests_per_s']:.1f}", f"{res['items_per_s']:.1f}",
             *(f"{res['latency_ms'][p]:.1f}" for p in ("p50", "p90", "p99")),
             f"{reference['items_per_s'] / res['items_per_s']:.2f}x", res["errors"]]
            for size, res in served.items()]
    rows.append(["in-process", "", "", f"{reference['items_per_s']:.1f}", "", "", "", "1.00x", ""])
    print(C.table(rows, ["items/request", "requests", "requests/s", "items/s", "p50 ms", "p90 ms", "p99 ms",
                         "http cost", "errors"]))
    print(f"server start-up {startup_s:.1f} s; exit status after SIGTERM: {exit_status}")
    data = {
        "quick": quick, "device": device, "model": "all-MiniLM-L6-v2 (1-logit head, untrained)", "clients": CLIENTS,
        "batch_size": BATCH_SIZE, "max_wait_ms": 5, "threads": THREADS, "server_startup_s": startup_s,
        "server_exit_status": exit_status, "machine": C.machine_info(),
        "versions": C.versions("torch", "transformers", "fastapi", "uvicorn", "httpx"), "git": C.git_state(ROOT),
        "command": "align bench serve_rm" + (" --quick" if quick else ""),
        "in_process": reference, "served": served,
    }
    written = C.write_results(NAME + (".quick" if quick else ""), data)
    print(f"results: {written}")
    return data
