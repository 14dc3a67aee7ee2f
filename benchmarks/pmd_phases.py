"""Where one PMD step's time goes, on the workload of `pmd_vs_trl_grpo` (ours only, no peer).

    align bench pmd_phases            # 12 steps, medians of steps 3..12 (~1.5 min on 2 cores)
    align bench pmd_phases --quick    # 4 steps (smoke check)
    align bench pmd_phases train.mini_batches=1   # KEY=VALUE overrides of the recipe: one lever at a time

A quick A/B for one speed lever at a time: run it on two commits and compare the phases. Reports
the step and its phases as the trainer times them (`time/rollout_s` includes the reward,
`time/train_s` the old log-prob forward, both mini-batch updates and their optimizer steps,
`time/sync_s` the verified weight sync), the engine's `generate` alone, its decode cost per token
(generate time over the longest response, so prefill included), and the matmul peak of the run's
precision (bf16 where the CPU has bf16 units, else fp32: `train.bf16: auto`) measured in the same run
with the step's bound (executed FLOPs / peak, as `pmd_vs_trl_grpo` counts them),
and the roofline bound: that plus the bytes the memory-bound work moves (decode steps, AdamW, the
sync: `memory_bytes`) over the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import statistics
import tempfile

import torch

from benchmarks import _common as C
from benchmarks.pmd_vs_trl_grpo import (THREADS, build_ours_config, flops, memory_bytes, old_logprob_passes,
                                        param_counts, timed_steps)

NAME = "pmd_phases"


def main(quick: bool = False, overrides: tuple[str, ...] = ()) -> dict:
    from alignment.adapters import hf_model

    C.quiet_torch(THREADS)
    steps, warmup = (4, 2) if quick else (12, 2)
    command = C.bench_command(NAME, quick, overrides)
    with tempfile.TemporaryDirectory(prefix="bench_phases_") as tmp:
        trainer_cls, cfg = build_ours_config(steps, 16, tmp, extra=tuple(overrides))
        trainer = trainer_cls(cfg)
        precision = trainer.precision.name
        peak = C.matmul_peak_tflops(torch.bfloat16 if trainer.precision.bf16 else torch.float32)
        bandwidth = C.memory_bandwidth_gbs()
        params = param_counts(hf_model(trainer.model))
        trainer.sync_weights()
        rows = timed_steps(trainer, steps, NAME)
    steady = rows[warmup:]
    phases = {k: statistics.median(r[k] for r in steady) for k in ("rollout_s", "generate_s", "train_s", "sync_s")}
    phases["step_s"] = statistics.median(r["seconds"] for r in steady)
    phases["decode_ms_per_token"] = 1000 * statistics.median(r["generate_s"] / r["decode_steps"] for r in steady)
    tokens, completion = (statistics.fmean(r[k] for r in steady) for k in ("decoder_tokens", "completion_tokens"))
    executed = flops(params, tokens, completion, 1 + 3 + old_logprob_passes(cfg))  # rollout, train, old log-probs
    bound_s = executed / (peak * 1e12)
    moved = memory_bytes(params, statistics.fmean(r["decode_steps"] for r in steady), cfg.train.mini_batches)
    roofline_s = bound_s + moved / (bandwidth * 1e9)
    print(C.table([[f"{phases['step_s']:.2f}", f"{phases['rollout_s']:.2f}", f"{phases['generate_s']:.2f}",
                    f"{phases['decode_ms_per_token']:.1f}", f"{phases['train_s']:.2f}", f"{phases['sync_s']:.2f}",
                    f"{peak:.2f}", f"{bound_s:.2f}", f"{phases['step_s'] / bound_s:.1f}x", f"{bandwidth:.1f}",
                    f"{roofline_s:.2f}", f"{phases['step_s'] / roofline_s:.1f}x"]],
                  ["step s", "rollout s", "generate s", "decode ms/token", "train s", "sync s",
                   f"{precision} peak TFLOP/s", f"{precision} bound s", "step / bound", "copy GB/s", "roofline s", "step / roofline"]))
    result = {**C.run_info(command, quick), "overrides": list(overrides), "steps": steps, "warmup_steps_excluded": warmup,
              "phases_median": phases, "precision": precision, "matmul_peak_tflops": peak,
              "executed_flops_per_step": executed, "bound_s": bound_s, "step_over_bound": phases["step_s"] / bound_s, "copy_gbs": bandwidth,
              "memory_bytes_per_step": moved, "roofline_bound_s": roofline_s,
              "step_over_roofline_bound": phases["step_s"] / roofline_s, "per_step": rows}
    path = C.write_results(NAME + (".quick" if quick else ""), result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main(**C.script_args())
