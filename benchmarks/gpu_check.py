"""A short accelerator check: bf16 matmul peak, PMD steps against TRL GRPO, and GEAR / KIVI KV caches.

On the GPU host (one H100 / H200; torch with CUDA, transformers, peft, accelerate; offline; no weights):

    python benchmarks/gpu_check.py --prepare DIR     # here, with the framework's embedded SmolLM2:
                                                      # its tokenizer files (~4 MB) into DIR
    bash benchmarks/gpu_check.sh --assets DIR         # there: the check (under 8 min), tokenizer from DIR

    bash benchmarks/gpu_check.sh --shrink             # the same code paths on tiny shapes (~1 min on CPU)
    align bench gpu_check --quick                     # the same as --shrink

The wrapper installs any wheels in benchmarks/wheels/ (e.g. trl; --no-index --no-deps), sets the
hub's offline switches and runs this module. Results: benchmarks/results/gpu_check.json
(gpu_check.quick.json for --shrink, git-ignored like every benchmark's --quick results). Each part is
written as soon as it is measured, and each model size, contender and cache runs guarded: an error
is recorded in the JSON and the check goes on; a part that would start after --budget-s seconds is
skipped, so a run returns whatever it measured.

1. bf16 matmul peak: best of 3 timings of n x n bf16 matmuls (n = 8192 on GPU, 512 shrunk), in TFLOP/s.
2. PMD step loop against TRL GRPO at the same shapes, on random-weight models of real architectures:
   SmolLM2-135M's and a ~1B Llama (hidden 2048, 16 layers, SmolLM2's vocabulary so one tokenizer
   serves both); shrunk: one tiny Llama. Ours is trainers.pmd.PMDTrainer from
   configs/pmd_chain_sum.yaml as `pmd_vs_trl_grpo` builds it, on sum prompts written to a JSONL
   (no reasoning-gym needed), hf rollout backend: 8 prompts x 8 samples, 128 new tokens on GPU
   (2 x 8, 16 shrunk). Reported: median s/step after the warm-up steps, its phases (`time/rollout_s`,
   `time/train_s`, `time/sync_s`), peak GPU memory, and bf16 MFU: the FLOPs the step executes
   (`pmd_vs_trl_grpo.flops`: rollout forward, train forward and backward, the later mini-batches'
   old-log-prob forward) over step time and the peak of part 1. TRL: `pmd_vs_trl_grpo.run_trl`
   (GRPOTrainer, bf16 on GPU, same batch, num_generations and completion length, beta 0, one
   optimizer step per generation batch, exact-match reward) when trl and datasets import, with
   ours-x-faster; otherwise "not installed: <error>".
3. KV caches at long generations: the framework's HFEngine on the largest model, 32 prompts x 1024
   new tokens (4 x 64 shrunk) at temperature 1, uncompressed against KIVI 2-bit and GEAR 2-bit
   (`benchmarks.gear`'s settings): `Rollouts.kv_bytes`, tokens/s, tokens generated, and on CUDA the
   peak memory `generate` allocated above what was allocated before it. 32 x 1024 holds as many
   cached tokens as 16 x 2048 in half the decode steps: a decode step's time hardly depends on the
   rows on a GPU, and a compressed cache's decompression work grows with the square of the length.
4. Server mode (rollout.backend: vllm_server): trainer and one `align vllm-serve` server on the same
   device, on SmolLM2-135M's shapes (shrunk: a 2-layer Llama of head size 64, which vLLM's CPU attention
   takes), PMD steps as in part 2 with the weights pushed after every step over
   each transport vLLM allows there (nccl, then gloo; shrunk, on CPU: gloo), one server per transport
   (the backend is fixed at its start; `--gpu-memory-utilization 0.35` leaves the trainer room), with
   `rollout.max_staleness` 0, and 1 on the first transport that worked: median s/step and phases, or the
   error (NCCL refuses two ranks on one GPU: "Duplicate GPU detected", trl#3158). Needs vLLM there:
   "not installed: <error>" otherwise.

Random weights are valid here: time and memory depend on shapes, not values. Every step runs the
same kernels on the same tensor sizes whatever the weights hold, and the responses run to the token
limit (a random model almost never samples EOS: about 1 in 49152 per token), so the work per step is
fixed and known. What random weights cannot show (accuracy, learning) other benchmarks measure.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NamedTuple

if __package__ in (None, ""):  # run by path: the repo root importable, as `align bench` makes it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import _common as C
from benchmarks.gear import _spec as kv_compression_spec
from benchmarks.pmd_vs_trl_grpo import (build_ours_config, flops, old_logprob_passes, param_counts, run_trl,
                                        timed_steps)

NAME = "gpu_check"
TOKENIZER = "builtin:smollm2-135m-instruct"
VOCAB = 49152  # SmolLM2's tokenizer, shared by every model here
SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, rms_norm_eps=1e-5)
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128)
# vLLM's CPU attention takes head sizes of 32 and up (TINY's is 16): the shrunk server mode's model
TINY_HEAD_64 = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                    intermediate_size=256)
KV_CACHES = [("none", 0), ("kivi", 2), ("gear", 2)]


class Shapes(NamedTuple):  # not a dataclass: `align bench` runs this file unregistered in sys.modules
    matmul_n: int
    models: dict  # name -> LlamaConfig fields; the last one also serves part 3
    steps: int
    warmup: int  # steps left out of the timing
    prompts: int
    samples: int
    new_tokens: int
    kv_prompts: int
    kv_new_tokens: int
    server_model: tuple  # (name, LlamaConfig fields) of part 4


FULL = Shapes(8192, {"smollm2-135m": SMOLLM2_135M, "llama-1b": LLAMA_1B}, steps=5, warmup=2,
              prompts=8, samples=8, new_tokens=128, kv_prompts=32, kv_new_tokens=1024,
              server_model=("smollm2-135m", SMOLLM2_135M))
SHRINK = Shapes(512, {"tiny": TINY}, steps=2, warmup=1, prompts=2, samples=8, new_tokens=16,
                kv_prompts=4, kv_new_tokens=64, server_model=("tiny-head-64", TINY_HEAD_64))


# ---- set-up -------------------------------------------------------------------------------------
def load_tokenizer(assets: str | None):
    """SmolLM2's tokenizer: from `--assets DIR` (prepared elsewhere), else the embedded checkpoint."""
    from transformers import AutoTokenizer

    from alignment.models import resolve_path, with_pad_token

    return with_pad_token(AutoTokenizer.from_pretrained(assets or resolve_path(TOKENIZER)))


def prepare(folder: str) -> None:
    """Save the tokenizer files the GPU host needs (it lacks the embedded checkpoint) into `folder`."""
    load_tokenizer(None).save_pretrained(folder)
    size = sum(p.stat().st_size for p in Path(folder).iterdir())
    print(f"wrote the tokenizer to {folder} ({size / 2**20:.1f} MiB); on the GPU host: "
          f"bash benchmarks/gpu_check.sh --assets {folder}")


def random_model(fields: dict, tokenizer, device: torch.device):
    """A randomly initialised fp32 Llama with `fields` and SmolLM2's vocabulary, on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**fields, vocab_size=VOCAB, tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 1B model's init takes seconds on CPU
        return LlamaForCausalLM(config)


def save_random_model(fields: dict, tokenizer, folder: Path, device: torch.device) -> Path:
    """`random_model` saved with the tokenizer as a model folder (what the trainers load)."""
    # bf16 halves the bytes written; the loaders upcast to fp32
    random_model(fields, tokenizer, device).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_sum_prompts(path: Path, count: int = 256) -> Path:
    """Chain-sum-like prompts with answers; the recipe's prompt suffix adds " Reply with just the number."."""
    rng = random.Random(0)
    rows = []
    for _ in range(count):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        rows.append({"prompt": f"What is {a} + {b}?", "answer": a + b})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Guard:
    """Runs each unit of the check: its exception, or a spent time budget, becomes a note in the JSON
    instead of ending the run (a GPU run returns whatever it measured)."""

    def __init__(self, budget_s: float, device: torch.device):
        self.deadline = time.perf_counter() + budget_s
        self.device = device

    def __call__(self, fn, *args, **kwargs) -> dict:
        if time.perf_counter() > self.deadline:
            return {"skipped": "time budget spent (--budget-s)"}
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of one unit is a result, not the end
            traceback.print_exc()
            return {"error": f"{type(e).__name__}: {e}"}
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> int | None:
    """Start a peak-memory window; returns the bytes allocated now (None on CPU)."""
    if device.type != "cuda":
        return None
    C.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_allocated(device: torch.device) -> int | None:
    """The most bytes allocated since `reset_peak_memory` (None on CPU)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


# ---- 2. PMD against TRL GRPO --------------------------------------------------------------------
def ours_overrides(model: Path, data: Path, shapes: Shapes) -> tuple[str, ...]:
    return (f"model.path={model}", "data.source=file", f"data.path={data}", f"train.batch_size={shapes.prompts}",
            f"rollout.n={shapes.samples}", f"rollout.max_new_tokens={shapes.new_tokens}")


def run_ours(model: Path, data: Path, shapes: Shapes, device: torch.device, peak_tflops: float) -> dict:
    from alignment.adapters import hf_model

    with tempfile.TemporaryDirectory(prefix="gpu_check_pmd_") as out:
        trainer_cls, cfg = build_ours_config(shapes.steps, 0, out, extra=ours_overrides(model, data, shapes))
        trainer = trainer_cls(cfg)
        params = param_counts(hf_model(trainer.model))
        trainer.sync_weights()
        reset_peak_memory(device)
        rows = timed_steps(trainer, shapes.steps, "ours", lambda: C.synchronize(device))
        peak = peak_allocated(device)  # weights, optimizer state and the step's activations
        del trainer
    stats = C.summarize([r["seconds"] for r in rows], shapes.warmup)
    step_s, steady = stats["median_s"], rows[shapes.warmup:]
    tokens, completion = (statistics.fmean(r[k] for r in steady) for k in ("decoder_tokens", "completion_tokens"))
    executed = flops(params, tokens, completion, 1 + 3 + old_logprob_passes(cfg))  # rollout, train, old log-probs
    return {"params": params, "step_s": step_s, **stats,
            "phases_median_s": {k: statistics.median(r[k] for r in steady) for k in ("rollout_s", "train_s", "sync_s")},
            "decoder_tokens_per_step": tokens, "completion_tokens_per_step": completion,
            "executed_flops_per_step": executed, "achieved_tflops": executed / step_s / 1e12,
            "bf16_mfu": executed / step_s / (peak_tflops * 1e12), "peak_alloc_bytes": peak, "per_step": rows}


class SkipEval:
    """`run_trl`'s held-out evaluator, skipped: this check times steps only."""

    last_number_accuracy, last_correct = None, []

    def __call__(self, model):
        return None


def run_trl_same_shapes(model: Path, data: Path, shapes: Shapes, device: torch.device) -> dict | str:
    try:
        import datasets  # noqa: F401 - run_trl builds its prompts with it
        import trl  # noqa: F401
    except ImportError as e:
        return f"not installed: {e}"
    from alignment.data import load_prompts
    from alignment.models import load_tokenizer as recipe_tokenizer

    extra = ours_overrides(model, data, shapes)
    _, cfg = build_ours_config(shapes.steps, 0, tempfile.gettempdir(), extra=extra)
    train_set, _ = load_prompts(cfg.data, cfg.seed)
    cuda = device.type == "cuda"
    run = run_trl(cuda, shapes.steps, train_set, str(model), recipe_tokenizer(cfg.model), SkipEval(),
                  per_device_train_batch_size=shapes.prompts * shapes.samples, num_generations=shapes.samples,
                  max_completion_length=shapes.new_tokens, use_cpu=not cuda)
    stats = C.summarize(run["times"], shapes.warmup)
    return {"step_s": stats["median_s"], **stats,
            # TRL's callbacks read the clock without a CUDA synchronize; the cadence (step end to step
            # end) holds all the work
            "cadence_median_s": statistics.median(run["cadence_s"][shapes.warmup:] or run["cadence_s"]),
            "config": run["config"], "step_times_s": run["times"]}


def compare_at_size(fields: dict, tokenizer, data: Path, folder: Path, shapes: Shapes, device: torch.device,
                    peak_tflops: float, guard: Guard) -> dict:
    save_random_model(fields, tokenizer, folder, device)
    ours = guard(run_ours, folder, data, shapes, device, peak_tflops)
    trl = guard(run_trl_same_shapes, folder, data, shapes, device)
    result = {"config": fields, "ours": ours, "trl": trl}
    if isinstance(trl, dict) and "step_s" in trl and "step_s" in ours:
        result["ours_x_faster"] = trl["step_s"] / ours["step_s"]
    return result


# ---- 3. KV caches -------------------------------------------------------------------------------
def measure_cache(model, tokenizer, prompts: list[list[int]], spec, new_tokens: int, device: torch.device) -> dict:
    from alignment.rollout import SamplingParams
    from alignment.rollout.hf import HFEngine

    engine = HFEngine(model, tokenizer, kv_compression=spec)
    engine.generate(prompts[:2], SamplingParams(n=1, max_new_tokens=8, seed=1))  # warm-up: kernels, allocator
    start = reset_peak_memory(device)
    t = time.perf_counter()
    rollouts = engine.generate(prompts, SamplingParams(n=1, max_new_tokens=new_tokens, temperature=1.0, seed=3))
    C.synchronize(device)
    seconds = time.perf_counter() - t
    tokens = sum(len(r) for r in rollouts.response_ids)
    return {"spec": vars(spec), "kv_bytes": rollouts.kv_bytes,
            "peak_alloc_bytes": None if start is None else peak_allocated(device) - start, "tokens": tokens,
            "stopped_at_eos": rollouts.finish_reasons.count("stop"), "seconds": seconds,
            "tokens_per_s": tokens / seconds}


def compare_caches(fields: dict, tokenizer, shapes: Shapes, device: torch.device, quick: bool, guard: Guard) -> dict:
    from alignment.data import encode_prompt

    model = random_model(fields, tokenizer, device)
    prompts = [encode_prompt(tokenizer, f"Write a long story about journey number {i}.", True)
               for i in range(shapes.kv_prompts)]
    caches = {}
    for kind, bits in KV_CACHES:
        spec = kv_compression_spec(kind, bits, {}, quick)  # benchmarks/gear.py's settings
        caches["none" if kind == "none" else f"{kind}-{bits}"] = guard(
            measure_cache, model, tokenizer, prompts, spec, shapes.kv_new_tokens, device)
    none = caches["none"]
    for cache in caches.values():
        if "kv_bytes" in cache and "kv_bytes" in none:
            cache["kv_bytes_over_none"] = cache["kv_bytes"] / none["kv_bytes"]
            if cache["peak_alloc_bytes"] is not None and none["peak_alloc_bytes"]:
                cache["peak_alloc_over_none"] = cache["peak_alloc_bytes"] / none["peak_alloc_bytes"]
    return {"prompts": shapes.kv_prompts, "new_tokens": shapes.kv_new_tokens, "caches": caches}


# ---- 4. server mode ------------------------------------------------------------------------------
def server_mode(fields: dict, tokenizer, data: Path, folder: Path, shapes: Shapes, device: torch.device,
                guard: Guard) -> dict:
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        return {"skipped": f"not installed: {e}"}
    from alignment.rollout.server import launch_local_server, stop_local_server
    from benchmarks.pmd_phases import server_steps

    model = save_random_model(fields, tokenizer, folder, device)
    overrides = ours_overrides(model, data, shapes)
    cuda = device.type == "cuda"
    results: dict = {}
    for transport in ("nccl", "gloo") if cuda else ("gloo",):
        backend = ["--weight-transfer-config", json.dumps({"backend": transport})]

        def run(staleness: int, url: str) -> dict:
            rows = server_steps(url, shapes.steps, str(folder / f"run-{transport}-{staleness}"), staleness,
                                (*overrides, f"rollout.server.transport={transport}"))
            steady = rows[shapes.warmup:]
            return {"step_s": statistics.median(r["seconds"] for r in steady),
                    **{k: statistics.median(r[k] for r in steady) for k in ("rollout_s", "train_s", "sync_s")},
                    "staleness": statistics.fmean(r["staleness"] for r in steady), "per_step": rows}

        def on_server(stalenesses: tuple[int, ...]) -> dict:
            proc, url = launch_local_server(str(model), folder / f"server-{transport}.log", extra=(
                *backend, *(["--gpu-memory-utilization", "0.35", "--enforce-eager"] if cuda else [])))
            try:
                return {f"max_staleness_{k}": guard(run, k, url) for k in stalenesses}
            finally:
                stop_local_server(proc)

        first_to_work = not any("step_s" in r.get("max_staleness_0", {}) for r in results.values())
        results[transport] = guard(on_server, (0, 1) if first_to_work else (0,))
    return results


# ---- report -------------------------------------------------------------------------------------
def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def mib(n_bytes: int | None) -> float | None:
    return None if n_bytes is None else n_bytes / 2**20


def note(*units) -> str:
    """The first error or skip among `units` (dicts, or TRL's "not installed: ..." string)."""
    for unit in units:
        if isinstance(unit, str):
            return unit
        if unit.get("error") or unit.get("skipped"):
            return unit.get("error") or unit.get("skipped")
    return ""


def print_comparisons(comparisons: dict) -> None:
    rows = []
    for name, c in comparisons.items():
        ours, trl = c.get("ours", {}), c.get("trl", {})
        phases = ours.get("phases_median_s", {})
        rows.append([name, _fmt(ours.get("params", {}).get("total"), ".3g"), _fmt(ours.get("step_s")),
                     _fmt(phases.get("rollout_s")), _fmt(phases.get("train_s")), _fmt(phases.get("sync_s")),
                     _fmt(ours.get("bf16_mfu"), ".1%"), _fmt(trl.get("step_s") if isinstance(trl, dict) else None),
                     _fmt(c.get("ours_x_faster")), note(c, ours, trl)])
    print(C.table(rows, ["model", "params", "ours s/step", "rollout s", "train s", "sync s", "bf16 MFU",
                         "trl s/step", "ours x faster", "note"]))


def print_server_mode(server: dict) -> None:
    rows = []
    for transport, runs in server.items():
        if not isinstance(runs, dict) or "error" in runs or "skipped" in runs:
            rows.append([transport, "-", "-", "-", "-", "-", note(runs) if isinstance(runs, dict) else str(runs)])
            continue
        for name, r in runs.items():
            rows.append([transport, name.rsplit("_", 1)[1], _fmt(r.get("step_s")), _fmt(r.get("rollout_s")),
                         _fmt(r.get("train_s")), _fmt(r.get("sync_s")), note(r)])
    print(C.table(rows, ["transport", "max_staleness", "s/step", "rollout s", "train s", "sync s", "note"]))


def print_caches(kv: dict) -> None:
    rows = []
    for name, c in kv.get("caches", {}).items():
        rows.append([name, _fmt(mib(c.get("kv_bytes")), ".2f"), _fmt(c.get("kv_bytes_over_none"), ".3f"),
                     _fmt(mib(c.get("peak_alloc_bytes")), ".1f"), c.get("tokens", "-"),
                     _fmt(c.get("tokens_per_s"), ".1f"), note(c)])
    print(C.table(rows, ["cache", "kv MiB", "kv / none", "peak MiB", "tokens", "tokens/s", "note"]))


def main(quick: bool = False, assets: str | None = None, budget_s: float = 360.0) -> dict:
    """`quick`: the shrunk check (tiny shapes); `assets`: a folder from --prepare with the tokenizer."""
    cuda = torch.cuda.is_available()
    if not quick and not cuda:
        raise SystemExit("gpu_check: no CUDA device; the full check needs a GPU (--shrink runs it on CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    C.quiet_torch(torch.get_num_threads())
    shapes = SHRINK if quick else FULL
    guard = Guard(budget_s, device)
    tokenizer = load_tokenizer(assets)
    result = {**C.run_info(f"{NAME}{' --shrink' if quick else ''}", quick, "peft", "accelerate", "trl", "datasets"),
              "device": torch.cuda.get_device_name(device) if cuda else "cpu", "shapes": shapes._asdict()}

    def save() -> Path:
        return C.write_results(NAME + (".quick" if quick else ""), result)

    peak = C.matmul_peak_tflops(torch.bfloat16, shapes.matmul_n, device=device)
    result["matmul_bf16"] = {"n": shapes.matmul_n, "tflops": peak}
    save()
    print(f"\n1. bf16 matmul peak ({result['device']}, {shapes.matmul_n}^3): {peak:.2f} TFLOP/s", flush=True)

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        data = write_sum_prompts(Path(tmp) / "prompts.jsonl")
        comparisons = result["pmd_vs_trl"] = {}
        for name, fields in shapes.models.items():
            print(f"\n2. PMD vs TRL GRPO, random {name}: {shapes.prompts} prompts x {shapes.samples} samples, "
                  f"{shapes.new_tokens} new tokens", flush=True)
            comparisons[name] = guard(compare_at_size, fields, tokenizer, data, Path(tmp) / name, shapes, device,
                                      peak, guard)
            save()
        print_comparisons(comparisons)

        largest, fields = list(shapes.models.items())[-1]
        print(f"\n3. KV caches, random {largest}: {shapes.kv_prompts} prompts x {shapes.kv_new_tokens} new tokens",
              flush=True)
        result["kv_cache"] = {"model": largest, **guard(compare_caches, fields, tokenizer, shapes, device, quick, guard)}
        print_caches(result["kv_cache"])
        save()

        name, fields = shapes.server_model
        print(f"\n4. server mode, random {name}: trainer and a vLLM server on one {device.type} device", flush=True)
        result["server_mode"] = {"model": name, **guard(server_mode, fields, tokenizer, data,
                                                        Path(tmp) / "server", shapes, device, guard)}
        print_server_mode({k: v for k, v in result["server_mode"].items() if k != "model"})
    path = save()
    print(f"\nwrote {path}")
    return result


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--shrink", action="store_true", help="tiny shapes: the same code paths in about a minute")
    parser.add_argument("--assets", metavar="DIR", help="tokenizer folder written by --prepare")
    parser.add_argument("--prepare", metavar="DIR", help="write the tokenizer files into DIR and exit")
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="start no model size, contender or cache after this many seconds (default 360)")
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.prepare)
    else:
        main(quick=args.shrink, assets=args.assets, budget_s=args.budget_s)


if __name__ == "__main__":
    cli()
