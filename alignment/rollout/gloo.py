"""`rollout.server.transport: gloo`: a vLLM weight-transfer engine over a gloo process group, for servers and
trainers without CUDA (vLLM's own engines, nccl and ipc, need CUDA).

It plugs into vLLM's weight-transfer API as the built-in engines do, so a push runs vLLM's own protocol:
`/init_weight_transfer_engine` (once: the trainer and the server's workers open one gloo group, the trainer
as rank 0), then per push `/start_weight_update`, `/update_weights` (the workers receive while the trainer
broadcasts), `/finish_weight_update`. vLLM finds the worker side through its `vllm.general_plugins` entry
point (`align/vllm_plugin.py`, declared in pyproject.toml), loaded in every vLLM process; start servers with
`--weight-transfer-config '{"backend": "gloo"}'` (`align vllm-serve` does on CPU).

Wire format, chosen here: the tensors, in the update info's order, are packed into flat buffers of one dtype
of at most `chunk_bytes` (a tensor larger than that travels alone), one broadcast per buffer; both sides cut
the same buffers from the names, dtypes and shapes of the update info. Every collective has the group's
timeout (`timeout_s`), so a peer that dies or hangs mid-transfer fails the push instead of hanging it.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

CHUNK_BYTES = 64 << 20  # one broadcast per 64 MB: few round trips, bounded extra memory on both sides


@dataclass
class GlooGroup:
    """The group's rendezvous: where rank 0 (the trainer) listens, the group's size (1 + the server's workers),
    the timeout of every collective, the buffer size (both sides must agree: the trainer sends it)."""

    master_address: str
    master_port: int
    world_size: int
    timeout_s: float = 300.0
    chunk_bytes: int = CHUNK_BYTES


@dataclass
class GlooWeightTransferInitInfo(GlooGroup, WeightTransferInitInfo):
    """The server's side: its workers' first rank in the group."""

    rank_offset: int = 1


@dataclass
class GlooTrainerInitInfo(GlooGroup, TrainerInitInfo):
    """The trainer's side (`rank`: the trainer's own rank; rank 0 sends)."""

    backend: ClassVar[str] = "gloo"


@dataclass
class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]


def open_group(address: str, port: int, rank: int, world_size: int, timeout_s: float):
    """A gloo group apart from any default torch.distributed group (the trainer's own stays untouched)."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(address, port, rank, world_size, "gloo",
                                                          timeout=timedelta(seconds=timeout_s))


def chunks(dtypes: list[torch.dtype], shapes: list[list[int]], chunk_bytes: int) -> list[list[int]]:
    """Indices of the tensors in each flat buffer: consecutive tensors of one dtype up to chunk_bytes."""
    out: list[list[int]] = []
    size = 0
    for i, (dtype, shape) in enumerate(zip(dtypes, shapes)):
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if not out or dtypes[out[-1][0]] != dtype or size + nbytes > chunk_bytes:
            out.append([])
            size = 0
        out[-1].append(i)
        size += nbytes
    return out


def broadcast(group, tensor: torch.Tensor) -> None:
    """From rank 0 of the group (gloo's own timeout bounds the wait)."""
    options = torch.distributed.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


class GlooWeightTransferEngine(WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]):
    """The server's side, in each vLLM worker: receives every buffer, loads its tensors through the model's
    `load_weights` within vLLM's layerwise reload (as vLLM's NCCL engine does)."""

    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self.chunk_bytes = CHUNK_BYTES

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        parallel = self.parallel_config
        rank = init_info.rank_offset + parallel.data_parallel_index * parallel.world_size + parallel.rank
        self.chunk_bytes = init_info.chunk_bytes
        self.shutdown()  # a trainer that lost its group (a failed push) opens a new one
        self.group = open_group(init_info.master_address, init_info.master_port, rank, init_info.world_size,
                                init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict) -> None:
        # the base class ends with torch.accelerator.synchronize(): gloo's receive is complete when it returns
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer not initialized: call /init_weight_transfer_engine first")
        dtypes = [getattr(torch, name) for name in update_info.dtype_names]
        for chunk in chunks(dtypes, update_info.shapes, self.chunk_bytes):
            sizes = [torch.Size(update_info.shapes[i]).numel() for i in chunk]
            buffer = torch.empty(sum(sizes), dtype=dtypes[chunk[0]])
            broadcast(self.group, buffer)
            pieces = buffer.split(sizes)
            self.model.load_weights([(update_info.names[i], piece.view(update_info.shapes[i]).to(self.device))
                                     for i, piece in zip(chunk, pieces)])

    def shutdown(self) -> None:
        if self.group is not None:
            from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

            stateless_destroy_torch_distributed_process_group(self.group)
            self.group = None


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """The trainer's side (rank 0 sends; other trainer ranks, if any, only iterate the source in lockstep)."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source: WeightSource, is_sender: bool = True, chunk_bytes: int = CHUNK_BYTES):
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.chunk_bytes = chunk_bytes
        self.group = None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source: WeightSource | None = None):
        if source is None:
            raise ValueError("the gloo trainer engine needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, chunk_bytes=init_info.chunk_bytes)
        if not engine.is_sender:
            return engine
        group_fields = {name: getattr(init_info, name) for name in GlooGroup.__dataclass_fields__}
        worker_info = GlooWeightTransferInitInfo(**group_fields, rank_offset=1)
        # The workers block in the rendezvous inside init_weight_transfer_engine: both sides must meet at once.
        # Whichever fails first is reported: a server that refuses (e.g. started without the gloo backend)
        # answers at once, while our side of the rendezvous would wait out its timeout.
        group: Future = Future()

        def rendezvous():
            try:
                group.set_result(open_group(init_info.master_address, init_info.master_port, 0,
                                            init_info.world_size, init_info.timeout_s))
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                group.set_exception(err)

        threading.Thread(target=rendezvous, daemon=True, name="gloo-rendezvous").start()
        client.init_weight_transfer_engine(asdict(worker_info))
        engine.group = group.result()
        return engine

    def send_weights(self) -> None:
        meta = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:
                pass
            return
        dtypes = [m.dtype for m in meta]
        shapes = [list(m.shape) for m in meta]
        info = GlooWeightTransferUpdateInfo([m.name for m in meta], [str(d).removeprefix("torch.") for d in dtypes],
                                            shapes)
        tensors = dict(self.source)
        self.client.start_weight_update()
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            received = pool.submit(self.client.update_weights, asdict(info))
            try:
                for chunk in chunks(dtypes, shapes, self.chunk_bytes):
                    if received.done():  # the server refused the update: its error, not a broadcast waiting for it
                        received.result()
                    parts = [tensors[meta[i].name].detach().reshape(-1).to(device="cpu", dtype=dtypes[i]) for i in chunk]
                    broadcast(self.group, torch.cat(parts) if len(parts) > 1 else parts[0].contiguous())
            except RuntimeError:
                if received.done() and received.exception() is not None:
                    raise received.exception() from None  # why the server stopped receiving
                raise
            received.result()
        finally:
            pool.shutdown(wait=False)  # never wait on a worker stuck in the collective: the error goes out
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        if self.group is not None:
            from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

            stateless_destroy_torch_distributed_process_group(self.group)
            self.group = None

