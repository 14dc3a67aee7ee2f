"""Self-Rewarding PPO from demonstrations only, on the embedded SmolLM2-135M-Instruct.

    align bench sr_ppo_demo [--quick]

The recipe configs/sr_ppo_smollm2.yaml end to end: SFT of the base model on 32 demonstrations of
reasoning-gym chain_sum (question -> the number), then SR-PPO on prompts of the same task that the
demonstrations never showed, rewarded only by log pi_SFT(y|x) - log pi_base(y|x). The three models
(base, SFT, SR-PPO) are scored the same way on the same held-out problems: greedy decoding, answer
checked by reasoning-gym (`GreedyEval` of the PMD benchmark). Also recorded: the reward (log-ratio)
and response length over the SR-PPO steps, so length hacking would show.
"""

from __future__ import annotations

import tempfile
import time

import torch

from benchmarks import _common as C
from benchmarks.pmd_vs_trl_grpo import GreedyEval

NAME = "sr_ppo_demo"
CONFIG = C.ROOT / "configs" / "sr_ppo_smollm2.yaml"
THREADS = 2


def main(quick: bool = False) -> dict:
    from transformers import AutoModelForCausalLM

    from align.cli import build_config
    from alignment.data import load_prompts
    from alignment.logging import read_metrics
    from alignment.models import load_tokenizer, resolve_path

    C.quiet_torch(THREADS)
    steps, eval_size = (2, 8) if quick else (30, 64)
    command = C.bench_command(NAME, quick)
    print(f"{command}: {CONFIG.name}, {steps} SR-PPO steps, {eval_size} held-out problems", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_srppo_") as out:
        overrides = [f"output_dir={out}", f"train.max_steps={steps}", f"data.eval_size={eval_size}",
                     f"sft.data.eval_size={eval_size}", "train.save_every=0", "train.eval_every=0"]
        if quick:
            overrides += ["sft.epochs=0.25"]
        trainer_cls, cfg = build_config(str(CONFIG), overrides)
        tokenizer = load_tokenizer(cfg.model)
        _, held_out = load_prompts(cfg.data, cfg.seed)
        evaluator = GreedyEval(resolve_path(cfg.model.path), tokenizer, held_out, cfg.rollout.max_new_tokens)
        accuracy = {"base": evaluator(evaluator.engine.model)}
        print(f"base model: held-out accuracy {accuracy['base']:.3f}", flush=True)

        t0 = time.perf_counter()
        trainer = trainer_cls(cfg)  # stage 1 (SFT) runs here
        sft_s = time.perf_counter() - t0
        sft_model = AutoModelForCausalLM.from_pretrained(trainer.sft_path, dtype=torch.float32)
        accuracy["sft"] = evaluator(sft_model)
        print(f"SFT ({sft_s:.0f} s): held-out accuracy {accuracy['sft']:.3f}", flush=True)
        t0 = time.perf_counter()
        trainer.train()
        ppo_s = time.perf_counter() - t0
        accuracy["sr_ppo"] = evaluator(trainer.model)
        print(f"SR-PPO ({ppo_s:.0f} s): held-out accuracy {accuracy['sr_ppo']:.3f}", flush=True)
        rows = [r for r in read_metrics(f"{out}/metrics.jsonl") if r["step"] > 0]

    keys = ("reward/mean", "srppo/log_ratio_per_token", "response_length/mean", "kl", "clip_frac",
            "value/explained_variance")
    curve = [{"step": r["step"], **{k: r.get(k) for k in keys}} for r in rows]
    third = max(1, len(rows) // 3)
    first, last = rows[:third], rows[-third:]

    def mean(part, key):
        return sum(r[key] for r in part) / len(part)

    table = [[name, f"{acc:.3f}"] for name, acc in accuracy.items()]
    print(C.table(table, ["model", f"held-out accuracy ({eval_size} chain_sum problems)"]))
    trend = [[k, f"{mean(first, k):.3f}", f"{mean(last, k):.3f}"] for k in keys[:4]]
    print(C.table(trend, ["SR-PPO metric", f"first {third} steps", f"last {third} steps"]))
    result = {
        **C.run_info(command, quick, "peft", "reasoning_gym"),
        "config": str(CONFIG.relative_to(C.ROOT)),
        "steps": steps,
        "eval_size": eval_size,
        "accuracy": accuracy,
        "seconds": {"sft_stage": sft_s, "sr_ppo_stage": ppo_s},
        "curve": curve,
    }
    C.write_results(NAME + (".quick" if quick else ""), result)
    return result
