"""The gloo weight-transfer engine pair (alignment/rollout/gloo.py) in one process: the trainer's side in the
test's thread, a server worker's side behind a client that calls it as vLLM's routes would. The real server
path (vLLM loading the engine through the plugin entry point) is in tests/test_rollout_server_vllm.py."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from alignment.backend import _free_port
from alignment.rollout.gloo import (GlooTrainerInitInfo, GlooTrainerWeightTransferEngine, GlooWeightTransferEngine,
                                    chunks)
from alignment.rollout.server import _DictSource


class Receiver(torch.nn.Module):
    """Stands in for vLLM's model: records what `load_weights` gets."""

    def __init__(self):
        super().__init__()
        self.loaded: dict[str, torch.Tensor] = {}

    def load_weights(self, weights):
        for name, tensor in weights:
            self.loaded[name] = tensor.clone()


class Client:
    """vLLM's weight-sync client protocol, routed straight to one worker engine (no HTTP, no layerwise reload)."""

    def __init__(self, worker: GlooWeightTransferEngine, refuse_updates: bool = False, refuse_init: bool = False):
        self.worker, self.refuse, self.refuse_init, self.calls = worker, refuse_updates, refuse_init, []

    def init_weight_transfer_engine(self, init_info):
        self.calls.append("init")
        if self.refuse_init:
            raise RuntimeError("HTTP 500: weight transfer is not configured (start the server with the gloo backend)")
        self.worker.init_transfer_engine(self.worker.parse_init_info(init_info))

    def start_weight_update(self):
        self.calls.append("start")

    def update_weights(self, update_info):
        self.calls.append("update")
        if self.refuse:
            raise RuntimeError("HTTP 500 from the server: no room for the update")
        self.worker.update_weights(update_info)

    def finish_weight_update(self, weight_version=None):
        self.calls.append("finish")


def pair(chunk_bytes: int, timeout_s: float = 20.0, refuse_updates: bool = False, refuse_init: bool = False):
    parallel = SimpleNamespace(data_parallel_index=0, world_size=1, rank=0)
    config = SimpleNamespace(parallel_config=parallel, model_config=None)
    worker = GlooWeightTransferEngine(SimpleNamespace(backend="gloo"), config, torch.device("cpu"), Receiver())
    client = Client(worker, refuse_updates, refuse_init)
    info = GlooTrainerInitInfo("127.0.0.1", _free_port(), world_size=2, rank=0, timeout_s=timeout_s,
                               chunk_bytes=chunk_bytes)
    weights = {"embed": torch.randn(50, 8), "norm": torch.ones(8, dtype=torch.bfloat16), "head": torch.randn(8, 50),
               "layers.0.w": torch.randn(3, 4).t()}  # a non-contiguous view travels as its values
    trainer = GlooTrainerWeightTransferEngine.trainer_init(info, client=client, source=_DictSource(weights, cuda=False))
    return trainer, worker, client, weights


def test_chunks_group_consecutive_tensors_of_one_dtype_up_to_the_budget():
    f32, bf16 = torch.float32, torch.bfloat16
    # 400 B, 400 B, 16 B (bf16), 1600 B alone (over the budget), 48 B
    assert chunks([f32, f32, bf16, f32, f32], [[100], [10, 10], [8], [400], [12]], 1000) == [[0, 1], [2], [3], [4]]


@pytest.mark.parametrize("chunk_bytes", [256, 64 << 20])
def test_the_worker_receives_every_tensor_exactly_in_vllms_protocol_order(chunk_bytes):
    trainer, worker, client, weights = pair(chunk_bytes)
    try:
        for scale in (1.0, 2.0):  # the group stays open across pushes
            sent = {name: t * scale for name, t in weights.items()}
            trainer.source = _DictSource(sent, cuda=False)
            trainer.send_weights()
            assert sorted(worker.model.loaded) == sorted(sent)
            for name, tensor in sent.items():
                assert worker.model.loaded[name].dtype == tensor.dtype and torch.equal(worker.model.loaded[name], tensor)
        assert client.calls == ["init"] + ["start", "update", "finish"] * 2
    finally:
        trainer.shutdown()
        worker.shutdown()


def test_a_server_that_refuses_the_update_fails_the_push_with_its_error_within_the_deadline():
    trainer, worker, client, _ = pair(chunk_bytes=256, timeout_s=3.0, refuse_updates=True)
    try:
        with ThreadPoolExecutor(1) as pool:  # bounded: a hang would fail the test rather than CI
            push = pool.submit(trainer.send_weights)
            with pytest.raises(RuntimeError, match="no room for the update"):
                push.result(timeout=30)
        assert "finish" not in client.calls
    finally:
        trainer.shutdown()
        worker.shutdown()


def test_a_server_that_refuses_the_group_is_reported_at_once_not_after_the_rendezvous_timeout():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="not configured"):
        pair(chunk_bytes=256, timeout_s=60.0, refuse_init=True)
    assert time.monotonic() - start < 10
