"""Gradient checkpointing (`train.gradient_checkpointing`): activations recomputed in the backward pass.

`enable_gradient_checkpointing(module)` turns on transformers' checkpointing of every transformers model
inside what the training backend wraps (policy, reward model, critic, preference-model backbone), with
`use_reentrant=False` (torch's recommended mode: no input-requires-grad trick is needed for PEFT's
frozen embeddings, and kwargs-only tensors get gradients). Two things differ from transformers' own:

- Its layers checkpoint only in train mode (`self.training`), but our online trainers and DPO keep the
  policy in eval mode (no dropout: rollout and training log-probs describe one policy). Here a layer
  checkpoints whenever autograd records (`torch.is_grad_enabled()`): the no-grad passes (old and
  reference log-probs, evaluation, generation) run as before, dropout stays as the trainer set it.
- Transformers drops a KV cache passed to a checkpointed layer (a cache updated in place would be
  updated a second time by the recompute). The shared-prompt path (alignment/logprobs.py
  `response_hidden`: the prompt of n samples runs once, its keys and values are reused by every
  sample) passes `PromptCache`s, which give the same values on a recompute: the prompt pass stores
  (replaces) and the response pass only reads. So the two work together, exactly; any other cache
  under checkpointing with gradients is refused rather than silently dropped.
"""

from __future__ import annotations

import functools

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from alignment.config import ConfigError


class PromptCache(DynamicCache):
    """A KV cache whose `update` gives the same result when a checkpointed layer runs again.

    Write mode (the prompt pass): each layer's keys and values are stored, replacing what was there,
    and returned as they are. Read mode (`for_rows`, the response pass): the stored prompt keys and
    values, concatenated with the new ones, are returned and nothing is stored. Without checkpointing
    it computes what a DynamicCache does.
    """

    def __init__(self, read_only: bool = False):
        super().__init__()  # plain full-length layers: masks, not the cache, bound sliding windows
        self.read_only = read_only

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(DynamicLayer())
        layer = self.layers[layer_idx]
        if self.read_only:
            return torch.cat([layer.keys, key_states], -2), torch.cat([layer.values, value_states], -2)
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        layer.keys, layer.values = key_states, value_states
        return key_states, value_states

    def for_rows(self, index: torch.Tensor) -> PromptCache:
        """A read-only cache with row `index[i]` of this one as row i (differentiable index_select)."""
        out = PromptCache(read_only=True)
        for layer in self.layers:
            row = DynamicLayer()
            row.lazy_initialization(layer.keys, layer.values)
            row.keys, row.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
            out.layers.append(row)
        return out


class GradModeCheckpointing:
    """Mixed into each GradientCheckpointingLayer's class: checkpoint when autograd records."""

    def __call__(self, *args, **kwargs):
        if not (self.gradient_checkpointing and torch.is_grad_enabled()):
            return torch.nn.Module.__call__(self, *args, **kwargs)
        cache = kwargs.get("past_key_values")
        if cache is not None and not isinstance(cache, PromptCache):
            raise RuntimeError(f"{type(self).__name__}: gradient checkpointing with a KV cache updated in place "
                               "(the recompute would update it twice); use alignment.recompute.PromptCache")
        return self._gradient_checkpointing_func(functools.partial(torch.nn.Module.__call__, self, **kwargs), *args)


@functools.cache
def _grad_mode_class(cls: type) -> type:
    return type(cls.__name__, (GradModeCheckpointing, cls), {"__module__": cls.__module__})


def enable_gradient_checkpointing(module: torch.nn.Module) -> int:
    """Checkpoint every decoder / encoder layer of the transformers models inside `module` (PEFT-wrapped
    or not); returns the number of checkpointed layers. A model without checkpointing support is a
    ConfigError."""
    for m in module.modules():
        if isinstance(m, PreTrainedModel) and not m.is_gradient_checkpointing:
            if not m.supports_gradient_checkpointing:
                raise ConfigError(f"train.gradient_checkpointing: {type(m).__name__} does not support gradient "
                                  f"checkpointing (set train.gradient_checkpointing=false)")
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        raise ConfigError("train.gradient_checkpointing: the model has no checkpointable layers (set "
                          "train.gradient_checkpointing=false)")
    for layer in layers:
        if not isinstance(layer, GradModeCheckpointing):
            layer.__class__ = _grad_mode_class(type(layer))
    return len(layers)
