"""GEAR and KIVI KV-cache compression against the uncompressed cache, on long rollouts.

    align bench gear            # 16 story prompts x 384 new tokens, 2 and 4 bits (~15 min on 2 cores)
    align bench gear --quick    # 4 prompts x 64 new tokens, small blocks (smoke check)

Model: SmolLM2-135M-Instruct (embedded, offline), through our HFEngine with its defaults (decoding
on a bf16 copy of the weights).
Rollouts are sampled at temperature 1 with the engine's per-sample seeds, so every cache draws the
same noise: a compressed run produces the uncompressed run's tokens until a perturbed logit moves
an argmax. Each configuration runs in its own process (one after the other), which measures:
  - kv bytes: what the cache objects hold at the end of generation (`Rollouts.kv_bytes`), and the
    ratio to an fp16 cache of the same tokens (the uncompressed cache stores the decoder's dtype, bf16 by
    default; the compressed caches keep their buffer in fp16);
  - peak memory: the highest anonymous RSS during `generate` minus that just before it (sampled
    every 2 ms from /proc/self/status), after a warm-up generate, with glibc told to unmap freed blocks
    over 128 KiB (otherwise RSS keeps the allocator's high-water mark of transient tensors);
  - tokens/s of `generate`;
  - agreement: leading tokens equal to the uncompressed run's, per sample, and the fraction of
    samples that match it entirely;
  - log-prob difference: mean and max |rollout log-prob - full-precision recompute| per token on
    the run's own tokens (`rollout/logprob_diff` of a training step: the quantity RL cares about);
  - KL and top-1: per-step KL(uncompressed || compressed) and how often both caches pick the same
    most likely token, teacher-forced on 2 uncompressed rollouts (fp32), so one early difference does
    not decide the rest (leading agreement under sampling does: it ends at the first near-tie).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks import _common as C

ROOT = C.ROOT
NAME = "gear"
THREADS = 2
TOPICS = ["a lighthouse keeper", "a lost robot", "the first snow", "a dragon who bakes", "an old map",
          "a city under the sea", "a talking cat", "the last train home"]
# (type, bits, extra settings): GEAR at 2 bits with the paper's 2-bit rank and outlier fraction
CONFIGS = [("none", 0, {}), ("kivi", 4, {}), ("gear", 4, {}), ("kivi", 2, {}), ("gear", 2, {}),
           ("gear", 2, {"rank": 4, "outlier_frac": 0.02})]


def _rss_bytes() -> int:
    """Anonymous resident memory (heap and anonymous maps: where tensors live; not the model file's pages)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


class PeakRSS:
    """Highest RSS seen while the block runs, sampled by a thread."""

    def __enter__(self):
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _setup(quick: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.data import encode_prompt
    from alignment.models import builtin_smollm2

    C.quiet_torch(THREADS)
    path = builtin_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    count = 4 if quick else 16
    prompts = [encode_prompt(tokenizer, f"Write a long story about {TOPICS[i % len(TOPICS)]} (version {i}).", True)
               for i in range(count)]
    return model, tokenizer, prompts


def _spec(kind: str, bits: int, extra: dict, quick: bool):
    from alignment.config import KVCompressionConfig

    if kind == "none":
        return KVCompressionConfig()
    blocks = {"group": 16, "buffer": 16} if quick else {}
    return KVCompressionConfig(type=kind, bits=bits, **blocks, **extra)


def _key(kind: str, bits: int, extra: dict) -> str:
    return "none" if kind == "none" else f"{kind}-{bits}" + "".join(f" {k}={v}" for k, v in extra.items())


def child(kind: str, bits: int, extra: dict, quick: bool, reference_file: str) -> dict:
    """One configuration, in its own process: returns its measurements (printed as JSON by `main`)."""
    from alignment.compression.gear import make_kv_cache, stepwise_logits
    from alignment.config import KVCompressionConfig
    from alignment.rollout import SamplingParams
    from alignment.rollout.hf import HFEngine

    model, tokenizer, prompts = _setup(quick)
    spec = _spec(kind, bits, extra, quick)
    engine = HFEngine(model, tokenizer, kv_compression=spec)
    new_tokens = 64 if quick else 384
    sampling = SamplingParams(n=1, max_new_tokens=new_tokens, temperature=1.0, seed=3)
    engine.generate(prompts[:2], SamplingParams(n=1, max_new_tokens=8, seed=1))  # warm-up
    with PeakRSS() as rss:
        t = time.perf_counter()
        rollouts = engine.generate(prompts, sampling, prompt_uids=list(range(len(prompts))))
        seconds = time.perf_counter() - t
    tokens = sum(len(r) for r in rollouts.response_ids)
    recomputed = engine.logprobs(rollouts.prompt_ids, rollouts.response_ids)
    diffs = torch.cat([(a - b).abs() for a, b in zip(rollouts.logprobs, recomputed)])
    out = {
        "kind": kind, "bits": bits, "spec": vars(spec), "kv_bytes": rollouts.kv_bytes,
        "peak_rss_delta_bytes": rss.peak - rss.start, "tokens": tokens, "seconds": seconds,
        "tokens_per_s": tokens / seconds, "response_ids": rollouts.response_ids,
        "logprob_diff_mean": float(diffs.mean()), "logprob_diff_max": float(diffs.max()),
    }
    if kind == "none":
        from transformers import DynamicCache

        probe = DynamicCache(config=model.config)
        with torch.no_grad():
            engine.decoder(torch.tensor([prompts[0][:4]]), past_key_values=probe)
        out["cache_dtype"] = str(probe.layers[0].keys.dtype)  # what the engine's uncompressed cache stores
        out["fp16_bytes"] = rollouts.kv_bytes * 2 // probe.layers[0].keys.element_size()
        return out
    reference = json.loads(Path(reference_file).read_text())
    agree = []
    for mine, ref in zip(rollouts.response_ids, reference):
        agree.append(next((i for i, (a, b) in enumerate(zip(mine, ref)) if a != b), min(len(mine), len(ref))))
    out["agreement_tokens"] = agree
    out["identical_frac"] = sum(m == r for m, r in zip(rollouts.response_ids, reference)) / len(reference)
    kls, top1 = [], []
    for prompt, response in zip(prompts[:2], reference[:2]):
        ids = torch.tensor([prompt + response])
        ref_logits = stepwise_logits(model, ids, len(prompt), make_kv_cache(KVCompressionConfig(), model.config))
        got = stepwise_logits(model, ids, len(prompt), make_kv_cache(spec, model.config))
        kls.append((ref_logits.softmax(-1) * (ref_logits.log_softmax(-1) - got.log_softmax(-1))).sum(-1).mean())
        top1.append((ref_logits.argmax(-1) == got.argmax(-1)).float().mean())
    out["kl_per_step"] = float(torch.stack(kls).mean())
    out["top1_agreement"] = float(torch.stack(top1).mean())
    return out


def _run_child(kind: str, bits: int, extra: dict, quick: bool, reference_file: str) -> dict:
    code = (f"import json; from benchmarks.gear import child; "
            f"print('RESULT ' + json.dumps(child({kind!r}, {bits}, {extra!r}, {quick}, {reference_file!r})))")
    # glibc returns freed blocks over 128 KiB to the OS at once, so RSS follows live memory rather
    # than the allocator's high-water mark (the same setting for every configuration)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"gear benchmark child {_key(kind, bits, extra)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(quick: bool = False) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        reference_file = str(Path(tmp) / "reference.json")
        for kind, bits, extra in CONFIGS:
            print(f"  running {_key(kind, bits, extra)} ...", flush=True)
            res = _run_child(kind, bits, extra, quick, reference_file)
            if kind == "none":
                Path(reference_file).write_text(json.dumps(res["response_ids"]))
            results[_key(kind, bits, extra)] = res
    base = results["none"]
    rows = []
    for key, r in results.items():
        agree = r.get("agreement_tokens")
        rows.append([
            key, f"{r['kv_bytes'] / 2**20:.2f}", f"{base['fp16_bytes'] / r['kv_bytes']:.2f}x",
            f"{r['peak_rss_delta_bytes'] / 2**20:.1f}", f"{r['tokens_per_s']:.1f}",
            f"{sum(agree) / len(agree):.0f}" if agree else "-",
            f"{r['identical_frac']:.2f}" if agree else "-",
            f"{r['logprob_diff_mean']:.4f}", f"{r['logprob_diff_max']:.2f}",
            f"{r['kl_per_step']:.4f}" if agree else "-",
            f"{r['top1_agreement']:.3f}" if agree else "-",
        ])
    print(f"uncompressed cache dtype: {base['cache_dtype']}; 'vs fp16' divides an fp16 cache of the same tokens "
          f"({base['fp16_bytes'] / 2**20:.2f} MiB) by the cache's bytes")
    header = ["cache", "kv MiB", "vs fp16", "peak MiB", "tokens/s", "agree tok", "identical", "|dlogp| mean",
              "|dlogp| max", "KL/step", "top-1 agree"]
    print(C.table(rows, header))
    for r in results.values():
        r.pop("response_ids")
    data = {**C.run_info("align bench gear" + (" --quick" if quick else ""), quick),
            "model": "SmolLM2-135M-Instruct", "prompts": 4 if quick else 16, "new_tokens": 64 if quick else 384,
            "results": results}
    written = C.write_results(NAME + (".quick" if quick else ""), data)
    print(f"results: {written}")
    return data
