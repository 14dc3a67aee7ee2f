"""The `vllm_server` rollout backend: stock vLLM servers running apart from training, reached over HTTP.

Start each server with `align vllm-serve MODEL --port P` (vLLM's OpenAI server in dev mode with the
scale-out endpoint) and list them in `rollout.server.urls`.

- Generation: vLLM's token-in/token-out endpoint `POST /inference/v1/generate`, one request per
  (prompt, sample) seeded by `sample_seed`, so a sample does not depend on which server generates it:
  prompts are dealt across servers by their uid, and a run's samples do not depend on how many servers
  there are. Log-probs of sampled tokens are the engine's (`--logprobs-mode raw_logprobs`, as the
  in-process vLLM engine asks for them); every response's tokens carry the weight version that
  produced them, and it must be the version this engine pushed last (`Rollouts.weight_versions`), or with
  `rollout.max_staleness: k` one of the last k+1 pushed (`staleness` gives each sample's age in pushes).
- Overlap (`rollout.max_staleness` >= 1, driven by the trainer: alignment/online.py): generation requests
  of later steps run while the trainer trains and pushes. A push never mixes versions inside one sample:
  `/pause?mode=wait` lets every request the server already holds finish on the old weights and queues the
  ones that arrive until `/resume`, which then run on the new weights. So one batch may hold samples of two
  versions, each labelled by its tokens; were a sample's tokens ever to span several versions (a server
  paused with mode=keep by someone else), its version is the oldest of them.
- Weight push, after every optimizer step, on global rank 0, to every server at once, through vLLM's
  dev-mode routes: `/pause?mode=wait`, the transfer, `/update_weight_version` (or the transfer engine's
  `/finish_weight_update {weight_version}`), `/reset_prefix_cache` (a stale prefix cache otherwise keeps
  old keys and values), `/resume`. Transports (`rollout.server.transport`):
  - `disk`: rank 0 writes safetensors to `rollout.server.weights_dir` (a folder every server can read)
    and each server reloads them in place (`/collective_rpc` -> the worker's
    `reload_weights(weights_path=...)`); works on any dev-mode server, CPU or GPU.
  - `gloo`: our transfer engine (alignment/rollout/gloo.py, registered in vLLM through its plugin entry
    point), servers started with `--weight-transfer-config '{"backend": "gloo"}'` (`align vllm-serve` on CPU):
    vLLM's protocol, `/init_weight_transfer_engine` once per server (one gloo group: the trainer's rank 0
    and the server's workers), then per push `/start_weight_update`, `/update_weights` while rank 0
    broadcasts, `/finish_weight_update`.
  - `nccl`: the same protocol with vLLM's own NCCL engine (`NCCLTrainerWeightTransferEngine`) on CUDA,
    servers started with `--weight-transfer-config '{"backend": "nccl"}'`. Shares the code of the gloo path;
    not run on the CPU hosts this was developed on.
  - `auto`: nccl on CUDA, else gloo.
  Under ZeRO-3 every rank gathers the parameters in lockstep (alignment/online.py `sync_weights`) and only
  global rank 0 sends; the others wait for the outcome.
- Verification, as for the colocated engines: after every push, on every server, the version reported by
  `/weight_info` must be the pushed one, and the canary's log-probs (scored through the same endpoint as
  prompt log-probs) must match the trainer's within `rollout.sync_tolerance`; a failure is a
  `WeightSyncError` naming the server.
- Every call has a deadline (`rollout.server.timeout_s`): a server that is down, dies or hangs gives an
  error naming it within that time, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from alignment.config import ConfigError, ServerConfig
from alignment.rollout import Canary, RolloutEngine, Rollouts, SamplingParams, WeightSyncError, sample_seed

log = logging.getLogger("alignment")

GENERATE = "/inference/v1/generate"


class ServerError(RuntimeError):
    """A vLLM server did not answer, answered an error, or answered out of protocol; names the server."""


def resolve_transport(transport: str) -> str:
    if transport == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if transport == "nccl" and not torch.cuda.is_available():
        raise ConfigError("rollout.server.transport=nccl needs CUDA on the trainer; use gloo or disk on this host")
    return transport


def _error_text(response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body))
        if isinstance(err, dict):
            err = err.get("message", err)
        return str(err)[:500]
    return str(body)[:500]


class ServerEngine(RolloutEngine):
    default_tolerance = 1e-3  # fp32 servers (CPU); pass rollout.sync_tolerance for bf16 ones

    def __init__(self, cfg: ServerConfig, tokenizer, weights_dir: str | Path | None = None, transport=None,
                 max_staleness: int = 0):
        """`transport`: an httpx transport for every call (tests pass an in-process fake server);
        `max_staleness`: how many pushes old a sample's weights may be (rollout.max_staleness)."""
        try:
            import httpx  # noqa: F401
        except ImportError as err:  # pragma: no cover - a dependency
            raise ConfigError("rollout.backend=vllm_server needs httpx") from err
        if not cfg.urls:
            raise ConfigError("rollout.server.urls: give at least one server URL (http://host:port)")
        self.cfg = cfg
        self.http_transport = transport
        self.urls = [url.rstrip("/") for url in cfg.urls]
        self.timeout = float(cfg.timeout_s)
        self.transport = resolve_transport(cfg.transport)
        self.weights_dir = Path(cfg.weights_dir or weights_dir or "server_weights").expanduser().resolve()
        self.eos_ids = sorted({tokenizer.eos_token_id} - {None})
        self.version: str | None = None  # the version this engine pushed last (None: none yet)
        self.max_staleness = int(max_staleness)
        self.pushed: list[str] = []  # the versions pushed, oldest first (the last max_staleness + 1 kept)
        self.pushes = 0
        self._groups: dict[int, object] = {}  # server -> its trainer-side transfer engine (gloo, nccl)
        self._slots: dict[int, list[asyncio.Semaphore]] = {}  # per event loop (a gloo or nccl push runs two at once)
        # Reachable, in dev mode (the weight routes exist), each at some version.
        self.server_versions = self._run(self._all(lambda c, i: self._call(c, i, "GET", "/weight_info")))
        log.info("vllm_server: %d server(s) %s, weight transport %s", len(self.urls), ", ".join(self.urls),
                 self.transport)

    # ---- HTTP with deadlines --------------------------------------------------------------------
    def _run(self, coroutine_fn):
        """Run one batch of calls on a fresh client (a new event loop per batch: the trainer is synchronous)."""
        import httpx

        async def main():
            limits = httpx.Limits(max_connections=self.cfg.max_concurrency * len(self.urls),
                                  max_keepalive_connections=self.cfg.max_concurrency * len(self.urls))
            loop = id(asyncio.get_running_loop())
            self._slots[loop] = [asyncio.Semaphore(self.cfg.max_concurrency) for _ in self.urls]
            try:
                async with httpx.AsyncClient(timeout=self.timeout, limits=limits, transport=self.http_transport) as client:
                    return await coroutine_fn(client)
            finally:
                self._slots.pop(loop, None)

        return asyncio.run(main())

    def _all(self, fn, servers=None):
        """`fn(client, i)` on every server (or `servers`) at once."""
        servers = range(len(self.urls)) if servers is None else servers

        async def run(client):  # every server's call runs to its end (a push never stops half-way on one)
            results = await asyncio.gather(*(fn(client, i) for i in servers), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            return results

        return run

    async def _call(self, client, i: int, method: str, path: str, *, json=None, params=None):
        """One call to server `i`, with the deadline; the parsed JSON answer (None for an empty body)."""
        import httpx

        url = self.urls[i]
        async with self._slots[id(asyncio.get_running_loop())][i]:
            try:
                response = await asyncio.wait_for(client.request(method, url + path, json=json, params=params),
                                                  self.timeout)
            except (asyncio.TimeoutError, httpx.TimeoutException):
                raise ServerError(f"vLLM server {url}: {method} {path} got no answer within rollout.server.timeout_s="
                                  f"{self.timeout:g} s (the server hangs, died or is overloaded)") from None
            except httpx.TransportError as err:
                raise ServerError(f"vLLM server {url}: {method} {path} failed ({type(err).__name__}: {err}); is it "
                                  f"running? (align vllm-serve MODEL --port P)") from None
        if response.status_code == 404 and path in ("/weight_info", "/pause", "/collective_rpc"):
            raise ServerError(f"vLLM server {url}: {path} not found: start the server in dev mode "
                              f"(VLLM_SERVER_DEV_MODE=1; `align vllm-serve` does)")
        if response.status_code == 404 and path == GENERATE:
            raise ServerError(f"vLLM server {url}: {GENERATE} not found: start the server with --enable-scale-out "
                              f"(`align vllm-serve` does)")
        if response.status_code >= 400:
            raise ServerError(f"vLLM server {url}: {method} {path} answered HTTP {response.status_code}: "
                              f"{_error_text(response)}")
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise ServerError(f"vLLM server {url}: {method} {path} answered something other than JSON: "
                              f"{response.text[:200]!r}") from None

    # ---- generation -----------------------------------------------------------------------------
    def server_of(self, uid: int) -> int:
        """Prompts are dealt by uid: every sample is seeded by (seed, uid, k), so any dealing gives the same
        samples; dealing by uid keeps each prompt's samples on one server (one prefix-cache entry)."""
        return uid % len(self.urls)

    async def _generate_one(self, client, i: int, prompt: list[int], params: dict) -> dict:
        answer = await self._call(client, i, "POST", GENERATE, json={"token_ids": list(prompt),
                                                                      "sampling_params": params})
        try:
            return answer["choices"][0] | {"prompt_logprobs": answer.get("prompt_logprobs")}
        except (TypeError, KeyError, IndexError):
            raise ServerError(f"vLLM server {self.urls[i]}: {GENERATE} answered without choices: "
                              f"{str(answer)[:200]}") from None

    @torch.no_grad()
    def generate(self, prompts, sampling: SamplingParams, prompt_uids=None) -> Rollouts:
        uids = prompt_uids if prompt_uids is not None else list(range(len(prompts)))
        jobs = []  # (prompt index, server, params)
        for p, prompt in enumerate(prompts):
            for k in range(sampling.n):
                jobs.append((p, self.server_of(uids[p]), {
                    "n": 1, "max_tokens": sampling.max_new_tokens, "temperature": max(sampling.temperature, 0.0),
                    "top_p": sampling.top_p, "seed": sample_seed(sampling.seed, uids[p], k), "logprobs": 0,
                    "stop_token_ids": self.eos_ids, "detokenize": False}))

        async def run(client):
            return await asyncio.gather(*(self._generate_one(client, i, prompts[p], params) for p, i, params in jobs))

        answers = self._run(run)
        out = Rollouts()
        for (p, i, _), choice in zip(jobs, answers):
            tokens = list(choice.get("token_ids") or [])
            content = (choice.get("logprobs") or {}).get("content") or []
            if len(content) != len(tokens) or any(c["token_id"] != t for c, t in zip(content, tokens)):
                raise ServerError(f"vLLM server {self.urls[i]}: the log-probs do not match the sampled tokens")
            out.prompt_ids.append(list(prompts[p]))
            out.response_ids.append(tokens)
            out.logprobs.append(torch.tensor([c["logprob"] for c in content], dtype=torch.float32))
            out.finish_reasons.append("stop" if choice.get("finish_reason") == "stop" else "length")
            out.prompt_index.append(p)
            out.weight_versions.append(self._check_versions(i, choice.get("weight_versions"), len(tokens)))
        return out

    def _check_versions(self, i: int, spans, length: int) -> str | None:
        """The weight version of a sample's tokens: every span must be the version pushed last, or with
        max_staleness k one of the last k+1 pushed (this runs in the background thread of an overlapped
        rollout, so a push may have landed since the request); the oldest of them is the sample's."""
        versions = [span["version"] for span in spans or []]
        if self.version is not None:
            if length and not versions:
                raise WeightSyncError(f"vLLM server {self.urls[i]}: its tokens carry no weight version (expected "
                                      f"{self.version})")
            recent = self.pushed[-(self.max_staleness + 1):] or [self.version]
            stale = sorted(set(versions) - set(recent))
            if stale and not self.max_staleness:
                raise WeightSyncError(f"vLLM server {self.urls[i]}: tokens generated with weight version "
                                      f"{', '.join(stale)}, expected {self.version} (the last push)")
            if stale:
                raise WeightSyncError(f"vLLM server {self.urls[i]}: tokens generated with weight version "
                                      f"{', '.join(stale)}, expected one of the last {len(recent)} pushes "
                                      f"({', '.join(recent)}; rollout.max_staleness={self.max_staleness})")
            if versions:
                return min(versions, key=recent.index)
        return versions[0] if versions else self.version

    def staleness(self, versions: list[str | None]) -> list[int]:
        """Per sample, how many pushes its weights are behind the last push (the weights the trainer is about
        to update); a WeightSyncError beyond rollout.max_staleness or for a version this engine never pushed
        (None, before any push: 0)."""
        age = {version: len(self.pushed) - 1 - n for n, version in enumerate(self.pushed)}
        ages = []
        for version in versions:
            if version is None and not self.pushed:
                ages.append(0)
                continue
            if version not in age:
                raise WeightSyncError(f"a rollout sample carries weight version {version!r}, which is not among the "
                                      f"last {len(self.pushed)} pushes ({', '.join(self.pushed)})")
            if age[version] > self.max_staleness:
                raise WeightSyncError(f"a rollout sample was generated with weight version {version}, {age[version]} "
                                      f"pushes behind the trainer's {self.version}: beyond rollout.max_staleness="
                                      f"{self.max_staleness}")
            ages.append(age[version])
        return ages

    # ---- scoring --------------------------------------------------------------------------------
    async def _score(self, client, i: int, prompt: list[int], response: list[int]) -> torch.Tensor:
        choice = await self._generate_one(client, i, list(prompt) + list(response), {
            "n": 1, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0, "detokenize": False})
        rows = choice.get("prompt_logprobs")
        try:
            return torch.tensor([rows[len(prompt) + t][str(tok)]["logprob"] for t, tok in enumerate(response)],
                                dtype=torch.float32)
        except (TypeError, KeyError, IndexError):
            raise ServerError(f"vLLM server {self.urls[i]}: no prompt log-probs in its answer") from None

    @torch.no_grad()
    def logprobs(self, prompt_ids, response_ids):
        async def run(client):
            return await asyncio.gather(*(self._score(client, n % len(self.urls), p, r)
                                          for n, (p, r) in enumerate(zip(prompt_ids, response_ids))))

        return self._run(run)

    def logprobs_on(self, i: int, prompt_ids, response_ids) -> list[torch.Tensor]:
        """Scores on one server (the canary check runs on each)."""
        async def run(client):
            return await asyncio.gather(*(self._score(client, i, p, r) for p, r in zip(prompt_ids, response_ids)))

        return self._run(run)

    # ---- weight push ----------------------------------------------------------------------------
    def update_weights(self, named_tensors, canary: Canary | None = None, tolerance: float | None = None,
                       version: str | None = None) -> float:
        """Push to every server (global rank 0) and verify each; the other ranks wait for the outcome."""
        self.pushes += 1
        version = version or f"push-{self.pushes}"
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        outcome: list = [None]
        if not distributed or dist.get_rank() == 0:
            try:
                outcome[0] = ("ok", self._push_and_verify(named_tensors, canary, tolerance, version))
            except WeightSyncError as err:
                outcome[0] = ("sync", str(err))
            except (ServerError, ConfigError, OSError) as err:
                outcome[0] = ("server", str(err))
            if not distributed and outcome[0][0] != "ok":
                raise (WeightSyncError if outcome[0][0] == "sync" else ServerError)(outcome[0][1])
        if distributed:
            dist.broadcast_object_list(outcome, src=0)
        kind, value = outcome[0]
        if kind != "ok":
            raise (WeightSyncError if kind == "sync" else ServerError)(value)
        self.version = version
        # kept one beyond max_staleness: `staleness` then names a too-old version by its age
        self.pushed = [*self.pushed, version][-(self.max_staleness + 2):]
        return value

    def _push_and_verify(self, named_tensors, canary, tolerance, version: str) -> float:
        start = time.perf_counter()
        if self.transport == "disk":
            folder = self._write(named_tensors, version)
            self._run(self._all(lambda c, i: self._push_disk(c, i, folder, version)))
            self._prune(keep=folder)
        else:
            self._push_engine(named_tensors, version)
        pushed = time.perf_counter()
        err = self._verify(canary, tolerance, version)
        log.debug("vllm_server: pushed %s to %d server(s) in %.2f s, verified in %.2f s", version, len(self.urls),
                  pushed - start, time.perf_counter() - pushed)
        return err

    def _verify(self, canary: Canary | None, tolerance: float | None, version: str) -> float:
        infos = self._run(self._all(lambda c, i: self._call(c, i, "GET", "/weight_info")))
        for url, info in zip(self.urls, infos):
            if (info or {}).get("weight_version") != version:
                raise WeightSyncError(f"vLLM server {url}: reports weight version "
                                      f"{(info or {}).get('weight_version')!r} after the push of {version}")
        if canary is None:
            return 0.0
        tolerance = self.default_tolerance if tolerance is None else tolerance

        async def run(client):
            return await asyncio.gather(*(asyncio.gather(*(self._score(client, i, p, r) for p, r in
                                                           zip(canary.prompt_ids, canary.response_ids)))
                                          for i in range(len(self.urls))))

        worst = 0.0
        for url, engine_lp in zip(self.urls, self._run(run)):
            err = max(float((a - b.detach().to(a)).abs().max()) for a, b in zip(engine_lp, canary.trainer_logprobs))
            if not err <= tolerance:
                raise WeightSyncError(
                    f"weight sync check failed on vLLM server {url}: engine and trainer log-probs on the canary batch "
                    f"differ by {err:.3g} > tolerance {tolerance:g} after the push of {version} (stale or partial "
                    f"weights on that server)")
            worst = max(worst, err)
        return worst

    def _write(self, named_tensors, version: str) -> Path:
        """Safetensors in checkpoint format under weights_dir/<version>, written under a temporary name."""
        from safetensors.torch import save_file

        self.weights_dir.mkdir(parents=True, exist_ok=True)
        final = self.weights_dir / version
        tmp = self.weights_dir / f".{version}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        seen: set[int] = set()
        tensors = {}
        for name, tensor in named_tensors.items():
            tensor = tensor.detach().to("cpu").contiguous()
            if tensor.untyped_storage().data_ptr() in seen:  # tied weights share storage: safetensors refuses
                tensor = tensor.clone()
            seen.add(tensor.untyped_storage().data_ptr())
            tensors[name] = tensor
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final

    def _prune(self, keep: Path) -> None:
        """Older pushes' folders (the servers now read `keep`)."""
        for folder in self.weights_dir.iterdir():
            if folder != keep and folder.is_dir() and (folder.name.startswith(("step-", "push-"))):
                shutil.rmtree(folder, ignore_errors=True)

    async def _push_disk(self, client, i: int, folder: Path, version: str) -> None:
        await self._call(client, i, "POST", "/pause", params={"mode": "wait"})
        try:
            await self._call(client, i, "POST", "/collective_rpc",
                             json={"method": "reload_weights", "kwargs": {"weights_path": str(folder)},
                                   "timeout": self.timeout})
            await self._call(client, i, "POST", "/update_weight_version", json={"new_version": version})
            await self._reset_prefix_cache(client, i)
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one to report
                await self._call(client, i, "POST", "/resume")
            raise
        await self._call(client, i, "POST", "/resume")

    async def _reset_prefix_cache(self, client, i: int) -> None:
        """Fails while blocks are held (e.g. by requests still finishing): retried within the deadline."""
        deadline = time.monotonic() + self.timeout
        while True:
            answer = await self._call(client, i, "POST", "/reset_prefix_cache")
            if (answer or {}).get("success", True):
                return
            if time.monotonic() > deadline:
                raise ServerError(f"vLLM server {self.urls[i]}: the prefix cache could not be reset within "
                                  f"{self.timeout:g} s (blocks still held)")
            await asyncio.sleep(0.05)

    # ---- gloo and nccl: vLLM's weight-transfer protocol ----------------------------------------------
    def _push_engine(self, named_tensors, version: str) -> None:
        """One trainer-side engine per server (its group opened at the first push): pause, start, update (the
        broadcast), finish, then the version, the prefix-cache reset and resume, each control call under the
        deadline and every collective under the group's timeout (the same deadline)."""
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        from align.vllm_plugin import register

        register()
        source = _DictSource(named_tensors, cuda=self.transport == "nccl")
        for i in range(len(self.urls)):
            client = _SyncClient(self, i)
            client.post("/pause", params={"mode": "wait"})
            try:
                try:
                    if i not in self._groups:
                        self._groups[i] = WeightTransferTrainerFactory.trainer_init(self._init_info(i), client=client,
                                                                                    source=source)
                    self._groups[i].source = source
                    self._groups[i].send_weights()
                except ServerError:
                    self._close_group(i)  # a half-done transfer leaves the group unusable: the next push opens anew
                    raise
                except RuntimeError as err:  # the collective failed: the peer died, hung past the timeout, or refused
                    self._close_group(i)
                    raise ServerError(f"vLLM server {self.urls[i]}: the {self.transport} weight transfer failed "
                                      f"({type(err).__name__}: {str(err)[:300]})") from None
                client.post("/update_weight_version", json={"new_version": version})
                self._run(lambda c, i=i: self._reset_prefix_cache(c, i))
            finally:
                with contextlib.suppress(ServerError):
                    client.post("/resume")

    def _init_info(self, i: int):
        """The trainer's side of server i's group: rank 0, the server's workers after it."""
        from alignment.backend import _free_port

        world = self._run(lambda c: self._call(c, i, "GET", "/get_world_size", params={"include_dp": "true"}))
        port = self.cfg.group_port + i if self.cfg.group_port else _free_port()
        common = dict(master_address=self.cfg.group_host, master_port=port, world_size=1 + world["world_size"], rank=0)
        if self.transport == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

            return NCCLTrainerInitInfo(**common)
        from alignment.rollout.gloo import GlooTrainerInitInfo

        return GlooTrainerInitInfo(**common, timeout_s=self.timeout)

    def _close_group(self, i: int) -> None:
        engine = self._groups.pop(i, None)
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.shutdown()


class _SyncClient:
    """vLLM's `VLLMWeightSyncClient` protocol over our deadline'd calls to one server."""

    def __init__(self, engine: ServerEngine, i: int):
        self.engine, self.i = engine, i

    def post(self, path: str, json=None, params=None):
        return self.engine._run(lambda c: self.engine._call(c, self.i, "POST", path, json=json, params=params))

    def init_weight_transfer_engine(self, init_info):
        self.post("/init_weight_transfer_engine", {"init_info": init_info})

    def start_weight_update(self):
        self.post("/start_weight_update")

    def update_weights(self, update_info):
        self.post("/update_weights", {"update_info": update_info})

    def finish_weight_update(self, weight_version=None):
        self.post("/finish_weight_update", None if weight_version is None else {"weight_version": weight_version})


def _DictSource(named_tensors, cuda: bool):
    """A vLLM `WeightSource` over the trainer's merged state dict (rank 0 holds every tensor); on the
    trainer's GPU for nccl, where they are for gloo."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class DictSource(WeightSource):
        def metadata(self):
            return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in named_tensors.items()]

        def __iter__(self):
            device = torch.device("cuda", torch.cuda.current_device()) if cuda else None
            for name, tensor in named_tensors.items():
                yield name, tensor.detach() if device is None else tensor.detach().to(device)

    return DictSource()


def launch_local_server(model: str, log_path: Path, max_model_len: int = 1024, timeout_s: float = 600,
                        port: int | None = None, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """`align vllm-serve MODEL [extra vLLM args]` on `port` (a free local one by default), returned once
    /weight_info answers (its output in `log_path`): for tests and benchmarks; production servers are
    started by the user."""
    import httpx

    from alignment.backend import _free_port

    port = port or _free_port()
    log_file = open(log_path, "a+")
    proc = subprocess.Popen([sys.executable, "-m", "align", "vllm-serve", model, "--port", str(port),
                             "--max-model-len", str(max_model_len), *extra], cwd=Path(__file__).resolve().parents[2],
                            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log_file.seek(0)
            raise RuntimeError(f"align vllm-serve exited with {proc.returncode}:\n{log_file.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/weight_info", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(1)
    stop_local_server(proc)
    raise RuntimeError(f"align vllm-serve did not answer within {timeout_s:g} s (log: {log_path})")


def stop_local_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (vLLM's engine processes too), SIGKILL after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
