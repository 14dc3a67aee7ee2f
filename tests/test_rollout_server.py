"""The vllm_server rollout backend against an in-process fake of vLLM's HTTP protocol (no vLLM process):
dealing and seeds, weight versions on tokens, the push protocol, and every failure naming its server
within the deadline. The real servers are in tests/test_rollout_server_vllm.py (slow tier)."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from safetensors.torch import load_file

from alignment.config import ConfigError, RolloutConfig, ServerConfig
from alignment.rollout import Canary, SamplingParams, WeightSyncError, sample_seed
from alignment.rollout.server import ServerEngine, ServerError


class Tok:
    eos_token_id = 2


class FakeServer:
    """One vLLM server's routes as the engine uses them. Its "model" is one number, `scale`, read from the
    pushed weights (the sum of `w`); every token's log-prob is -scale, so the canary tells weights apart."""

    def __init__(self, url: str):
        self.url = url
        self.version = "default"
        self.scale = 1.0
        self.calls: list[str] = []
        self.requests: list[dict] = []
        self.fail: dict[str, tuple[int, str]] = {}  # path -> (status, message)
        self.hang: set[str] = set()
        self.token_version: str | None = None  # label tokens with this instead of the current version
        self.report_version: str | None = None  # /weight_info answers this instead
        self.ignore_reload = False
        self.busy_resets = 0  # /reset_prefix_cache fails this many times first
        self.paused = False

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.calls.append(path)
        if path in self.hang:
            await asyncio.sleep(60)
        if path in self.fail:
            status, message = self.fail[path]
            return httpx.Response(status, json={"error": {"message": message, "code": status}})
        body = json.loads(request.content) if request.content else {}
        if path == "/weight_info":
            return httpx.Response(200, json={"weight_version": self.report_version or self.version})
        if path == "/pause":
            self.paused = True
            return httpx.Response(200, json={"status": "paused"})
        if path == "/resume":
            self.paused = False
            return httpx.Response(200, json={"status": "resumed"})
        if path == "/collective_rpc":
            assert body["method"] == "reload_weights" and self.paused
            if not self.ignore_reload:
                self.scale = float(load_file(f"{body['kwargs']['weights_path']}/model.safetensors")["w"].sum())
            return httpx.Response(200, json={"results": [None]})
        if path == "/update_weight_version":
            self.version = body["new_version"]
            return httpx.Response(200, json={"success": True, "new_version": self.version})
        if path == "/reset_prefix_cache":
            self.busy_resets -= 1
            return httpx.Response(200, json={"success": self.busy_resets < 0})
        if path == "/inference/v1/generate":
            self.requests.append(body)
            params, prompt = body["sampling_params"], body["token_ids"]
            if params.get("prompt_logprobs") is not None:  # scoring
                rows = [None] + [{str(t): {"logprob": -self.scale, "rank": 1}} for t in prompt[1:]]
                return httpx.Response(200, json={"prompt_logprobs": rows, "choices": [
                    {"index": 0, "token_ids": [5], "finish_reason": "length", "logprobs": None,
                     "weight_versions": [{"version": self.version, "start": 0, "end": 1}]}]})
            rng = random.Random(params["seed"])
            tokens = [rng.randrange(3, 100) for _ in range(params["max_tokens"])]
            return httpx.Response(200, json={"prompt_logprobs": None, "choices": [{
                "index": 0, "token_ids": tokens, "finish_reason": "length", "stop_reason": None,
                "logprobs": {"content": [{"token_id": t, "logprob": -self.scale, "rank": 1, "top_logprobs": []}
                                         for t in tokens]},
                "weight_versions": [{"version": self.token_version or self.version, "start": 0,
                                     "end": len(tokens)}]}]})
        return httpx.Response(404, json={"detail": "Not Found"})


class FakeServers(httpx.AsyncBaseTransport):
    def __init__(self, n: int):
        self.servers = {f"http://fake-{i}:8000": FakeServer(f"http://fake-{i}:8000") for i in range(n)}

    @property
    def urls(self) -> list[str]:
        return list(self.servers)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        parts = urlsplit(str(request.url))
        return await self.servers[f"{parts.scheme}://{parts.netloc}"](request)


def engine(fakes: FakeServers, tmp_path, timeout_s: float = 5.0) -> ServerEngine:
    return ServerEngine(ServerConfig(urls=fakes.urls, transport="disk", timeout_s=timeout_s), Tok(),
                        weights_dir=tmp_path / "weights", transport=fakes)


def weights(scale: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2,), scale / 2), "tied": torch.zeros(1)}


def canary(scale: float) -> Canary:
    return Canary([[1, 2, 3]], [[4, 5]], [torch.full((2,), -scale)])


PROMPTS = [[1, 7, 8], [1, 9], [1, 10, 11, 12], [1, 13]]


def test_samples_are_seeded_per_sample_and_do_not_depend_on_the_number_of_servers(tmp_path):
    one, three = FakeServers(1), FakeServers(3)
    sampling = SamplingParams(n=2, max_new_tokens=5, seed=3)
    a = engine(one, tmp_path).generate(PROMPTS, sampling, prompt_uids=[4, 5, 6, 7])
    b = engine(three, tmp_path).generate(PROMPTS, sampling, prompt_uids=[4, 5, 6, 7])
    assert a.response_ids == b.response_ids and a.prompt_index == [0, 0, 1, 1, 2, 2, 3, 3]
    assert a.prompt_ids[2] == PROMPTS[1] and a.finish_reasons == ["length"] * 8
    assert all(torch.equal(lp, torch.full((5,), -1.0)) for lp in a.logprobs)
    # dealt by uid: uid % 3, each prompt's samples on one server, seeded by sample_seed
    for url, server in three.servers.items():
        assert len(server.requests) == 2 * sum(1 for uid in [4, 5, 6, 7] if uid % 3 == three.urls.index(url))
    seeds = sorted(r["sampling_params"]["seed"] for s in three.servers.values() for r in s.requests)
    assert seeds == sorted(sample_seed(3, uid, k) for uid in [4, 5, 6, 7] for k in range(2))
    request = one.servers[one.urls[0]].requests[0]["sampling_params"]
    assert request["logprobs"] == 0 and request["stop_token_ids"] == [2] and request["n"] == 1


def test_a_push_runs_the_protocol_and_is_verified_on_every_server(tmp_path):
    fakes = FakeServers(2)
    eng = engine(fakes, tmp_path)
    assert eng.update_weights(weights(2.0), canary(2.0), version="step-1") == 0.0
    for server in fakes.servers.values():
        assert server.version == "step-1" and server.scale == 2.0 and not server.paused
        assert server.calls[1:] == ["/pause", "/collective_rpc", "/update_weight_version", "/reset_prefix_cache",
                                    "/resume", "/weight_info", "/inference/v1/generate"]
    rollouts = eng.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=3))
    assert rollouts.weight_versions == ["step-1"] * 4
    # the next push replaces the folder of the last one
    eng.update_weights(weights(3.0), canary(3.0), version="step-2")
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["step-2"]


def test_the_canary_names_the_server_that_kept_its_old_weights(tmp_path):
    fakes = FakeServers(2)
    eng = engine(fakes, tmp_path)
    eng.update_weights(weights(2.0), canary(2.0), version="step-1")
    fakes.servers[fakes.urls[1]].ignore_reload = True
    with pytest.raises(WeightSyncError, match=f"on vLLM server {fakes.urls[1]}: .* differ by 1 > tolerance"):
        eng.update_weights(weights(3.0), canary(3.0), version="step-2")
    assert all(not s.paused for s in fakes.servers.values())  # resumed all the same


def test_version_drift_is_caught_on_the_server_and_on_the_tokens(tmp_path):
    fakes = FakeServers(2)
    eng = engine(fakes, tmp_path)
    server = fakes.servers[fakes.urls[0]]
    server.report_version = "step-0"
    with pytest.raises(WeightSyncError, match=f"{fakes.urls[0]}: reports weight version 'step-0' after the push "
                                              "of step-1"):
        eng.update_weights(weights(2.0), canary(2.0), version="step-1")
    server.report_version = None
    eng.update_weights(weights(2.0), canary(2.0), version="step-1")
    server.token_version = "step-0"
    with pytest.raises(WeightSyncError, match=f"{fakes.urls[0]}: tokens generated with weight version step-0, "
                                              "expected step-1"):
        eng.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=3))


def test_error_answers_name_the_server_the_route_and_the_message(tmp_path):
    fakes = FakeServers(2)
    eng = engine(fakes, tmp_path)
    fakes.servers[fakes.urls[1]].fail["/inference/v1/generate"] = (400, "This model's maximum context length is 512")
    with pytest.raises(ServerError, match=f"{fakes.urls[1]}: POST /inference/v1/generate answered HTTP 400: "
                                          "This model's maximum context length"):
        eng.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=3))
    fakes.servers[fakes.urls[0]].fail["/collective_rpc"] = (500, "Worker failed")
    with pytest.raises(ServerError, match=f"{fakes.urls[0]}: POST /collective_rpc answered HTTP 500: Worker failed"):
        eng.update_weights(weights(2.0), canary(2.0), version="step-1")
    assert all(not s.paused for s in fakes.servers.values())


def test_a_server_without_dev_mode_or_scale_out_is_named_with_the_fix(tmp_path):
    fakes = FakeServers(1)
    fakes.servers[fakes.urls[0]].fail["/weight_info"] = (404, "Not Found")
    with pytest.raises(ServerError, match="VLLM_SERVER_DEV_MODE=1"):
        engine(fakes, tmp_path)
    fakes = FakeServers(1)
    eng = engine(fakes, tmp_path)
    fakes.servers[fakes.urls[0]].fail["/inference/v1/generate"] = (404, "Not Found")
    with pytest.raises(ServerError, match="--enable-scale-out"):
        eng.generate(PROMPTS, SamplingParams(n=1))


@pytest.mark.parametrize("route", ["/inference/v1/generate", "/collective_rpc", "/reset_prefix_cache"])
def test_a_hung_server_fails_within_the_deadline(tmp_path, route):
    fakes = FakeServers(2)
    eng = engine(fakes, tmp_path, timeout_s=0.5)
    fakes.servers[fakes.urls[1]].hang.add(route)
    start = time.monotonic()
    with pytest.raises((ServerError, WeightSyncError), match=f"{fakes.urls[1]}: POST {route} got no answer within "
                                                             "rollout.server.timeout_s=0.5 s"):
        if route == "/inference/v1/generate":
            eng.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=3))
        else:
            eng.update_weights(weights(2.0), canary(2.0), version="step-1")
    assert time.monotonic() - start < 3.0


def test_a_busy_prefix_cache_is_retried(tmp_path):
    fakes = FakeServers(1)
    eng = engine(fakes, tmp_path)
    fakes.servers[fakes.urls[0]].busy_resets = 3
    eng.update_weights(weights(2.0), canary(2.0), version="step-1")
    assert fakes.servers[fakes.urls[0]].calls.count("/reset_prefix_cache") == 4


def test_a_server_that_is_not_there_is_named_at_once(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ServerError, match=rf"vLLM server http://127.0.0.1:{port}: GET /weight_info failed .*is it "
                                          "running"):
        ServerEngine(ServerConfig(urls=[f"http://127.0.0.1:{port}/"], transport="disk", timeout_s=5), Tok(),
                     weights_dir=tmp_path)
    assert time.monotonic() - start < 5


def test_config_needs_urls_and_refuses_transports_it_cannot_use():
    with pytest.raises(ConfigError, match="rollout.server.urls"):
        RolloutConfig(backend="vllm_server")
    from alignment.rollout.server import resolve_transport

    with pytest.raises(ConfigError, match="gloo is not implemented"):
        resolve_transport("gloo")
    if not torch.cuda.is_available():
        assert resolve_transport("auto") == "disk"
        with pytest.raises(ConfigError, match="nccl needs CUDA"):
            resolve_transport("nccl")


def test_vllm_serve_command(tiny_model):
    from align.cli import vllm_serve_command

    env, argv, plain = vllm_serve_command(str(tiny_model), "127.0.0.1", 8123, ["--max-model-len", "512"], cuda=False)
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    assert plain.startswith(f"VLLM_SERVER_DEV_MODE=1 VLLM_CPU_KVCACHE_SPACE=") and f"vllm serve {tiny_model} " in plain
    for flag in ["--enable-scale-out", "--logprobs-mode raw_logprobs", "--dtype float32", "--enforce-eager",
                 "--port 8123", "--max-model-len 512"]:
        assert flag in plain and flag in " ".join(argv)
    _, argv, plain = vllm_serve_command(str(tiny_model), "0.0.0.0", 8000, ["--dtype", "bfloat16"], cuda=True)
    assert "--weight-transfer-config '{\"backend\": \"nccl\"}'" in plain and "--enforce-eager" not in plain
    assert argv.count("--dtype") == 1
