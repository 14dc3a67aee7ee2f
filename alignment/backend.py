"""Training backend: plain torch in one process, DDP under a launcher, DeepSpeed ZeRO with a config.

DeepSpeed is driven directly through `deepspeed.initialize` (as OpenRLHF does), never through
accelerate's `Accelerator`: on CPU hosts that object reports world size 1 on every rank although the
process group has 2 (measured with accelerate 1.15 and gloo). Rank and world size always come from torch.distributed.
Launch with `accelerate launch --config_file launch/zero2.yaml`, `deepspeed` or `torchrun`; the
DeepSpeed JSON comes from `train.deepspeed` or from the accelerate config's `deepspeed_config_file`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from alignment.adapters import AdaLoRABudget, find_adalora
from alignment.config import ConfigError, TrainConfig
from alignment.recompute import enable_gradient_checkpointing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config_path(train: TrainConfig) -> str | None:
    if train.deepspeed:
        return train.deepspeed
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if not path:
            raise ConfigError("accelerate launched with DeepSpeed but no deepspeed_config_file: "
                              "use a config in launch/")
        return path
    return None


def init_distributed(use_deepspeed: bool) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if world == 1 and not use_deepspeed:
        return 0, 1
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
    else:
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def _read_deepspeed_config(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"train.deepspeed: DeepSpeed config not found: {path}") from None


def _zero_stage(config: dict) -> int:
    return config.get("zero_optimization", {}).get("stage", 0)


def _fill_deepspeed_config(path: str, train: TrainConfig, micro_batch: int, world: int) -> dict:
    config = _read_deepspeed_config(path)
    if "optimizer" in config or "scheduler" in config:
        raise ConfigError(f"{path}: leave out 'optimizer' and 'scheduler'; the trainer builds them from train.*")
    # One optimizer step per (mini-)batch of `micro_batch * accumulation` rows per rank.
    accumulation = train.gradient_accumulation_steps
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = accumulation
    config["train_batch_size"] = micro_batch * accumulation * world
    config["gradient_clipping"] = train.max_grad_norm
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("zero_force_ds_cpu_optimizer", False)
    return config


class Backend:
    """Holds the wrapped model, optimizer and scheduler; backward / step / save / load.

    A step is `train.gradient_accumulation_steps` calls of `backward(loss)`, each on a micro-batch
    with its mean loss, then one `step()`: the gradient is the average over the micro-batches. An
    AdaLoRA model's budget is driven at every `step()` and its orthogonality penalty is added to
    every loss (alignment/adapters.py).

    The learning rate follows `train.lr_scheduler` (transformers' `get_scheduler`: constant, linear or
    cosine decay after a linear warmup from 0 over `train.warmup_steps`) over `total_steps`, the run's
    optimizer steps (Trainer.total_updates). The same LambdaLR object is stepped by us (plain torch,
    DDP) or handed to `deepspeed.initialize`, which steps it at each gradient-accumulation boundary;
    its position is checkpointed either way. `train.gradient_checkpointing` is turned on here, for
    every transformers model inside `module` (alignment/recompute.py).
    """

    def __init__(self, module: torch.nn.Module, train: TrainConfig, micro_batch: int, total_steps: int | None = None):
        ds_path = deepspeed_config_path(train)
        adalora = find_adalora(module)
        # checked before DeepSpeed starts
        if ds_path is not None and adalora is not None and _zero_stage(_read_deepspeed_config(ds_path)) == 3:
            raise ConfigError("peft.type=adalora does not run under ZeRO-3 (partitioned adapters cannot be "
                              "scored and masked per matrix): use a ZeRO-1/2 config (launch/zero2.yaml) or "
                              "peft.type=lora")
        self.rank, self.world_size = init_distributed(ds_path is not None)
        self.is_main = self.rank == 0
        self.train = train
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        self.module = module.to(self.device)
        if train.gradient_checkpointing:
            enable_gradient_checkpointing(module)
        self.params = [p for p in module.parameters() if p.requires_grad]
        # fused: one pass over parameters, gradients and moments (CPU and GPU kernels in torch >= 2.4).
        self.optimizer = torch.optim.AdamW(self.params, lr=train.lr, weight_decay=train.weight_decay, fused=True)
        self.scheduler = make_scheduler(self.optimizer, train, total_steps)
        self.deepspeed = None
        self.engine = module
        self.accumulation = train.gradient_accumulation_steps
        if self.accumulation < 1:
            raise ConfigError(f"train.gradient_accumulation_steps: must be at least 1, got {self.accumulation}")
        self.micro_steps = 0
        if ds_path is not None:
            import deepspeed

            config = _fill_deepspeed_config(ds_path, train, max(1, micro_batch // self.accumulation),
                                            self.world_size)
            self.zero_stage = _zero_stage(config)
            self.deepspeed, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=module, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=config
            )
            self.engine = self.deepspeed
        elif self.world_size > 1:
            self.engine = torch.nn.parallel.DistributedDataParallel(module)
        self.adalora = AdaLoRABudget(adalora, self.deepspeed is not None) if adalora is not None else None

    @property
    def kind(self) -> str:
        if self.deepspeed is not None:
            return f"deepspeed-zero{self.zero_stage}"
        return "ddp" if self.world_size > 1 else "torch"

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss (scaled by 1 / accumulation steps)."""
        if self.adalora is not None:
            loss = loss + self.adalora.orth_regularizer()
        self.micro_steps += 1
        if self.deepspeed is not None:
            self.deepspeed.backward(loss)  # DeepSpeed scales by its gradient_accumulation_steps
            if self.micro_steps % self.accumulation:
                self.deepspeed.step()  # not a boundary: DeepSpeed only counts the micro-step
        else:
            (loss / self.accumulation).backward()

    def step(self) -> float:
        """Optimizer step after `accumulation` backward calls; returns the gradient norm before clipping."""
        if self.micro_steps % self.accumulation:
            raise RuntimeError(f"optimizer step after {self.micro_steps % self.accumulation} of "
                               f"{self.accumulation} micro-batches")
        if self.deepspeed is not None:
            if self.adalora is not None:
                self.adalora.before_step()
            self.deepspeed.step()
            if self.adalora is not None:
                self.adalora.after_step()
            norm = self.deepspeed.get_global_grad_norm()
            return float(norm) if norm is not None else 0.0
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.adalora is not None:
            self.adalora.after_step()  # peft's order: after the update, before the gradients go
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def stats(self) -> dict[str, float]:
        return self.adalora.metrics() if self.adalora is not None else {}

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def partitioned(self) -> bool:
        """ZeRO-3: each rank holds a shard of every parameter."""
        return self.deepspeed is not None and self.zero_stage == 3

    @contextlib.contextmanager
    def gathered(self):
        """Full parameters visible on every rank (ZeRO-3 partitions them); a no-op otherwise.

        Any module forward inside the context re-partitions that module's parameters on exit.
        """
        if self.partitioned:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                yield
        else:
            yield

    def gather(self, obj) -> list:
        """`obj` from every rank, in rank order (every rank calls)."""
        if self.world_size == 1:
            return [obj]
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, obj)
        return everyone

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average metrics over ranks; those named `..._max` take the largest rank's value."""
        if self.world_size == 1 or not values:
            return values
        out = {}
        for op, keys in ((dist.ReduceOp.SUM, sorted(k for k in values if not k.endswith("_max"))),
                         (dist.ReduceOp.MAX, sorted(k for k in values if k.endswith("_max")))):
            if not keys:  # every rank holds the same keys: every rank skips the same call
                continue
            t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
            dist.all_reduce(t, op=op)
            scale = self.world_size if op == dist.ReduceOp.SUM else 1
            out.update({k: float(v) / scale for k, v in zip(keys, t)})
        return out

    def barrier(self) -> None:
        if self.world_size > 1 or self.deepspeed is not None:
            dist.barrier()

    def save_state(self, folder: Path) -> None:
        """Optimizer / scheduler state (and the DeepSpeed engine's own checkpoint, and AdaLoRA's
        scores with the full-rank adapters); all ranks call."""
        if self.adalora is not None and self.is_main:
            torch.save(self.adalora.state_dict(), folder / "adalora.pt")
        if self.deepspeed is not None:
            self.deepspeed.save_checkpoint(str(folder / "deepspeed"), tag="state")
        elif self.is_main:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       folder / "optimizer.pt")

    def load_state(self, folder: Path) -> None:
        """Every file is read with torch's weights-only unpickler: a planted checkpoint file cannot run code."""
        if self.adalora is not None:
            self.adalora.load_state_dict(load_tensors(folder / "adalora.pt", map_location=self.device))
        if self.deepspeed is not None:
            # in place of its engine's torch.load(weights_only=False)
            self.deepspeed.checkpoint_engine.load = functools.partial(load_tensors, allowed=_deepspeed_state_types())
            self.deepspeed.load_checkpoint(str(folder / "deepspeed"), tag="state")
        else:
            state = load_tensors(folder / "optimizer.pt", map_location="cpu")
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        # The loaded state brings back the checkpoint's lr and weight decay; a resumed run uses its
        # config's (at the scheduler's current warmup factor), as the resume log says.
        for i, group in enumerate(self.optimizer.param_groups):
            self.scheduler.base_lrs[i] = group["initial_lr"] = self.train.lr
            group["lr"] = self.train.lr * self.scheduler.lr_lambdas[i](self.scheduler.last_epoch)
            group["weight_decay"] = self.train.weight_decay


SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig,
                   total_steps: int | None) -> torch.optim.lr_scheduler.LambdaLR:
    """`train.lr_scheduler` after `train.warmup_steps`, as transformers defines it: the lr factor after k
    optimizer steps is k / warmup during the warmup, then 1 (constant), (T - k) / (T - warmup) (linear)
    or (1 + cos(pi (k - warmup) / (T - warmup))) / 2 (cosine), with T = `total_steps`."""
    from transformers import get_scheduler

    if total_steps is None:
        if train.lr_scheduler != "constant":
            raise ValueError(f"train.lr_scheduler={train.lr_scheduler} needs the run's total optimizer steps")
        total_steps = train.warmup_steps + 1
    return get_scheduler(SCHEDULERS[train.lr_scheduler], optimizer, num_warmup_steps=train.warmup_steps,
                         num_training_steps=total_steps)


def load_tensors(path: str | Path, map_location=None, allowed: list[type] = ()):
    """A checkpoint file of tensors and plain data (and the `allowed` classes), read with torch's
    weights-only unpickler: never full pickle, which runs whatever code the file names."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "unsupported" in line.lower()), "")
        raise ConfigError(f"{path}: refusing to load this checkpoint file: it holds objects other than tensors "
                          f"and plain data, which could run code when unpickled ({reason})") from None


def _deepspeed_state_types() -> list[type]:
    """The classes DeepSpeed's ZeRO optimizer states pickle besides tensors."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]
