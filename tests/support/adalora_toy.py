"""AdaLoRA on a problem where only one layer needs to change much, trained through our Backend.

Four linear layers side by side (each maps its own slice of the input); the teacher is the
student's frozen base plus a rank-4 change in layer 2 and a small rank-1 change in each other
layer. Every layer gets an AdaLoRA adapter (init_r 4, a total budget of 2 per layer = 8), so a
working allocator gives layer 2 more rank than the others (ideally 4 + 1 + 1 + 1 + 1). Runs in-process
(`run(...)`) or under a launcher
(`torchrun --nproc_per_node 2 tests/support/adalora_toy.py OUT.json --deepspeed launch/ds_zero2.json`);
each rank takes its share of every batch, so the processes together see what one process sees.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from alignment.backend import Backend  # noqa: E402
from alignment.config import PeftConfig, TrainConfig  # noqa: E402
from alignment.adapters import apply_peft  # noqa: E402

WIDTH, LAYERS, CHANGED = 16, 4, 2
STEPS, BATCH = 60, 64
PEFT = PeftConfig(type="adalora", init_r=4, target_r=2, tinit=10, tfinal=20, deltaT=5, alpha=4,
                  target_modules=[f"layers.{i}" for i in range(LAYERS)])


class Branches(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS))

    def forward(self, x):  # (B, LAYERS * WIDTH) -> (B, LAYERS * WIDTH)
        return torch.cat([layer(part) for layer, part in zip(self.layers, x.chunk(LAYERS, -1))], -1)


def run(accumulation: int = 1, allocate: bool = True, deepspeed: str | None = None) -> dict:
    """Train; returns ranks per layer at the end and the total rank after every step."""
    torch.manual_seed(0)
    student = Branches()
    teacher = Branches()
    teacher.load_state_dict(student.state_dict())
    with torch.no_grad():
        for i, layer in enumerate(teacher.layers):
            rank, scale = (4, 0.5) if i == CHANGED else (1, 0.1)
            layer.weight += torch.randn(WIDTH, rank) @ torch.randn(rank, WIDTH) * scale
    model = apply_peft(student, PEFT, total_steps=STEPS)
    train = TrainConfig(lr=1e-2, gradient_accumulation_steps=accumulation, max_grad_norm=10.0, deepspeed=deepspeed,
                        bf16=False)
    backend = Backend(model, train, BATCH)
    if not allocate:  # negative control: what every loop that forgets the call gets
        backend.adalora = None
    data = torch.Generator().manual_seed(1)
    history = []
    for _ in range(STEPS):
        x = torch.randn(BATCH, LAYERS * WIDTH, generator=data)[backend.rank::backend.world_size]
        target = teacher(x).detach()
        for chunk_x, chunk_t in zip(x.chunk(accumulation), target.chunk(accumulation)):
            loss = ((backend(chunk_x) - chunk_t) ** 2).mean()
            backend.backward(loss)
        backend.step()
        history.append(sum(_ranks(model).values()))
    return {"ranks": _ranks(model), "history": history, "loss": float(loss.detach())}


def _ranks(model) -> dict[str, int]:
    """Non-zero singular values (lambda entries) per layer."""
    return {str(i): int((model.base_model.model.layers[i].lora_E["default"] != 0).sum()) for i in range(LAYERS)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--deepspeed")
    parser.add_argument("--accumulation", type=int, default=1)
    args = parser.parse_args()
    result = run(args.accumulation, deepspeed=args.deepspeed)
    result["world_size"] = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        Path(args.out).write_text(json.dumps(result))
