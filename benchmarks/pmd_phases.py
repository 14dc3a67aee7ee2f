"""Where one PMD step's time goes, on the workload of `pmd_vs_trl_grpo` (ours only, no peer).

    align bench pmd_phases            # 12 steps, medians of steps 3..12 (~1.5 min on 2 cores)
    align bench pmd_phases --quick    # 4 steps (smoke check)
    align bench pmd_phases train.mini_batches=1   # KEY=VALUE overrides of the recipe: one lever at a time

A quick A/B for one speed lever at a time: run it on two commits and compare the phases. Reports
the step and its phases as the trainer times them (`time/rollout_s` includes the reward,
`time/train_s` the old log-prob forward, both mini-batch updates and their optimizer steps,
`time/sync_s` the verified weight sync), the engine's `generate` alone, its decode cost per token
(generate time over the longest response, so prefill included), and the bf16 matmul peak measured
in the same run with the step's bf16 bound (executed FLOPs / peak, as `pmd_vs_trl_grpo` counts them),
and the roofline bound: that plus the bytes the memory-bound work moves (decode steps, AdamW, the
sync: `memory_bytes`) over the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

import torch

from benchmarks import _common as C
from benchmarks.pmd_vs_trl_grpo import (THREADS, build_ours_config, decoder_tokens, flops, memory_bytes,
                                        old_logprob_passes, param_counts)

NAME = "pmd_phases"


def main(quick: bool = False, overrides: tuple[str, ...] = ()) -> dict:
    from alignment.adapters import hf_model

    C.quiet_torch(THREADS)
    steps, warmup = (4, 2) if quick else (12, 2)
    command = " ".join([f"align bench {NAME}", *(["--quick"] if quick else []), *overrides])
    peak, bandwidth = C.matmul_peak_tflops(torch.bfloat16), C.memory_bandwidth_gbs()
    with tempfile.TemporaryDirectory(prefix="bench_phases_") as tmp:
        trainer_cls, cfg = build_ours_config(steps, 16, tmp, extra=tuple(overrides))
        trainer = trainer_cls(cfg)
        params = param_counts(hf_model(trainer.model))
        trainer.sync_weights()
        generate, rows = trainer.engine.generate, []

        def timed_generate(*args, **kwargs):
            t = time.perf_counter()
            out = generate(*args, **kwargs)
            rows[-1].update(generate_s=time.perf_counter() - t, longest=max(len(r) for r in out.response_ids),
                            tokens=decoder_tokens(out),
                            completion=sum(len(r) for r in out.response_ids))
            return out

        trainer.engine.generate = timed_generate
        for s in range(steps):
            rows.append({})
            t = time.perf_counter()
            metrics = trainer.step(s)
            rows[-1].update(step_s=time.perf_counter() - t, rollout_s=metrics["time/rollout_s"],
                            train_s=metrics["time/train_s"], sync_s=metrics["time/sync_s"])
            print(f"  step {s + 1}/{steps}: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1].items()
                                                          if k.endswith("_s")), flush=True)
    steady = rows[warmup:]
    phases = {k: statistics.median(r[k] for r in steady)
              for k in ("step_s", "rollout_s", "generate_s", "train_s", "sync_s")}
    phases["decode_ms_per_token"] = 1000 * statistics.median(r["generate_s"] / r["longest"] for r in steady)
    tokens, completion = (statistics.fmean(r[k] for r in steady) for k in ("tokens", "completion"))
    executed = flops(params, tokens, completion, 1 + 3 + old_logprob_passes(cfg))  # rollout, train, old log-probs
    bound_s = executed / (peak * 1e12)
    moved = memory_bytes(params, statistics.fmean(r["longest"] for r in steady), cfg.train.mini_batches)
    roofline_s = bound_s + moved / (bandwidth * 1e9)
    print(C.table([[f"{phases['step_s']:.2f}", f"{phases['rollout_s']:.2f}", f"{phases['generate_s']:.2f}",
                    f"{phases['decode_ms_per_token']:.1f}", f"{phases['train_s']:.2f}", f"{phases['sync_s']:.2f}",
                    f"{peak:.2f}", f"{bound_s:.2f}", f"{phases['step_s'] / bound_s:.1f}x", f"{bandwidth:.1f}",
                    f"{roofline_s:.2f}", f"{phases['step_s'] / roofline_s:.1f}x"]],
                  ["step s", "rollout s", "generate s", "decode ms/token", "train s", "sync s",
                   "bf16 peak TFLOP/s", "bf16 bound s", "step / bound", "copy GB/s", "roofline s", "step / roofline"]))
    result = {**C.run_info(command, quick), "overrides": list(overrides), "steps": steps, "warmup_steps_excluded": warmup,
              "phases_median": phases, "bf16_peak_tflops": peak, "executed_flops_per_step": executed,
              "bf16_bound_s": bound_s, "step_over_bound": phases["step_s"] / bound_s, "copy_gbs": bandwidth,
              "memory_bytes_per_step": moved, "roofline_bound_s": roofline_s,
              "step_over_roofline_bound": phases["step_s"] / roofline_s, "per_step": rows}
    path = C.write_results(NAME + (".quick" if quick else ""), result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main(quick="--quick" in sys.argv, overrides=tuple(a for a in sys.argv[1:] if a != "--quick"))
