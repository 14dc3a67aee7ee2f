"""The vllm_server rollout backend against a real CPU vLLM server (`align vllm-serve`, the tiny model, fp32,
eager): pushes over the disk transport verified by the canary, a server whose weights were reset caught,
a PMD run, and a killed server giving a clear error in bounded time. One server for the module (start-up
costs tens of seconds); the kill test runs last."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment.adapters import merged_state_dict
from alignment.config import ServerConfig
from alignment.logging import read_metrics
from alignment.logprobs import pack, token_logprobs
from alignment.rollout import Canary, SamplingParams, WeightSyncError
from alignment.rollout.server import ServerEngine, ServerError
from tests.support.recipes import REPO, run_align, toy_recipe

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("vllm-server") / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "align", "vllm-serve", str(tiny_model), "--port", str(port),
                             "--max-model-len", "512"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"align vllm-serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/weight_info", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail("align vllm-serve did not answer within 300 s")
    yield url, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    log.close()


@pytest.fixture(scope="module")
def setup(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True)["input_ids"]
               for q in ["What is 2+2?", "Tell me a longer story about a cat and a dog, please."]]
    return tokenizer, model, prompts


def canary(model, prompts) -> Canary:
    responses = [p[-6:] for p in prompts]
    batch = pack(prompts, responses, 0)
    lp, _ = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"], 6)
    return Canary(prompts, responses, [lp[i] for i in range(len(prompts))])


def perturbed(model, scale=0.02):
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return other


def test_pushes_are_verified_and_a_reset_server_is_caught(server, setup, tmp_path):
    url, _ = server
    tokenizer, model, prompts = setup
    engine = ServerEngine(ServerConfig(urls=[url], transport="disk", timeout_s=60), tokenizer,
                          weights_dir=tmp_path / "weights")
    assert engine.update_weights(merged_state_dict(model), canary(model, prompts), version="step-0") < 1e-4
    # The engine samples what the trainer's model gives, with its log-probs, labelled with the pushed version.
    sampling = SamplingParams(n=3, max_new_tokens=6, seed=7)
    out = engine.generate(prompts, sampling, prompt_uids=[10, 11])
    assert out.weight_versions == ["step-0"] * 6 and len({tuple(r) for r in out.response_ids[:3]}) > 1
    batch = pack(out.prompt_ids, out.response_ids, tokenizer.pad_token_id)
    lp, _ = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                           batch["response_mask"].shape[1])
    for i, r in enumerate(out.response_ids):
        assert torch.allclose(out.logprobs[i], lp[i, : len(r)], atol=1e-4)
    assert engine.generate(prompts[1:], sampling, prompt_uids=[11]).response_ids == out.response_ids[3:]
    # A trained model's push passes; a stale one (the old weights pushed) fails the canary, naming the server.
    trained = perturbed(model)
    check = canary(trained, prompts)
    with pytest.raises(WeightSyncError, match=f"on vLLM server {url}: .*after the push of step-1"):
        engine.update_weights(merged_state_dict(model), check, version="step-1")
    assert engine.update_weights(merged_state_dict(trained), check, version="step-2") < 1e-4
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["step-2"]
    # Weights changed behind the trainer's back (vLLM's weight checker zeroes them): the canary catches it.
    httpx.post(f"{url}/weight_checker", json={"action": "reset"}, timeout=60).raise_for_status()
    with pytest.raises(WeightSyncError, match=f"on vLLM server {url}"):
        engine._verify(check, None, "step-2")
    engine.update_weights(merged_state_dict(model), canary(model, prompts), version="step-3")


def test_pmd_steps_end_to_end_on_a_vllm_server(server, tiny_model, tmp_path):
    url, _ = server
    recipe = toy_recipe(tmp_path, tiny_model, rollout={
        "backend": "vllm_server", "n": 4, "max_new_tokens": 8,
        "server": {"urls": [url], "transport": "disk", "timeout_s": 120}})
    proc = run_align("train", str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2]
    for row in steps:
        assert row["sync/logprob_err"] < 1e-3
        # the trainer scores the rollouts as the server sampled them: each step's server held the last update
        assert row["rollout/logprob_diff"] < 1e-4, row
    assert httpx.get(f"{url}/weight_info", timeout=10).json()["weight_version"] == "step-2"


def test_a_killed_server_gives_a_clear_error_in_bounded_time(server, setup, tmp_path):
    url, proc = server
    tokenizer, model, prompts = setup
    engine = ServerEngine(ServerConfig(urls=[url], transport="disk", timeout_s=10), tokenizer,
                          weights_dir=tmp_path / "weights")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    start = time.monotonic()
    with pytest.raises(ServerError, match=f"vLLM server {url}: POST /inference/v1/generate failed"):
        engine.generate(prompts, SamplingParams(n=2, max_new_tokens=4))
    with pytest.raises(ServerError, match=f"vLLM server {url}: POST /pause failed"):
        engine.update_weights(merged_state_dict(model), canary(model, prompts), version="step-9")
    assert time.monotonic() - start < 10
