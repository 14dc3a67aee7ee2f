"""The vllm_server rollout backend against an in-process fake of vLLM's HTTP protocol (no vLLM process):
dealing and seeds, weight versions on tokens, the push protocol, and every failure naming its server
within the deadline. The real servers are in tests/test_rollout_server_vllm.py (slow tier)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from safetensors.torch import load_file

from alignment.backend import _free_port
from alignment.config import BaseConfig, ConfigError, RolloutConfig, ServerConfig, TrainConfig
from alignment.data import Example
from alignment.online import OnlineTrainer, RolloutBatch
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
        self.events: list[tuple[str, dict]] = []
        self.requests: list[dict] = []
        self.fail: dict[str, tuple[int, str]] = {}  # path -> (status, message)
        self.hang: set[str] = set()
        self.token_version: str | None = None  # label tokens with this instead of the current version
        self.report_version: str | None = None  # /weight_info answers this instead
        self.ignore_reload = False
        self.busy_resets = 0  # /reset_prefix_cache fails this many times first
        self.paused = False
        self.delay = 0.0  # seconds each generation takes
        self.inflight = 0  # generations admitted and not finished (/pause?mode=wait waits for them)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.calls.append(path)
        if path in self.hang:
            await asyncio.sleep(60)
        if path in self.fail:
            status, message = self.fail[path]
            return httpx.Response(status, json={"error": {"message": message, "code": status}})
        body = json.loads(request.content) if request.content else {}
        self.events.append((path, body))  # in arrival order, whichever thread's client sent it
        if path == "/weight_info":
            return httpx.Response(200, json={"weight_version": self.report_version or self.version})
        if path == "/pause":  # vLLM's mode=wait: admitted requests finish, new ones wait for /resume
            assert request.url.params["mode"] == "wait"
            self.paused = True
            while self.inflight:
                await asyncio.sleep(0.005)
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
            self.inflight += 1  # admitted, then held back while paused (the engine may run in another thread)
            while self.paused:
                self.inflight -= 1
                await asyncio.sleep(0.005)
                self.inflight += 1
            try:
                version = self.version
                await asyncio.sleep(self.delay)
            finally:
                self.inflight -= 1
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
                "weight_versions": [{"version": self.token_version or version, "start": 0,
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


def engine(fakes: FakeServers, tmp_path, timeout_s: float = 5.0, max_staleness: int = 0) -> ServerEngine:
    return ServerEngine(ServerConfig(urls=fakes.urls, transport="disk", timeout_s=timeout_s), Tok(),
                        weights_dir=tmp_path / "weights", transport=fakes, max_staleness=max_staleness)


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
    port = _free_port()  # a port nobody listens on
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

    assert resolve_transport("gloo") == "gloo" and resolve_transport("disk") == "disk"
    if not torch.cuda.is_available():
        assert resolve_transport("auto") == "gloo"
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
    assert "--weight-transfer-config '{\"backend\": \"gloo\"}'" in plain and '{"backend": "gloo"}' in argv
    _, argv, plain = vllm_serve_command(str(tiny_model), "0.0.0.0", 8000, ["--dtype", "bfloat16"], cuda=True)
    assert "--weight-transfer-config '{\"backend\": \"nccl\"}'" in plain and "--enforce-eager" not in plain
    assert argv.count("--dtype") == 1


# ---- rollout.max_staleness: generation overlapped with training -------------------------------------

def overlap_trainer(tmp_path, fakes: FakeServers, max_staleness: int, steps: int = 4) -> OnlineTrainer:
    """OnlineTrainer's rollout and its checks over the fake servers, without models: prompts p0..p7 encoded
    as [1, 3 + i], batches not packed."""
    cfg = BaseConfig(output_dir=str(tmp_path / f"run-{max_staleness}"), seed=5,
                     rollout=RolloutConfig(backend="vllm_server", n=2, max_new_tokens=3, max_staleness=max_staleness,
                                           server=ServerConfig(urls=fakes.urls, transport="disk", timeout_s=5)),
                     train=TrainConfig(max_steps=steps, batch_size=2, mini_batches=1, old_logprobs="rollout",
                                       report_to=[]))
    trainer = OnlineTrainer(cfg)
    trainer.rank, trainer.world, trainer.engine = 0, 1, engine(fakes, tmp_path / str(max_staleness),
                                                                max_staleness=max_staleness)
    trainer.train_set = [Example(prompt=f"p{i}") for i in range(8)]
    trainer.encode = lambda prompt: [1, 3 + int(prompt[1:])]
    trainer.make_batch = lambda samples, rollouts: RolloutBatch(samples, rollouts, [], {}, torch.zeros(1))
    return trainer


def run_steps(trainer: OnlineTrainer, train_s: float = 0.3) -> list[RolloutBatch]:
    """The trainer's loop with the update faked: rollout, "train", push the next version (as sync_weights)."""
    trainer.engine.update_weights(weights(1.0), canary(1.0), version="step-0")  # start()
    batches = []
    for step in range(trainer.cfg.train.max_steps):
        batches.append(trainer.rollout(step))
        time.sleep(train_s)
        scale = 1.0 + trainer.weights_step
        trainer.engine.update_weights(weights(scale), canary(scale), version=f"step-{trainer.weights_step}")
    return batches


def test_max_staleness_1_requests_the_next_step_while_this_one_trains(tmp_path):
    fakes = FakeServers(1)
    server = fakes.servers[fakes.urls[0]]
    server.delay = 0.2  # each generation; the trainer's "training" takes 0.3 s
    trainer = overlap_trainer(tmp_path, fakes, max_staleness=1)
    batches = run_steps(trainer)
    # The same prompts and seeds as the synchronous run: a step's samples are a function of the step.
    sync = run_steps(overlap_trainer(tmp_path, FakeServers(1), max_staleness=0))
    assert [b.rollouts.response_ids for b in batches] == [b.rollouts.response_ids for b in sync]
    assert [[e.prompt for e in b.samples] for b in batches] == [[e.prompt for e in b.samples] for b in sync]
    # Overlap: step t+1's requests reach the server before the push that ends step t (version step-(t+1)).
    seeds = {step: {sample_seed(trainer.sampling(step).seed, uid, k) for uid in range(2) for k in range(2)}
             for step in range(4)}
    order = [(path, body.get("new_version") or body.get("sampling_params", {}).get("seed"))
             for path, body in server.events if path in ("/inference/v1/generate", "/update_weight_version")]
    for step in range(3):
        pushed = order.index(("/update_weight_version", f"step-{step + 1}"))
        requested = [n for n, (path, seed) in enumerate(order) if seed in seeds[step + 1]]
        assert len(requested) == 4 and max(requested) < pushed, (step, order)
    # Each later step's batch was generated on the weights before the last update: staleness 1, read from the
    # versions on its tokens; the first (nothing requested ahead) and every synchronous step: 0.
    assert [b.rollouts.weight_versions for b in batches] == [["step-0"] * 4] + [[f"step-{t}"] * 4 for t in range(3)]
    assert [(b.stats["rollout/staleness"], b.stats["rollout/staleness_max"]) for b in batches] == \
        [(0.0, 0.0)] + [(1.0, 1.0)] * 3
    assert [b.stats["rollout/staleness_max"] for b in sync] == [0.0] * 4
    assert not trainer.ahead  # nothing requested past the last step


def test_staleness_is_read_from_token_versions_and_refused_beyond_k(tmp_path):
    fakes = FakeServers(2)
    eng = engine(fakes, tmp_path, max_staleness=1)
    for n in range(3):
        eng.update_weights(weights(2.0 + n), canary(2.0 + n), version=f"step-{n}")
    assert eng.staleness(["step-2", "step-1", "step-2"]) == [0, 1, 0]
    with pytest.raises(WeightSyncError, match="weight version step-0, 2 pushes behind the trainer's step-2: beyond "
                                              "rollout.max_staleness=1"):
        eng.staleness(["step-2", "step-0"])
    with pytest.raises(WeightSyncError, match="'default', which is not among the last 3 pushes"):
        eng.staleness(["default"])
    # on the tokens: one version behind passes, two behind is an error naming the server
    fakes.servers[fakes.urls[1]].token_version = "step-1"
    assert set(eng.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=2)).weight_versions) == {"step-1", "step-2"}
    fakes.servers[fakes.urls[1]].token_version = "step-0"
    with pytest.raises(WeightSyncError, match=f"{fakes.urls[1]}: tokens generated with weight version step-0, "
                                              r"expected one of the last 2 pushes \(step-1, step-2; "
                                              "rollout.max_staleness=1"):
        eng.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=2))


def test_max_staleness_needs_the_server_backend_and_the_engines_old_logprobs(tmp_path):
    with pytest.raises(ConfigError, match="rollout.max_staleness=1: .* needs rollout.backend=vllm_server .*the hf "
                                          "engine"):
        RolloutConfig(backend="hf", max_staleness=1)
    with pytest.raises(ConfigError, match="the vllm engine"):
        RolloutConfig(backend="vllm", max_staleness=2)
    cfg = BaseConfig(output_dir=str(tmp_path / "run"), train=TrainConfig(report_to=[]), rollout=RolloutConfig(
        backend="vllm_server", max_staleness=1, server=ServerConfig(urls=["http://127.0.0.1:9"])))
    with pytest.raises(ConfigError, match="rollout.max_staleness=1 needs train.old_logprobs=rollout"):
        OnlineTrainer(cfg)


def _reduce_on_rank(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    from alignment.backend import Backend

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        values = {"rollout/staleness": [0.0, 1.0][rank], "rollout/staleness_max": [0.0, 1.0][rank], "loss": 2.0 + rank}
        out.put((rank, Backend.mean(SimpleNamespace(world_size=2), values)))
    finally:
        dist.destroy_process_group()


def test_staleness_max_is_the_largest_over_ranks_and_the_rest_their_mean():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_reduce_on_rank, args=(rank, port, out)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(30)
    for rank in (0, 1):
        assert results[rank] == {"rollout/staleness": 0.5, "rollout/staleness_max": 1.0, "loss": 2.5}
