"""R^3M's overhead: step time of R^3M against plain Bradley-Terry / sigmoid DPO on the same model and data.

    align bench r3m_overhead            # reward model 30 steps + DPO 8 steps per loss (~8 min on 2 cores)
    align bench r3m_overhead --quick    # 4 + 2 steps (smoke check)

The paper says the overhead is negligible: the closed-form outlier step is one elementwise op on
the batch's margins. Both losses train side by side in this process, their steps interleaved
(bt, r3m, bt, r3m, ...) so machine drift hits both alike; each contender's figure is the median of
its step times after 2 warm-up steps.
  - reward model: all-MiniLM-L6-v2 (embedded), the HHH pairs, batch 16, max length 128, bf16 autocast.
  - DPO: SmolLM2-135M-Instruct (embedded) with LoRA r=16, the HHH pairs, batch 4, max length 256.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from benchmarks import _common as C

ROOT = C.ROOT

NAME = "r3m_overhead"
THREADS = 2


def _trainer(trainer: str, loss: str, folder: str):
    from alignment.config import load_config
    from trainers import get_trainer

    common = {"trainer": trainer, "output_dir": folder, "data": {"path": str(ROOT / "data/hhh/hhh_pairs.json")}}
    if trainer == "reward_model":
        values = {**common, "model": {"path": "builtin:all-minilm-l6-v2"},
                  "rm": {"loss": loss, "lam": 0.75, "max_length": 128},
                  "train": {"batch_size": 16, "lr": 5e-5, "max_steps": 1000}}
    else:
        values = {**common, "model": {"path": "builtin:smollm2-135m-instruct"},
                  "dpo": {"loss": loss, "beta": 0.1, "lam": 0.75, "max_length": 256},
                  "peft": {"type": "lora", "r": 16, "alpha": 32},
                  "train": {"batch_size": 4, "lr": 5e-5, "max_steps": 1000}}
    cls = get_trainer(trainer)
    return cls(load_config(cls.config_class, values))


def _race(trainer: str, losses: tuple[str, str], steps: int, warmup: int = 2) -> dict:
    times: dict[str, list[float]] = {loss: [] for loss in losses}
    outliers: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        contenders = {loss: _trainer(trainer, loss, f"{tmp}/{loss}") for loss in losses}
        for step in range(steps):
            for loss, t in contenders.items():
                start = time.perf_counter()
                metrics = t.step(step)
                times[loss].append(time.perf_counter() - start)
                if loss == "r3m":
                    outliers.append(metrics["r3m/outlier_frac"])
    out = {loss: {"median_s": statistics.median(ts[warmup:]), "mean_s": statistics.fmean(ts[warmup:]),
                  "steps_timed": len(ts[warmup:]), "times_s": ts} for loss, ts in times.items()}
    base = out[losses[0]]["median_s"]
    out["r3m_over_base"] = out["r3m"]["median_s"] / base
    out["r3m_outlier_frac_mean"] = statistics.fmean(outliers)
    print(f"  {trainer:12s} {losses[0]} {base:.3f} s/step, r3m {out['r3m']['median_s']:.3f} s/step: "
          f"ratio {out['r3m_over_base']:.3f}", flush=True)
    return out


def main(quick: bool = False) -> dict:
    torch.set_num_threads(THREADS)
    rm_steps, dpo_steps = (4, 3) if quick else (30, 8)
    print("R^3M overhead (interleaved steps, medians after 2 warm-up steps)", flush=True)
    results = {"reward_model": _race("reward_model", ("bt", "r3m"), rm_steps),
               "dpo": _race("dpo", ("sigmoid", "r3m"), dpo_steps)}
    rows = [[name, base, f"{r[base]['median_s']:.3f}", f"{r['r3m']['median_s']:.3f}", f"{r['r3m_over_base']:.3f}",
             f"{r['r3m_outlier_frac_mean']:.3f}"]
            for name, base, r in (("reward_model", "bt", results["reward_model"]), ("dpo", "sigmoid", results["dpo"]))]
    print(C.table(rows, ["trainer", "baseline", "baseline s/step", "r3m s/step", "r3m / baseline", "r3m outlier frac"]))
    data = {"quick": quick, "threads": THREADS, "machine": C.machine_info(),
            "versions": C.versions("torch", "transformers", "peft"), "git": C.git_state(ROOT), "results": results}
    written = C.write_results(NAME + (".quick" if quick else ""), data)
    print(f"results: {written}")
    return data
