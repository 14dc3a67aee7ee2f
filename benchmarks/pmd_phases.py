"""Where one PMD step's time goes, on the workload of `pmd_vs_trl_grpo` (ours only, no peer).

    align bench pmd_phases            # 12 steps, medians of steps 3..12 (~1.5 min on 2 cores)
    align bench pmd_phases --quick    # 4 steps (smoke check)
    align bench pmd_phases train.mini_batches=1   # KEY=VALUE overrides of the recipe: one lever at a time

    align bench pmd_phases rollout.backend=vllm_server   # server mode: max_staleness 0 against 1

Server mode starts one vLLM server (`align vllm-serve` on the benchmark's model, weights pushed over the
default transport: gloo on CPU; `rollout.server.transport=disk` to compare) and runs the workload twice on it, synchronous (`rollout.max_staleness: 0`) and
overlapped (`1`: the next step's rollouts generate while this one trains), both with the engine's old
log-probs (`train.old_logprobs: rollout`, which 1 requires), and reports each one's step time and phases
(`time/rollout_s` is then the wait for the batch) and their ratio. With server and trainer on the same
few CPU cores it shows that the overlap works, not what separate GPUs gain.

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
import time
from pathlib import Path

import torch

from alignment.rollout.server import launch_local_server, stop_local_server
from benchmarks import _common as C
from benchmarks.pmd_vs_trl_grpo import (THREADS, build_ours_config, flops, memory_bytes, old_logprob_passes,
                                        param_counts, timed_steps)

NAME = "pmd_phases"


def main(quick: bool = False, overrides: tuple[str, ...] = ()) -> dict:
    from alignment.adapters import hf_model

    C.quiet_torch(THREADS)
    if "rollout.backend=vllm_server" in overrides:
        return main_server(quick, overrides)
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


# ---- server mode: rollout.max_staleness 0 against 1 on one vLLM server ------------------------------

def server_steps(url: str, steps: int, folder: str, staleness: int, overrides: tuple[str, ...]) -> list[dict]:
    """`steps` trainer steps on the server with rollout.max_staleness=`staleness`, one row each (also
    gpu_check's server mode)."""
    trainer_cls, cfg = build_ours_config(steps, 16, folder, extra=(
        *overrides, "rollout.backend=vllm_server", f"rollout.server.urls=[{url}]", "train.old_logprobs=rollout",
        f"rollout.max_staleness={staleness}"))
    trainer = trainer_cls(cfg)
    trainer.start_step = 0
    trainer.start()  # the trainer's weights pushed (step-0)
    rows = []
    for s in range(steps):
        t = time.perf_counter()
        metrics = trainer.step(s)
        row = {"step": s + 1, "seconds": time.perf_counter() - t, "reward_mean": metrics["reward/mean"],
               "loss": metrics.get("loss"), "rollout_s": metrics["time/rollout_s"],
               "train_s": metrics["time/train_s"], "sync_s": metrics["time/sync_s"],
               "staleness": metrics["rollout/staleness"], "staleness_max": metrics["rollout/staleness_max"]}
        rows.append(row)
        print(f"  max_staleness={staleness} step {s + 1}/{steps}: {row['seconds']:.2f} s  reward "
              f"{row['reward_mean']:+.3f}  (rollout/wait {row['rollout_s']:.2f} s, train {row['train_s']:.2f} s, "
              f"sync {row['sync_s']:.2f} s, staleness {row['staleness']:.2f})", flush=True)
    return rows


def main_server(quick: bool, overrides: tuple[str, ...]) -> dict:
    from alignment.models import resolve_path

    steps, warmup = (4, 1) if quick else (10, 2)
    command = C.bench_command(NAME, quick, overrides)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench_phases_server_") as tmp:
        _, cfg = build_ours_config(steps, 16, tmp, extra=tuple(overrides) + ("rollout.server.urls=[http://x]",))
        proc, url = launch_local_server(resolve_path(cfg.model.path), Path(tmp) / "server.log")
        try:
            for staleness in (0, 1):
                runs[staleness] = server_steps(url, steps, str(Path(tmp) / f"run-{staleness}"), staleness, overrides)
        finally:
            stop_local_server(proc)
    medians = {staleness: {k: statistics.median(r[k] for r in rows[warmup:])
                           for k in ("seconds", "rollout_s", "train_s", "sync_s", "staleness")}
               for staleness, rows in runs.items()}
    speedup = medians[0]["seconds"] / medians[1]["seconds"]
    print(C.table([[str(k), f"{m['seconds']:.2f}", f"{m['rollout_s']:.2f}", f"{m['train_s']:.2f}", f"{m['sync_s']:.2f}",
                    f"{m['staleness']:.2f}"] for k, m in medians.items()],
                  ["max_staleness", "step s", "rollout (wait) s", "train s", "sync s", "staleness"]))
    print(f"step time, max_staleness 0 / 1: {speedup:.2f}x")
    result = {**C.run_info(command, quick), "overrides": list(overrides), "mode": "vllm_server", "steps": steps,
              "warmup_steps_excluded": warmup, "median": {str(k): m for k, m in medians.items()},
              "step_s_staleness_0_over_1": speedup, "per_step": {str(k): rows for k, rows in runs.items()}}
    path = C.write_results(NAME + ".server" + (".quick" if quick else ""), result)
    print(f"wrote {path}")
    return result
