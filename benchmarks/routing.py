"""Uncertainty routing: accuracy against the judge-call budget, and the routing overhead per RL step.

    align bench routing            # 3 task seeds + 3 variants, the overhead run (~8 min on 2 cores)
    align bench routing --quick    # 1 seed, fewer steps (smoke check)

Accuracy vs budget, on the faithful-check task of tests/test_routing.py (tests/support/preference_task.py):
word-value pairs, a preference model trained on the in-distribution words (tiny Llama, top layer and
SNGP head trained), 300 in- and 200 out-of-distribution held-out pairs, a simulated judge right 90 %
of the time. For each judged fraction: `budget` (the most uncertain pairs), `random` (the same
count, mean of 20 draws) and `threshold` (thresholds on a grid; its fraction is what it turns out to
be). The same curves for the uncertainty variants (SNGP without spectral normalisation, MC dropout,
ensemble) on task seed 0. Plot: benchmarks/routing.png.

Overhead per RL step: `trainer: routed_rl` with SmolLM2-135M-Instruct as policy and as the preference
model's backbone, 2 prompts x 4 samples x 32 tokens, budget 0.25, the judge an OpenAI-compatible
loopback server that answers at once: `time/reward_s` (preference model on the 12 ordered pairs,
router, judge HTTP calls) against the whole step. A real judge's latency comes on top and is the
judge's, not ours.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import torch
import yaml

from benchmarks import _common as C

NAME = "routing"
THREADS = 2
BUDGETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)
VARIANTS = {"sngp": {}, "sngp_no_sn": {"spectral_norm": False}, "mc_dropout": {"uncertainty": "mc_dropout"},
            "ensemble": {"uncertainty": "ensemble"}}


def train_word_pm(folder: Path, seed: int, steps: int, pm: dict) -> Path:
    from align.cli import build_config
    from tests.support.tiny_models import tiny_llama
    from tests.support.preference_task import WordValueTask

    task = WordValueTask(seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {"trainer": "preference_model", "output_dir": str(folder / "pm"), "seed": seed,
              "model": {"path": str(tiny_llama(folder / "tiny", seed=seed))},
              "data": {"path": str(task.write_training_pairs(folder / "pairs.jsonl", 2000, seed=1))},
              "train": {"max_steps": steps, "lr": 1e-3, "batch_size": 32, "bf16": False, "log_every": 1000},
              "pm": {"random_features": 1024, "trainable_layers": 1, **pm}}
    (folder / "pm.yaml").write_text(yaml.safe_dump(recipe))
    trainer_cls, cfg = build_config(str(folder / "pm.yaml"), [])
    trainer_cls(cfg).train()
    return folder / "pm" / "final"


def accuracy_curves(path: Path, seed: int) -> dict:
    from alignment.config import RouterConfig
    from rewards.preference_model import PreferenceScorer
    from tests.support.preference_task import WordValueTask, accuracy_by_decile, routed_accuracy, simulated_judge

    task = WordValueTask(seed=seed)
    items = task.pairs(300, True, seed=2) + task.pairs(200, False, seed=3)
    truth = torch.tensor([p.a_better for p in items])
    scores, u = PreferenceScorer.from_dir(path, batch_size=128).compare(
        [p.prompt for p in items], [p.a for p in items], [p.b for p in items])
    verdicts = simulated_judge(items, 0.9, seed=5)
    ranks = torch.empty_like(u)
    ranks[u.argsort()] = torch.arange(len(u), dtype=u.dtype)
    auroc = float((ranks[300:].mean() - 199 / 2) / 300)  # P(U_ood > U_id)
    correct = ((scores > 0) == truth).float()
    curves = {"budget": [], "random": [], "threshold": []}
    for budget in BUDGETS:
        acc, frac = routed_accuracy(scores, u, truth, verdicts, RouterConfig("budget", budget=budget))
        curves["budget"].append({"judge_frac": frac, "accuracy": acc})
        draws = [routed_accuracy(scores, u, truth, verdicts, RouterConfig("random", budget=budget), seed=s)[0]
                 for s in range(20)]
        curves["random"].append({"judge_frac": budget, "accuracy": statistics.mean(draws),
                                 "accuracy_std": statistics.pstdev(draws)})
    for q in torch.linspace(0.05, 0.95, 10).tolist():
        threshold = float(torch.quantile(u, q))
        acc, frac = routed_accuracy(scores, u, truth, verdicts, RouterConfig("threshold", threshold=threshold))
        curves["threshold"].append({"threshold": threshold, "judge_frac": frac, "accuracy": acc})
    return {"accuracy_in": float(correct[:300].mean()), "accuracy_out": float(correct[300:].mean()),
            "auroc_out_vs_in": auroc, "accuracy_by_decile": [a for _, a in accuracy_by_decile(scores, u, truth)],
            "uncertainty_in_mean": float(u[:300].mean()), "uncertainty_out_mean": float(u[300:].mean()),
            "curves": curves}


def routing_overhead(folder: Path, steps: int) -> dict:
    from align.cli import build_config
    from tests.support.judge_server import start_judge_server

    smol = "builtin:smollm2-135m-instruct"
    data = str(C.ROOT / "data/hhh/hhh_pairs.json")
    pm_recipe = {"trainer": "preference_model", "output_dir": str(folder / "pm"), "model": {"path": smol},
                 "data": {"path": data}, "train": {"max_steps": 1, "batch_size": 4, "bf16": True},
                 "pm": {"trainable_layers": 0, "max_length": 256}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pm.yaml").write_text(yaml.safe_dump(pm_recipe))
    trainer_cls, cfg = build_config(str(folder / "pm.yaml"), [])
    trainer_cls(cfg).train()
    base_url, server = start_judge_server()
    with server:
        recipe = {"trainer": "routed_rl", "output_dir": str(folder / "rl"), "model": {"path": smol},
                  "data": {"path": data}, "rollout": {"n": 4, "max_new_tokens": 32},
                  "train": {"max_steps": steps, "batch_size": 2, "lr": 1e-6, "bf16": True},
                  "reward": {"type": "routed", "preference_model": str(folder / "pm" / "final"),
                             "judge": {"base_url": base_url, "model": "rule-judge"},
                             "router": {"policy": "budget", "budget": 0.25}}}
        (folder / "rl.yaml").write_text(yaml.safe_dump(recipe))
        trainer_cls, cfg = build_config(str(folder / "rl.yaml"), [])
        trainer_cls(cfg).train()
    rows = [json.loads(line) for line in (folder / "rl" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/reward_s" in r][1:]  # the first step warms up
    step = [r["time/rollout_s"] + r["time/train_s"] + r["time/sync_s"] for r in rows]
    reward = [r["time/reward_s"] for r in rows]
    return {"steps": len(rows), "step_s_median": statistics.median(step), "reward_s_median": statistics.median(reward),
            "reward_over_step": statistics.median(reward) / statistics.median(step),
            "judge_frac": statistics.mean(r["router/judge_frac"] for r in rows),
            "judge_failures": sum(r["router/judge_failures"] for r in rows)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    curves = results["seeds"]["0"]["curves"]
    for policy, style in (("budget", "o-"), ("threshold", "s--"), ("random", "^:")):
        points = sorted(curves[policy], key=lambda p: p["judge_frac"])
        axes[0].plot([p["judge_frac"] for p in points], [p["accuracy"] for p in points], style, label=policy)
    axes[0].set(xlabel="judge calls / pairs", ylabel="accuracy (judge right 90%)",
                title="SNGP preference model, task seed 0")
    for name, variant in results["variants"].items():
        points = variant["curves"]["budget"]
        axes[1].plot([p["judge_frac"] for p in points], [p["accuracy"] for p in points], "o-", label=name)
    random = results["seeds"]["0"]["curves"]["random"]
    axes[1].plot([p["judge_frac"] for p in random], [p["accuracy"] for p in random], "k:", label="random")
    axes[1].set(xlabel="judge calls / pairs", title="budget routing by uncertainty variant")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(quick: bool = False) -> dict:
    C.quiet_torch(THREADS)
    seeds = (0,) if quick else (0, 1, 2)
    steps = 60 if quick else 300
    results = {"seeds": {}, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            path = train_word_pm(Path(tmp) / f"seed{seed}", seed, steps, {})
            results["seeds"][str(seed)] = accuracy_curves(path, seed)
            if seed == 0:
                results["variants"]["sngp"] = results["seeds"]["0"]
        for name, pm in VARIANTS.items():
            if name != "sngp" and not quick:
                results["variants"][name] = accuracy_curves(train_word_pm(Path(tmp) / name, 0, steps, pm), 0)
        results["overhead"] = routing_overhead(Path(tmp) / "overhead", 2 if quick else 5)
    header = ["model", "acc in", "acc out", "AUROC out/in"] + [f"budget {b:g}" for b in BUDGETS[1:5]]
    rows = []
    for label, r in [*((f"sngp seed {s}", r) for s, r in results["seeds"].items()),
                     *((name, r) for name, r in results["variants"].items() if name != "sngp")]:
        gains = [f"{b['accuracy']:.3f} vs {x['accuracy']:.3f}"
                 for b, x in zip(r["curves"]["budget"][1:5], r["curves"]["random"][1:5])]
        rows.append([label, f"{r['accuracy_in']:.3f}", f"{r['accuracy_out']:.3f}", f"{r['auroc_out_vs_in']:.3f}",
                     *gains])
    print("routed accuracy: uncertainty (budget) vs random routing at the same judge fraction")
    print(C.table(rows, header))
    o = results["overhead"]
    print(f"routing overhead per RL step: {o['reward_s_median']:.2f} s of {o['step_s_median']:.2f} s "
          f"({100 * o['reward_over_step']:.1f} %), judge fraction {o['judge_frac']:.2f}")
    data = {**C.run_info(C.bench_command(NAME, quick), quick, "peft"), "results": results}
    written = C.write_results(NAME + (".quick" if quick else ""), data)
    if not quick:
        plot(results, C.ROOT / "benchmarks" / "routing.png")
    print(f"results: {written}")
    return data
