"""Pairwise preference losses on margins, registered by name: `bt` (Bradley-Terry) and `r3m`.

A margin is how much the model prefers the labelled-chosen response: `r(x, y_w) - r(x, y_l)` for a
reward model, `beta * ((logp_w - ref_w) - (logp_l - ref_l))` for DPO. Every loss returns the mean
loss and the per-pair outlier variable `delta` (zeros for `bt`).

R^3M (Bukharin et al., NeurIPS 2024) models corrupted labels as a sparse per-pair offset delta_i
on the BT logit and minimises, per pair, `-log sigmoid(m_i + delta_i) + lam * |delta_i|`. Its
delta step has the closed form `delta_i = max(log(1/lam - 1) - m_i, 0)` at the current margin, so
one step is: compute delta from the detached margin, then a gradient step on the loss with delta
fixed. No per-pair state is kept (the paper's alternating updates need none: delta is a function
of the current margin). The resulting gradient is BT's with each pair's weight sigmoid(-m)
clipped at lam: pairs the model confidently contradicts stop pulling. A pair is flagged as an
outlier when delta > 0, i.e. its margin is below tau = log((1 - lam) / lam). We use the per-pair
normalisation of lam (the paper's eq. 3.4 with lam in (0, 1)), not the theory's lam = 1/n.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

# name -> fn(margins, **params) -> (mean loss, delta per pair)
PAIRWISE_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}


def register_pairwise_loss(name: str):
    def deco(fn):
        PAIRWISE_LOSSES[name] = fn
        return fn
    return deco


@register_pairwise_loss("bt")
def bradley_terry(margins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return -F.logsigmoid(margins).mean(), torch.zeros_like(margins.detach())


def r3m_threshold(lam: float) -> float:
    if not 0.0 < lam < 1.0:
        raise ValueError(f"R^3M's lambda must lie in (0, 1), got {lam}")
    return math.log(1.0 / lam - 1.0)


def r3m_delta(margins: torch.Tensor, lam: float) -> torch.Tensor:
    """The closed-form outlier step at the current margins (no gradient flows through it)."""
    return (r3m_threshold(lam) - margins.detach()).clamp_min(0.0)


@register_pairwise_loss("r3m")
def r3m(margins: torch.Tensor, lam: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    delta = r3m_delta(margins, lam)
    # lam * |delta| is constant for the parameters' step; it is kept so the loss is the objective's value.
    return (-F.logsigmoid(margins + delta) + lam * delta).mean(), delta


PAIRWISE_LOSSES["sigmoid"] = bradley_terry  # DPO's name for BT on the implicit-reward margin
