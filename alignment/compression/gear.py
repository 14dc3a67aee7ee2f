"""GEAR KV-cache compression (Kang et al., 2024; reference code HaoKang-Timmy/GEAR) as a transformers `Cache` that stores the
compressed form, with the KIVI-style baseline (quantisation only) behind the same interface.

A key or value matrix X is stored as  D (b-bit quantised) + S (sparse outliers) + L (low rank):
1. S: the `outlier_frac` entries of a (sequence, head, block) matrix that stand furthest out of
   their quantisation row (|x - row mean| / row std), kept exactly with their positions; before
   quantising they are replaced by the row mean so they do not stretch the row's range;
2. D: asymmetric min-max quantisation with 2^b - 1 levels (not the reference's b^2 - 1), keys per
   channel (groups of `group` tokens), values per token (groups of `group` channels of a head);
3. L: rank-`rank` approximation of the rest X - D - S by `loops` rounds of subspace iteration,
   per (sequence, head, block), so sequences of a batch never share a basis (the reference's CUDA
   path mixes them).

Streaming: new tokens sit in a full-precision buffer; every time `buffer` tokens have accumulated
they are compressed as one block and appended to the stored blocks, never re-compressed (the
reference's Simulated path re-compresses the whole cache every gap, compounding the error). A long
prompt is cut into blocks of the same size, so every block has one shape and all blocks of a layer
are decompressed by one batched call per attention step (the transient full-precision copy that
attention needs; only the compressed form is kept between steps).

Choices where the reference is silent or differs:
- every block, prefill included, uses `rank` (the reference uses a separate prefill rank of 4 on
  the whole prompt);
- outliers are chosen per block matrix with an exact count round(s * entries), not s/2 per tail
  per row (one-sided spikes do not waste half the budget, and the K-channel count quirk is gone);
- storage: codes packed 8 values into b bytes (so 3 bits costs 3 bits), scale and zero in fp16,
  outlier values in fp16 (as the paper) with int16 positions (int32 for blocks over 32767 entries),
  and the low-rank factors as int8 with one fp16 scale per rank component. At 4 bits the factors
  in fp16 alone would cost 6 % of the fp16 cache and put the total above a third of it; int8
  halves that, and its rounding (0.4 % of the correction) is far below what the correction fixes;
- the subspace iteration starts from one fixed random matrix (seeded), so a sequence's compressed
  form does not depend on its batch; left padding is filled with the row's real-token mean before
  compressing, so pad tokens do not stretch the ranges of real ones.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from alignment.config import KVCompressionConfig


# ---- packed low-bit codes ------------------------------------------------------------------
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2^bits along the last dim -> 8 codes per `bits` bytes (zero-padded to 8)."""
    if bits == 8:
        return codes
    m = codes.shape[-1]
    codes = torch.nn.functional.pad(codes, (0, -m % 8)).view(*codes.shape[:-1], -1, 8).long()
    word = (codes << (bits * torch.arange(8, device=codes.device))).sum(-1, keepdim=True)
    packed = (word >> (8 * torch.arange(bits, device=codes.device))) & 255
    return packed.to(torch.uint8).flatten(-2)


def unpack_bits(packed: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `m` codes along the last dim, as uint8."""
    if bits == 8:
        return packed
    if 8 % bits == 0:  # 2 and 4 bits: whole codes per byte, lowest first; shifts on bytes suffice
        shifts = bits * torch.arange(8 // bits, device=packed.device, dtype=torch.uint8)
        return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).flatten(-2)[..., :m]
    words = packed.view(*packed.shape[:-1], -1, bits).long()
    word = (words << (8 * torch.arange(bits, device=packed.device))).sum(-1, keepdim=True)
    codes = (word >> (bits * torch.arange(8, device=packed.device))) & (2**bits - 1)
    return codes.flatten(-2)[..., :m].to(torch.uint8)


@dataclass
class Quantized:
    """Rows of length `length` along the last dim, in groups of `group`, min-max quantised."""

    codes: torch.Tensor  # uint8, packed
    scale: torch.Tensor  # fp16 (..., groups, 1)
    zero: torch.Tensor  # fp16 (..., groups, 1): the group minimum
    bits: int
    group: int
    length: int


def quantize(x: torch.Tensor, bits: int, group: int) -> Quantized:
    length = x.shape[-1]
    group = min(group, length)
    x = x.float()
    if length % group:  # pad with the row's last value: the last group's min and max are unchanged
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], group - length % group)], -1)
    x = x.view(*x.shape[:-1], -1, group)
    levels = 2**bits - 1
    # scale and zero are rounded to fp16 first and the codes computed from the rounded values, so
    # dequantisation reproduces exactly what was quantised against
    zero = x.amin(-1, keepdim=True).half()
    scale = ((x.amax(-1, keepdim=True) - zero.float()) / levels).half()
    codes = ((x - zero.float()) / scale.float().clamp_min(1e-8)).round_().clamp_(0, levels).to(torch.uint8)
    return Quantized(pack_bits(codes.flatten(-2), bits), scale, zero, bits, group, length)


def dequantize(q: Quantized) -> torch.Tensor:
    groups = q.scale.shape[-2]
    codes = unpack_bits(q.codes, q.bits, groups * q.group).view(*q.codes.shape[:-1], groups, q.group)
    x = codes.float() * q.scale.float() + q.zero.float()
    return x.flatten(-2)[..., : q.length]


# ---- GEAR: quantised backbone + sparse outliers + low rank ---------------------------------
@functools.cache
def _start_basis(length: int, rank: int) -> torch.Tensor:
    return torch.randn(length, rank, generator=torch.Generator().manual_seed(0))


def low_rank(residual: torch.Tensor, rank: int, loops: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (Q, P) with residual ~ Q P^T per matrix of the batch (..., R, L), Q orthonormal."""
    rank = min(rank, *residual.shape[-2:])
    p = _start_basis(residual.shape[-1], rank).to(residual.device)
    for _ in range(loops):
        q = torch.linalg.qr(residual @ p).Q
        p = residual.transpose(-1, -2) @ q
    return q, p


def _int8_columns(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = factor.abs().amax(-2, keepdim=True).clamp_min(1e-12) / 127
    return (factor / scale).round_().to(torch.int8), scale


@dataclass
class Compressed:
    """Matrices (..., R, L) as D + S + L; tensor fields keep the batch in dim 0."""

    quant: Quantized
    outlier_values: torch.Tensor | None = None  # fp16 (..., k)
    outlier_index: torch.Tensor | None = None  # (..., k) positions in the flattened R x L matrix
    q: torch.Tensor | None = None  # int8 (..., R, r)
    p: torch.Tensor | None = None  # int8 (..., L, r)
    factor_scale: torch.Tensor | None = None  # fp16 (..., 1, r)

    def decompress(self) -> torch.Tensor:
        x = dequantize(self.quant)
        if self.outlier_index is not None:
            x.flatten(-2).scatter_(-1, self.outlier_index.long(), self.outlier_values.float())
        if self.q is not None:
            x += (self.q.float() * self.factor_scale.float()) @ self.p.float().transpose(-1, -2)
        return x


def compress(x: torch.Tensor, bits: int, group: int, rank: int = 0, loops: int = 3,
             outlier_frac: float = 0.0) -> Compressed:
    """Compress matrices (..., R, L) whose rows (length L) are the quantisation rows."""
    out = Compressed(quant=None)
    exact = x.float()
    entries = exact.shape[-2] * exact.shape[-1]
    n_outliers = round(outlier_frac * entries)
    rows = exact
    if n_outliers:
        mean = exact.mean(-1, keepdim=True)
        spread = ((exact - mean).abs() / (exact.std(-1, correction=0, keepdim=True) + 1e-6)).flatten(-2)
        index = spread.topk(n_outliers, -1).indices
        out.outlier_values = exact.flatten(-2).gather(-1, index).half()
        out.outlier_index = index.to(torch.int16 if entries <= 32767 else torch.int32)
        filled = mean.expand_as(exact).flatten(-2).gather(-1, index)
        rows = exact.flatten(-2).scatter(-1, index, filled).view_as(exact)
    out.quant = quantize(rows, bits, group)
    if rank:
        approx = Compressed(out.quant, out.outlier_values, out.outlier_index).decompress()
        q, p = low_rank(exact - approx, rank, loops)
        (out.q, q_scale), (out.p, p_scale) = _int8_columns(q), _int8_columns(p)
        out.factor_scale = (q_scale * p_scale).half()
    return out


def _tensors(obj) -> list[torch.Tensor]:
    found = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif dataclasses.is_dataclass(value):
            found += _tensors(value)
    return found


def _map_tensors(obj, fn):
    """A copy of a (nested) dataclass with `fn` applied to every tensor field."""
    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = fn(value)
        elif dataclasses.is_dataclass(value):
            changes[f.name] = _map_tensors(value, fn)
    return dataclasses.replace(obj, **changes)


def _concat(a: Compressed | None, b: Compressed, dim: int) -> Compressed:
    """Blocks of b appended to those of a (same structure, fields in the same order)."""
    if a is None:
        return b
    rest = iter(_tensors(b))
    return _map_tensors(a, lambda t: torch.cat([t, next(rest)], dim))


# ---- the transformers cache ----------------------------------------------------------------
class CompressedLayer(DynamicLayer):
    """One layer: stored blocks of `buffer` tokens (B, H, blocks, ...) plus the full-precision
    buffer in `self.keys` / `self.values` (DynamicLayer's fields)."""

    is_croppable = False

    def __init__(self, spec: KVCompressionConfig, left_pad: torch.Tensor | None = None):
        super().__init__()
        self.spec = spec
        self.left_pad = left_pad  # (B,) pad tokens at the start of each row, or None
        self.stored_keys: Compressed | None = None
        self.stored_values: Compressed | None = None
        self.cumulative_length = 0

    def _compress(self, x: torch.Tensor, transpose: bool) -> Compressed:
        s = self.spec
        b, h, n, d = x.shape
        blocks = x.view(b, h, n // s.buffer, s.buffer, d)
        if transpose:  # keys: rows are channels, quantised along tokens
            blocks = blocks.transpose(-1, -2)
        if s.type == "kivi":
            return compress(blocks, s.bits, s.group)
        return compress(blocks, s.bits, s.group, s.rank, s.loops, s.outlier_frac)

    def _decompressed(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        b, h = self.keys.shape[:2]
        keys = self.stored_keys.decompress().transpose(-1, -2).reshape(b, h, -1, self.keys.shape[-1])
        values = self.stored_values.decompress().reshape(b, h, -1, self.values.shape[-1])
        return keys.to(dtype), values.to(dtype)

    def _fill_padding(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Left-pad positions of rows, replaced by the mean of the row's real tokens in x."""
        if self.left_pad is None:
            return x
        positions = torch.arange(start, start + x.shape[-2], device=x.device)
        pad = (positions[None, :] < self.left_pad.to(x.device)[:, None])[:, None, :, None]
        if not pad.any():
            return x
        real = (~pad).to(x.dtype)
        fill = (x * real).sum(-2, keepdim=True) / real.sum(-2, keepdim=True).clamp_min(1)
        return torch.where(pad, fill, x)

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        # the buffer is fp16, as the paper's, when the model hands over fp32 (CPU autocast leaves
        # RoPE, and so the keys and values, in fp32)
        self.buffer_dtype = torch.float16 if key_states.dtype == torch.float32 else key_states.dtype
        self.keys = key_states.new_empty(*key_states.shape[:-2], 0, key_states.shape[-1], dtype=self.buffer_dtype)
        self.values = value_states.new_empty(*value_states.shape[:-2], 0, value_states.shape[-1],
                                             dtype=self.buffer_dtype)

    def update(self, key_states, value_states, *args, **kwargs):
        # compression runs in fp32 whatever autocast the model runs under (bf16 matmuls would blur
        # the low-rank term, and CPU autocast refuses to concatenate the fp16 scales)
        with torch.autocast(key_states.device.type, enabled=False):
            return self._update(key_states, value_states)

    def _update(self, key_states, value_states):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        buffer_start = self.cumulative_length - self.keys.shape[-2]
        self.cumulative_length += key_states.shape[-2]
        dtype = key_states.dtype
        keys = torch.cat([self.keys.to(dtype), key_states], dim=-2)
        values = torch.cat([self.values.to(dtype), value_states], dim=-2)
        # attention in this call sees the tokens it adds exactly; the stored ones decompressed
        if self.stored_keys is not None:
            old_keys, old_values = self._decompressed(dtype)
            out = torch.cat([old_keys, keys], -2), torch.cat([old_values, values], -2)
        else:
            out = keys, values
        full = keys.shape[-2] // self.spec.buffer * self.spec.buffer
        if full:
            new_keys = self._compress(self._fill_padding(keys[..., :full, :], buffer_start), transpose=True)
            new_values = self._compress(self._fill_padding(values[..., :full, :], buffer_start), transpose=False)
            self.stored_keys = _concat(self.stored_keys, new_keys, dim=2)
            self.stored_values = _concat(self.stored_values, new_values, dim=2)
        self.keys = keys[..., full:, :].to(self.buffer_dtype, copy=True)
        self.values = values[..., full:, :].to(self.buffer_dtype, copy=True)
        return out

    def get_seq_length(self) -> int:
        return self.cumulative_length

    @property
    def nbytes(self) -> int:
        held = [self.keys, self.values, self.left_pad]
        for stored in (self.stored_keys, self.stored_values):
            if stored is not None:
                held += _tensors(stored)
        return sum(t.nbytes for t in held if t is not None)

    def _map_batch(self, fn) -> None:
        if self.left_pad is not None:
            self.left_pad = fn(self.left_pad)
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self.stored_keys is not None:
            self.stored_keys = _map_tensors(self.stored_keys, fn)
            self.stored_values = _map_tensors(self.stored_values, fn)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed KV cache cannot be cropped (assisted decoding is not supported)")

    def reset(self) -> None:
        super().reset()
        self.stored_keys = self.stored_values = None


class CompressedCache(Cache):
    """GEAR (`spec.type == "gear"`) or KIVI-style quantisation only (`"kivi"`), one layer per
    decoder layer of a full-attention model."""

    def __init__(self, spec: KVCompressionConfig, model_config, left_pad: torch.Tensor | None = None):
        config = model_config.get_text_config(decoder=True)
        kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise ValueError(f"KV compression needs full-attention layers only; this model has {sorted(kinds)}")
        super().__init__(layers=[CompressedLayer(spec, left_pad) for _ in range(config.num_hidden_layers)])


class GrowingLayer(DynamicLayer):
    """transformers' DynamicLayer, written into spare room instead of concatenated: `torch.cat` copies
    the whole cache at every decode step (27% of an fp32 decode step with AVX2 kernels, SmolLM2-135M,
    16 rows). The keys and values it returns are views of the filled part: the same numbers."""

    def __init__(self, reserve: int):
        super().__init__()
        self.reserve = reserve  # tokens of room added whenever the buffers are (re)made
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self.get_seq_length(), key_states.shape[-2]
        if self.buffers is None or length + new > self.buffers[0].shape[-2]:
            # (re)made after a batch reshuffle (which replaces keys and values), or when full
            shape = (*key_states.shape[:-2], length + new + self.reserve, key_states.shape[-1])
            self.buffers = (key_states.new_empty(shape), value_states.new_empty(shape[:-1] + value_states.shape[-1:]))
            if length:
                self.buffers[0][..., :length, :].copy_(self.keys)
                self.buffers[1][..., :length, :].copy_(self.values)
        self.buffers[0][..., length: length + new, :].copy_(key_states)
        self.buffers[1][..., length: length + new, :].copy_(value_states)
        self.keys, self.values = self.buffers[0][..., : length + new, :], self.buffers[1][..., : length + new, :]
        return self.keys, self.values

    def _rebase(self, method: str, *args) -> None:  # DynamicLayer's batch ops replace keys and values
        getattr(super(), method)(*args)
        self.buffers = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rebase("batch_repeat_interleave", repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rebase("batch_select_indices", indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rebase("reorder_cache", beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        self._rebase("crop", tokens_to_remove)

    def reset(self) -> None:
        super().reset()
        self.buffers = None


def make_kv_cache(spec: KVCompressionConfig, model_config, left_pad: torch.Tensor | None = None,
                  reserve: int = 0) -> Cache:
    """The cache `rollout.kv_compression` asks for: `none` is transformers' DynamicCache, or with
    `reserve` (the new tokens a generation adds) a cache of `GrowingLayer`s for full-attention models."""
    if spec.type == "none":
        config = model_config.get_text_config(decoder=True)
        if reserve and set(getattr(config, "layer_types", None) or ["full_attention"]) == {"full_attention"}:
            return Cache(layers=[GrowingLayer(reserve) for _ in range(config.num_hidden_layers)])
        return DynamicCache(config=model_config)
    return CompressedCache(spec, model_config, left_pad)


def cache_nbytes(cache: Cache) -> int:
    """Bytes of the tensors a cache holds (its stored form: compressed blocks plus buffers)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, CompressedLayer):
            total += layer.nbytes
        elif layer.is_initialized:
            total += layer.keys.nbytes + layer.values.nbytes
    return total


@torch.no_grad()
def stepwise_logits(model, input_ids: torch.Tensor, prompt_len: int, cache: Cache) -> torch.Tensor:
    """Teacher-forced decoding through `cache`: the prompt in one forward, then one token per step,
    as generation feeds them. Returns fp32 logits (B, T - prompt_len + 1, V) predicting tokens
    prompt_len .. T, so two caches can be compared on the same tokens."""
    logits = [model(input_ids[:, :prompt_len], past_key_values=cache, use_cache=True).logits[:, -1]]
    for t in range(prompt_len, input_ids.shape[1]):
        logits.append(model(input_ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(logits, 1).float()
