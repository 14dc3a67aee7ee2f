"""Rollout throughput of the hf and vllm backends on the same model and batches, and the weight sync.

    align bench rollout            # 1, 8 and 64 prompts, 64 new tokens, 2 timed repeats (~10 min on 2 cores)
    align bench rollout --quick    # 1 and 8 prompts, 16 new tokens, 1 repeat (smoke check)

Model: SmolLM2-135M-Instruct (embedded, offline). Prompts: chat-templated requests for stories
(they rarely stop before the token limit), one sample per prompt, temperature 1.0, seeded.
Contenders, one after the other in this process on the same torch thread count:
  - hf: our HFEngine (our decode loop on a bf16 copy of the weights: the default).
  - vllm-fp32: our VLLMEngine with dtype float32 (the CPU default: syncs verified to ~1e-4).
  - vllm-bf16: our VLLMEngine with dtype bfloat16 (the CUDA default).
tokens/s counts generated tokens over the wall time of `generate` (best of the timed repeats,
after one warm-up call per batch size). Sync: `update_weights` with the full merged state dict and
the canary check, as a training step does it (median of 3), and the load alone.
On a GPU host the same script measures the GPU (the engines pick CUDA themselves).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from benchmarks import _common as C

ROOT = C.ROOT

NAME = "rollout"
THREADS = 2
TOPICS = ["a lighthouse keeper", "a lost robot", "the first snow", "a dragon who bakes", "an old map",
          "a city under the sea", "a talking cat", "the last train home"]


def _prompts(tokenizer, count: int) -> list[list[int]]:
    from alignment.data import encode_prompt

    return [encode_prompt(tokenizer, f"Write a long story about {TOPICS[i % len(TOPICS)]} (version {i}).", True)
            for i in range(count)]


def _canary(model, tokenizer, prompts):
    from alignment.logprobs import pack, token_logprobs
    from alignment.rollout import Canary

    tails = [p[-24:] for p in prompts[:2]]
    heads, bodies = [t[:16] for t in tails], [t[16:] for t in tails]
    batch = pack(heads, bodies, tokenizer.pad_token_id)
    with torch.no_grad():
        lp, _ = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                               batch["response_mask"].shape[1])
    return Canary(heads, bodies, [lp[i, : len(b)] for i, b in enumerate(bodies)])


def _measure(name, engine, model, tokenizer, batches, new_tokens, repeats) -> dict:
    from alignment.adapters import merged_state_dict
    from alignment.rollout import SamplingParams

    weights = merged_state_dict(model)
    canary = _canary(model, tokenizer, _prompts(tokenizer, 2))
    syncs, loads, errors = [], [], []
    for _ in range(3):
        t = time.perf_counter()
        errors.append(engine.update_weights(weights, canary))
        syncs.append(time.perf_counter() - t)
        t = time.perf_counter()
        engine.load_weights(weights)
        loads.append(time.perf_counter() - t)
    out = {"sync_s": statistics.median(syncs), "load_s": statistics.median(loads), "sync_logprob_err": max(errors),
           "batches": {}}
    for count in batches:
        prompts = _prompts(tokenizer, count)
        sampling = SamplingParams(n=1, max_new_tokens=new_tokens, temperature=1.0, seed=1)
        engine.generate(prompts, sampling, prompt_uids=list(range(count)))  # warm-up
        best = None
        for _ in range(repeats):
            t = time.perf_counter()
            rollouts = engine.generate(prompts, sampling, prompt_uids=list(range(count)))
            elapsed = time.perf_counter() - t
            tokens = sum(len(r) for r in rollouts.response_ids)
            if best is None or tokens / elapsed > best["tokens_per_s"]:
                best = {"tokens_per_s": tokens / elapsed, "seconds": elapsed, "tokens": tokens,
                        "mean_length": tokens / count}
        out["batches"][str(count)] = best
        print(f"  {name:10s} {count:3d} prompts: {best['tokens_per_s']:8.1f} tokens/s "
              f"({best['tokens']} tokens in {best['seconds']:.2f} s)", flush=True)
    print(f"  {name:10s} sync {out['sync_s']:.3f} s (load {out['load_s']:.3f} s), canary error "
          f"{out['sync_logprob_err']:.2g}", flush=True)
    return out


def main(quick: bool = False) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.config import VLLMConfig
    from alignment.models import builtin_smollm2
    from alignment.rollout.hf import HFEngine
    from alignment.rollout.vllm import VLLMEngine

    torch.set_num_threads(THREADS)
    batches, new_tokens, repeats = ([1, 8], 16, 1) if quick else ([1, 8, 64], 64, 2)
    path = builtin_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    results = {}
    print(f"rollout throughput, SmolLM2-135M, {new_tokens} new tokens, device {device}", flush=True)
    results["hf"] = _measure("hf", HFEngine(copy.deepcopy(model), tokenizer, bf16=True), model, tokenizer,
                             batches, new_tokens, repeats)
    for dtype in ("float32", "bfloat16"):
        t = time.perf_counter()
        engine = VLLMEngine(str(path), tokenizer, VLLMConfig(dtype=dtype, max_model_len=1024))
        startup = time.perf_counter() - t
        key = "vllm-" + ("fp32" if dtype == "float32" else "bf16")
        results[key] = {"startup_s": startup, **_measure(key, engine, model, tokenizer, batches, new_tokens, repeats)}
        # One engine at a time: vLLM keeps process-wide state, so the second is made beside the first.
        del engine

    rows = []
    for key, res in results.items():
        for count, b in res["batches"].items():
            rows.append([key, count, f"{b['tokens_per_s']:.1f}",
                         f"{b['tokens_per_s'] / results['hf']['batches'][count]['tokens_per_s']:.2f}x",
                         f"{b['mean_length']:.1f}"])
    print(C.table(rows, ["backend", "prompts", "tokens/s", "vs hf", "mean length"]))
    sync_rows = [[key, f"{res['sync_s']:.3f}", f"{res['load_s']:.3f}", f"{res['sync_logprob_err']:.2g}"]
                 for key, res in results.items()]
    print(C.table(sync_rows, ["backend", "sync s (load+check)", "load s", "canary err"]))
    data = {
        "quick": quick, "device": device, "model": "SmolLM2-135M-Instruct", "new_tokens": new_tokens,
        "threads": THREADS, "machine": C.machine_info(), "versions": C.versions("torch", "transformers", "vllm"),
        "git": C.git_state(ROOT), "results": results,
    }
    written = C.write_results(NAME + (".quick" if quick else ""), data)
    print(f"results: {written}")
    return data
