"""The hf rollout engine: sampling, log-probs, stop conditions, seeding, and verified weight sync."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment.adapters import merged_state_dict
from alignment.logprobs import pack, token_logprobs
from alignment.rollout import Canary, SamplingParams, WeightSyncError
from alignment.rollout.hf import HFEngine


@pytest.fixture(scope="module")
def setup(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True)["input_ids"]
               for q in ["What is 2+2?", "Tell me a longer story about a cat and a dog, please."]]
    return tokenizer, model, prompts


def engine_for(setup, bf16=False) -> HFEngine:
    tokenizer, model, _ = setup
    return HFEngine(copy.deepcopy(model), tokenizer, bf16=bf16)


def test_n_samples_with_logprobs_of_the_sampled_tokens(setup):
    tokenizer, model, prompts = setup
    engine = engine_for(setup)
    out = engine.generate(prompts, SamplingParams(n=3, max_new_tokens=6, seed=1))
    assert out.prompt_index == [0, 0, 0, 1, 1, 1]
    assert out.prompt_ids[0] == prompts[0] and out.prompt_ids[3] == prompts[1]
    assert all(1 <= len(r) <= 6 for r in out.response_ids)
    assert len({tuple(r) for r in out.response_ids[:3]}) > 1  # samples differ
    # Engine log-probs are those of teacher forcing the same tokens through the model.
    batch = pack(out.prompt_ids, out.response_ids, tokenizer.pad_token_id)
    lp, _ = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                           batch["response_mask"].shape[1])
    for i, r in enumerate(out.response_ids):
        assert torch.allclose(out.logprobs[i], lp[i, : len(r)], atol=1e-4)


def test_sampling_is_seeded_per_prompt_not_per_batch(setup):
    _, _, prompts = setup
    engine = engine_for(setup)
    sampling = SamplingParams(n=2, max_new_tokens=6, seed=7)
    both = engine.generate(prompts, sampling, prompt_uids=[10, 11])
    second_alone = engine.generate(prompts[1:], sampling, prompt_uids=[11])
    assert second_alone.response_ids == both.response_ids[2:]
    other_seed = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=6, seed=8), prompt_uids=[10, 11])
    assert other_seed.response_ids != both.response_ids


def test_greedy_and_stop_at_eos(setup):
    tokenizer, model, prompts = setup
    engine = engine_for(setup)
    greedy = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=5, temperature=0))
    assert greedy.response_ids[0] == greedy.response_ids[1]
    # Make EOS the model's only choice after the first token: generation stops there, reason "stop".
    eos = tokenizer.eos_token_id

    def favour_eos(module, inputs, logits):
        logits = logits.clone()
        logits[..., eos] += 100.0
        return logits

    engine.decoder.lm_head.register_forward_hook(favour_eos)
    out = engine.generate(prompts, SamplingParams(n=1, max_new_tokens=5, temperature=0))
    assert out.response_ids == [[eos], [eos]] and out.finish_reasons == ["stop", "stop"]
    assert greedy.finish_reasons == ["length"] * 4


def test_top_p_keeps_only_the_nucleus(setup):
    _, _, prompts = setup
    engine = engine_for(setup)
    out = engine.generate(prompts[:1], SamplingParams(n=8, max_new_tokens=1, top_p=1e-6, seed=3))
    greedy = engine.generate(prompts[:1], SamplingParams(n=1, max_new_tokens=1, temperature=0))
    assert {tuple(r) for r in out.response_ids} == {tuple(greedy.response_ids[0])}


def _canary(model, prompts):
    responses = [p[:6] for p in prompts]
    batch = pack(prompts, responses, 0)
    lp, _ = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"], 6)
    return Canary(prompts, responses, [lp[i] for i in range(len(prompts))])


def test_weight_sync_is_verified(setup):
    _, model, prompts = setup
    engine = engine_for(setup)
    trainer = copy.deepcopy(model)
    with torch.no_grad():  # a training step's worth of change
        for p in trainer.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    canary = _canary(trainer, prompts)
    # Stale weights (a sync that did not happen) fail loudly.
    with pytest.raises(WeightSyncError, match="stale or partial"):
        engine.update_weights(merged_state_dict(model), canary)
    # A partial sync is refused before anything is checked.
    partial = {k: v for k, v in merged_state_dict(trainer).items() if ".layers.1." not in k}
    with pytest.raises(KeyError, match="weight sync is missing 9 tensors"):
        engine.update_weights(partial, canary)
    # The real sync passes, and the engine now generates what the trainer's weights generate.
    assert engine.update_weights(merged_state_dict(trainer), canary) < 1e-5
    fresh = HFEngine(copy.deepcopy(trainer), setup[0], bf16=False)
    sampling = SamplingParams(n=2, max_new_tokens=6, seed=5)
    assert engine.generate(prompts, sampling).response_ids == fresh.generate(prompts, sampling).response_ids


def test_lora_sync_merges_without_touching_the_adapters(setup):
    from peft import LoraConfig, get_peft_model

    _, model, prompts = setup
    engine = engine_for(setup)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.05)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    canary = _canary(peft_model, prompts)
    assert engine.update_weights(merged_state_dict(peft_model), canary) < 1e-4
    assert all(torch.equal(before[n], p) for n, p in peft_model.named_parameters())  # still unmerged
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())


def test_bf16_engine_decodes_on_packed_weights_that_follow_each_sync(setup):
    tokenizer, model, prompts = setup
    engine = engine_for(setup, bf16=True)
    if not engine.packed:
        pytest.skip("no oneDNN bf16 on this CPU: the engine decodes on plain bf16 weights")
    # packed and plain bf16 matmuls give the same numbers
    plain = copy.deepcopy(model).to(torch.bfloat16)
    batch = pack(prompts, [[]] * len(prompts), tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    assert torch.equal(engine.decoder(**inputs).logits, plain(**inputs).logits)
    # after a sync the engine decodes with the new weights: as an engine built on them does
    trainer = copy.deepcopy(model)
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sampling = SamplingParams(n=2, max_new_tokens=6, seed=5)
    before = engine.generate(prompts, sampling)
    engine.update_weights(merged_state_dict(trainer), _canary(trainer, prompts))
    after = engine.generate(prompts, sampling)
    fresh = HFEngine(copy.deepcopy(trainer), tokenizer, bf16=True).generate(prompts, sampling)
    assert after.response_ids == fresh.response_ids != before.response_ids
    assert all(torch.equal(a, b) for a, b in zip(after.logprobs, fresh.logprobs))


@pytest.mark.parametrize("bf16", [False, True])
def test_a_stale_decoder_or_stale_packed_weights_fail_the_sync_check(setup, bf16, monkeypatch):
    """The check reads the copy that samples (a bf16 decoder, or the fp32 model on packed weights), on
    every CPU kind: the bf16 decoder runs plain where oneDNN has no bf16, packed elsewhere."""
    import alignment.rollout.hf as hf

    tokenizer, model, prompts = setup
    trainer = copy.deepcopy(model)
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    canary, new, old = _canary(trainer, prompts), merged_state_dict(trainer), merged_state_dict(model)
    engine = engine_for(setup, bf16=bf16)
    assert engine.update_weights(new, canary) < 1e-4
    if bf16:
        assert engine.check_decoder(canary) <= 1e-3  # a fresh decoder: measured 0 (same kernels)
        # the decoder left behind by a load that only wrote `model`
        with torch.no_grad():
            for name, p in engine.decoder.named_parameters():
                p.copy_(old[name])
        if engine.packed:
            hf.pack_linear_weights(engine.decoder)
        with pytest.raises(WeightSyncError, match="bfloat16 decoder that samples differs"):
            engine.check_decoder(canary)
        engine.update_weights(new, canary)  # a real sync repairs it
    if not engine.packed:
        assert bf16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported()  # fp32 packs wherever oneDNN runs
        return
    # packed weights that a load forgot to repack: the weights still hold what sampled before
    engine.update_weights(old, _canary(model, prompts))
    monkeypatch.setattr(hf, "pack_linear_weights", lambda model: True)
    with pytest.raises(WeightSyncError, match="stale"):
        engine.update_weights(new, canary)
