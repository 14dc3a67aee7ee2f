"""GEAR KV-cache compression: round-trip error of each component, packed bits, byte accounting of the
stored form, streaming, fidelity of generation on SmolLM2 against KIVI, and an online trainer step."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment.compression.gear import (
    CompressedLayer, compress, dequantize, make_kv_cache, pack_bits, quantize, stepwise_logits,
    unpack_bits,
)
from alignment.config import ConfigError, KVCompressionConfig, RolloutConfig
from alignment.logging import read_metrics
from alignment.logprobs import pack, token_logprobs
from alignment.models import builtin_smollm2
from alignment.rollout import SamplingParams
from alignment.rollout.hf import HFEngine
from tests.support.recipes import train_in_process
from tests.support.recipes import toy_recipe


def kv_like(seed: int = 0) -> torch.Tensor:
    """(batch 2, heads 2, 64 rows, 128 along the row): two outlier channels (rows) of large scale and
    0.5 % spikes, as keys show them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, 64, 128, generator=g)
    x[:, :, [3, 40]] *= 8
    spikes = torch.rand(x.shape, generator=g) < 0.005
    return x + spikes * torch.randn(x.shape, generator=g) * 25


def rel_error(x: torch.Tensor, **kw) -> float:
    return float((compress(x, **kw).decompress() - x).norm() / x.norm())


@pytest.mark.parametrize("bits", [2, 4])
def test_each_component_lowers_the_round_trip_error(bits):
    x = kv_like()
    quant = rel_error(x, bits=bits, group=64)
    with_low_rank = rel_error(x, bits=bits, group=64, rank=4)
    with_sparse = rel_error(x, bits=bits, group=64, outlier_frac=0.02)
    gear = rel_error(x, bits=bits, group=64, rank=4, outlier_frac=0.02)
    assert gear < with_low_rank < quant
    assert gear < with_sparse < quant
    by_rank = [rel_error(x, bits=bits, group=64, rank=r, outlier_frac=0.02) for r in (1, 2, 4, 8, 16)]
    assert all(a > b for a, b in zip(by_rank, by_rank[1:])), by_rank


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bits_pack_exactly_and_quantise_to_2_pow_b_levels(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 37), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape[-1] == (37 if bits == 8 else 40 // 8 * bits)  # padded to 40 codes, b bits each
    assert torch.equal(unpack_bits(packed, bits, 37), codes)
    ramp = torch.linspace(-1, 3, 1000).view(1, 1000)
    q = quantize(ramp, bits, group=1000)
    restored = dequantize(q)
    assert restored.unique().numel() == 2**bits  # every level used, no more (not the reference's b^2 - 1)
    assert float((restored - ramp).abs().max()) <= float(q.scale.float().max()) / 2 + 1e-6


def test_sequences_of_a_batch_are_compressed_independently():
    x = kv_like()
    both = compress(x, bits=2, group=64, rank=2, outlier_frac=0.02).decompress()
    for i in range(2):
        alone = compress(x[i : i + 1], bits=2, group=64, rank=2, outlier_frac=0.02).decompress()
        assert torch.allclose(both[i : i + 1], alone, atol=1e-5)


def held_tensors(obj) -> list[torch.Tensor]:
    """Every tensor an object holds, found by walking its attributes (not by the cache's own accounting)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    elif hasattr(obj, "__dict__"):
        obj = vars(obj)
    if isinstance(obj, dict):
        return [t for value in obj.values() for t in held_tensors(value)]
    return []


def stream(layer, keys, values, prompt: int):
    layer.update(keys[:, :, :prompt], values[:, :, :prompt])
    for t in range(prompt, keys.shape[2]):
        layer.update(keys[:, :, t : t + 1], values[:, :, t : t + 1])


def test_reported_bytes_are_the_held_tensors_and_a_third_of_fp16_at_4_bits():
    """Default settings, a 1030-token sequence: a 900-token prompt, then token by token (6 tokens
    left in the buffer)."""
    keys = torch.randn(2, 3, 1030, 64, dtype=torch.float16)
    values = torch.randn_like(keys)
    ratios = {}
    for bits in (2, 4):
        layer = CompressedLayer(KVCompressionConfig(type="gear", bits=bits))
        stream(layer, keys, values, prompt=900)
        assert layer.get_seq_length() == 1030 and layer.keys.shape[2] == 1030 % 128
        held = held_tensors(layer)
        assert layer.nbytes == sum(t.numel() * t.element_size() for t in held)
        ratios[bits] = layer.nbytes / (keys.nbytes + values.nbytes)
    assert ratios[4] <= 1 / 3, ratios
    assert ratios[2] <= 0.21, ratios


def test_blocks_are_compressed_once_and_the_new_tokens_are_returned_exactly():
    spec = KVCompressionConfig(type="gear", bits=2, group=16, buffer=16)
    keys, values = torch.randn(2, 1, 70, 64), torch.randn(2, 1, 70, 64)
    layer = CompressedLayer(spec)
    stream(layer, keys[:, :, :40], values[:, :, :40], prompt=20)
    first_codes = layer.stored_keys.quant.codes.clone()
    out_keys, out_values = layer.update(keys[:, :, 40:41], values[:, :, 40:41])
    assert torch.equal(out_keys[:, :, 40:], keys[:, :, 40:41])  # the new token, exact
    assert torch.equal(out_keys[:, :, 32:40], keys[:, :, 32:40].half().float())  # the buffer, in fp16
    for t in range(41, 70):
        layer.update(keys[:, :, t : t + 1], values[:, :, t : t + 1])
    assert layer.stored_keys.quant.codes.shape[2] == 4  # 64 of 70 tokens in 4 blocks, 6 in the buffer
    assert torch.equal(layer.stored_keys.quant.codes[:, :, :2], first_codes)  # never re-compressed
    out_keys, _ = layer.update(keys[:, :, :0], values[:, :, :0])
    stored_err = float((out_keys[:, :, :64] - keys[:, :, :64]).norm() / keys[:, :, :64].norm())
    assert 0 < stored_err < 0.5


def test_left_padding_does_not_change_the_real_tokens():
    spec = KVCompressionConfig(type="kivi", bits=2, group=16, buffer=16)

    def restored(pad_value: float, left_pad: list[int]) -> torch.Tensor:
        x = torch.randn(2, 1, 32, 64, generator=torch.Generator().manual_seed(0))
        x[1, :, :5] = pad_value  # row 1 starts with 5 pad positions
        layer = CompressedLayer(spec, left_pad=torch.tensor(left_pad))
        layer.update(x, x.clone())
        keys, _ = layer.update(x[:, :, :0], x[:, :, :0])
        return keys[1, :, 5:], x[1, :, 5:]

    garbage, real = restored(1000.0, [0, 5])
    other, _ = restored(-7.0, [0, 5])
    assert torch.equal(garbage, other)  # what the pads hold does not reach the real tokens
    polluted, _ = restored(1000.0, [0, 0])  # pads not declared: they stretch the ranges of their block
    first_block = slice(0, 11)  # positions 5-15
    error = float((garbage - real)[:, first_block].abs().mean())
    assert float((polluted - real)[:, first_block].abs().mean()) > 5 * error


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"rollout.kv_compression.bits: expected one of 2, 3, 4, 8, got 5"):
        KVCompressionConfig(type="gear", bits=5)
    with pytest.raises(ConfigError, match="hf backend only"):
        RolloutConfig(backend="vllm", kv_compression=KVCompressionConfig(type="gear"))


# ---- generation on a real small model --------------------------------------------------------
# Copying a passage reads the prompt's keys and values back token by token, and the model is sure of
# each next token, so divergence measures the cache rather than near-ties between likely words.
PASSAGES = [
    "The lighthouse stood on a rock at the edge of the bay. Every night the keeper climbed the stairs, lit the "
    "lamp and watched the ships pass. One morning he found a bottle on the shore with a letter inside, written "
    "by a girl who lived across the sea.",
    "Photosynthesis takes place in the leaves of green plants. Sunlight is absorbed by chlorophyll, water is "
    "taken up by the roots, and carbon dioxide enters through small pores. The plant turns these into sugar "
    "and releases oxygen into the air.",
    "The first bicycles had no pedals: riders pushed them along with their feet. Later came pedals on the "
    "front wheel, then the tall penny-farthing, and finally the safety bicycle with a chain, two wheels of "
    "equal size and air-filled tyres.",
]
SMALL_BLOCKS = {"group": 32, "buffer": 32}  # so that most of the prompt is compressed
GEAR_2_BIT = {"rank": 4, "outlier_frac": 0.02}  # the paper's 2-bit settings (the defaults suit 4 bits)


@pytest.fixture(scope="module")
def smollm2():
    path = builtin_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": "Repeat the following text exactly, word for word:\n\n" + text}],
        add_generation_prompt=True, tokenize=True)["input_ids"] for text in PASSAGES]
    return tokenizer, model, prompts


def greedy(smollm2, spec: KVCompressionConfig):
    tokenizer, model, prompts = smollm2
    engine = HFEngine(model, tokenizer, bf16=False, kv_compression=spec)
    return engine.generate(prompts, SamplingParams(n=1, max_new_tokens=64, temperature=0.0))


@pytest.fixture(scope="module")
def uncompressed(smollm2):
    return greedy(smollm2, KVCompressionConfig())


def agreement(a: list[int], b: list[int]) -> int:
    """Leading tokens two greedy generations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def logprob_gap(model, tokenizer, prompts, generated) -> float:
    """What RL sees as rollout/logprob_diff: mean |log-prob the engine generated each token with -
    the full-precision model's log-prob of it (the trainer's `token_logprobs`)|."""
    batch = pack(prompts, generated.response_ids, tokenizer.pad_token_id)
    with torch.no_grad():
        exact, _ = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                  batch["response_mask"].shape[1])
    engine = torch.zeros_like(exact)
    for i, logprobs in enumerate(generated.logprobs):
        engine[i, : len(logprobs)] = logprobs.float()
    mask = batch["response_mask"].bool()
    return float((exact - engine).abs()[mask].mean())


@pytest.mark.slow
def test_gear_generation_follows_the_uncompressed_cache_further_than_kivi_at_equal_bits(smollm2, uncompressed):
    """2 bits, where the paper shows GEAR's error recovery (rank 4, 2 % outliers) against KIVI: longer
    agreement with the uncompressed cache's greedy text, and log-probs closer to the exact ones."""
    tokenizer, model, prompts = smollm2
    gear = greedy(smollm2, KVCompressionConfig(type="gear", bits=2, **SMALL_BLOCKS, **GEAR_2_BIT))
    kivi = greedy(smollm2, KVCompressionConfig(type="kivi", bits=2, **SMALL_BLOCKS))
    agree_gear = [agreement(a, b) for a, b in zip(gear.response_ids, uncompressed.response_ids)]
    agree_kivi = [agreement(a, b) for a, b in zip(kivi.response_ids, uncompressed.response_ids)]
    # Measured (leading tokens shared with the uncompressed greedy text, of 53/47/56): GEAR 15/2/16,
    # KIVI 4/0/7. (At 4 bits both follow it closely, up to a near-tie: GEAR 44/2/56, KIVI 45/47/56.)
    assert sum(agree_gear) >= 20 and sum(agree_gear) >= 2 * sum(agree_kivi), (agree_gear, agree_kivi)
    assert 0 < gear.kv_bytes < 0.25 * uncompressed.kv_bytes  # measured 0.19 of the engine's fp32 cache
    # Measured, default kernels / avx2: uncompressed 0.0000 / 0.0000, GEAR 0.171 / 0.171, KIVI 0.388 / 0.389
    # (on sampled tokens: GEAR 0.352 and 0.060 at 2 and 4 bits, KIVI 0.617 and 0.087).
    gaps = {name: logprob_gap(model, tokenizer, prompts, out) for name, out in
            (("none", uncompressed), ("gear", gear), ("kivi", kivi))}
    assert gaps["none"] < 1e-3 and gaps["gear"] < 0.6 * gaps["kivi"], gaps


@pytest.mark.slow
def test_gear_logits_are_closer_to_the_uncompressed_cache_than_kivi(smollm2, uncompressed):
    """Per-step KL(uncompressed || compressed), teacher-forced on the uncompressed greedy tokens."""
    tokenizer, model, prompts = smollm2
    kl = {}
    for prompt, response in zip(prompts[:2], uncompressed.response_ids[:2]):
        ids = torch.tensor([prompt + response[:32]])
        ref = stepwise_logits(model, ids, len(prompt), make_kv_cache(KVCompressionConfig(), model.config))
        for kind in ("gear", "kivi"):
            for bits in (2, 4):
                extra = GEAR_2_BIT if (kind, bits) == ("gear", 2) else {}
                spec = KVCompressionConfig(type=kind, bits=bits, **SMALL_BLOCKS, **extra)
                got = stepwise_logits(model, ids, len(prompt), make_kv_cache(spec, model.config))
                step_kl = (ref.softmax(-1) * (ref.log_softmax(-1) - got.log_softmax(-1))).sum(-1)
                kl.setdefault((kind, bits), []).append(float(step_kl.mean()))
    mean = {k: sum(v) / len(v) for k, v in kl.items()}
    assert mean[("gear", 2)] < 0.5 * mean[("kivi", 2)], mean
    assert mean[("gear", 4)] < 0.7 * mean[("kivi", 4)], mean
    assert mean[("gear", 4)] < 0.02, mean


# ---- an online trainer ---------------------------------------------------------------------
def test_online_trainer_step_with_gear(tmp_path, tiny_model):
    recipe = toy_recipe(tmp_path, tiny_model, trainer="grpo", rollout={
        "max_new_tokens": 12, "kv_compression": {"type": "gear", "bits": 2, "group": 8, "buffer": 8}})
    train_in_process(recipe)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    assert len(rows) == 2
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt_len = max(len(tokenizer.apply_chat_template([{"role": "user", "content": line.split('"')[3]}],
                                                       add_generation_prompt=True, tokenize=True)["input_ids"])
                     for line in (tmp_path / "prompts.jsonl").read_text().splitlines())
    # what an uncompressed fp32 cache holds at the end of a step's generation: 4 prompts x 4 samples,
    # tiny Llama's 2 layers x (K, V) x 1 head x 64 channels
    uncompressed = 16 * (prompt_len + 12) * 2 * 2 * 64 * 4
    for row in rows:
        assert 0 < row["gear/kv_bytes"] < 0.4 * uncompressed
        assert row["rollout/logprob_diff"] > 1e-4  # compression's mark on the rollout log-probs
