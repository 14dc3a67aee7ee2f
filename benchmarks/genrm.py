"""Think-RM: held-out verdict accuracy after SFT and after rule-based RL, against a Bradley-Terry reward
model trained on the same pairs; and what a judgement costs (tokens and seconds per comparison).

    align bench genrm            # SFT 80 steps, RL 30 steps, BT 80 steps (~4 min on 2 cores)
    align bench genrm --quick    # RL 10 steps

The task is the faithful check's (tests/support/verdict_task.py): one-word responses with hidden worths,
a tiny Llama from scratch as the generative RM (binary verdicts, <think> prefilled), 400 SFT pairs with
the teacher's reasoning, 800 RL pairs with labels only, 128 held-out pairs. The Bradley-Terry model is
the same tiny Llama with a score head (`trainer: reward_model`, loss bt) trained on the 400 SFT pairs
as preference pairs, for as many steps as the SFT stage. Judge cost: the RL model as a
`generative_rm` judge (hf engine, greedy) on the 128 held-out pairs, one generate call.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks import _common as C

NAME = "genrm"
THREADS = 2
SFT_STEPS, BT_STEPS = 80, 80


def train(folder: Path, recipe: dict) -> list[dict]:
    from align.cli import build_config

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    trainer_cls, cfg = build_config(str(folder / "recipe.yaml"), [])
    trainer_cls(cfg).train()
    return [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]


def as_pairs(rows_path: Path, out: Path) -> Path:
    """Judgement rows -> preference pairs (chosen = the gold better response), for the BT model."""
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    pairs = [{"prompt": r["prompt"], "chosen": r["response_a"] if r["label"] == "A" else r["response_b"],
              "rejected": r["response_b"] if r["label"] == "A" else r["response_a"]} for r in rows]
    out.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return out


def judge_cost(model: Path, held_out: Path) -> dict:
    from alignment.config import JudgeConfig
    from rewards.judges import build_judge

    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    judge = build_judge(JudgeConfig(type="generative_rm", model=str(model), temperature=0.0, max_tokens=32))
    judge.judge(["warm-up"], ["apple"], ["river"])
    start = time.perf_counter()
    calls = judge.judge([r["prompt"] for r in rows], [r["response_a"] for r in rows], [r["response_b"] for r in rows])
    seconds = time.perf_counter() - start
    tokens = [len(judge.tokenizer(c.text, add_special_tokens=False)["input_ids"]) for c in calls]
    right = sum(c.verdict is not None and (c.verdict > 0) == (r["label"] == "A") for c, r in zip(calls, rows))
    return {"comparisons": len(rows), "seconds_per_comparison": seconds / len(rows),
            "tokens_per_comparison": sum(tokens) / len(tokens), "chars_per_comparison":
            sum(len(c.text) for c in calls) / len(calls), "judge_accuracy": right / len(rows)}


def main(quick: bool = False) -> None:
    from tests.support.tiny_models import tiny_llama
    from tests.support.verdict_task import CRITERIA, write_splits

    C.quiet_torch(THREADS)
    rl_steps = 10 if quick else 30
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        splits = write_splits(root / "data")
        model = tiny_llama(root / "tiny")
        t0 = time.perf_counter()
        train(root / "sft", {
            "trainer": "think_rm_sft", "output_dir": str(root / "sft"), "model": {"path": str(model)},
            "data": {"path": str(splits["sft"])}, "think_rm": {"criteria": CRITERIA},
            "train": {"max_steps": SFT_STEPS, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "bf16": False}})
        t_sft = time.perf_counter() - t0
        t0 = time.perf_counter()
        rl_rows = train(root / "rl", {
            "trainer": "think_rm_rl", "output_dir": str(root / "rl"), "model": {"path": str(root / "sft" / "final")},
            "data": {"path": str(splits["rl"]), "eval_path": str(splits["held_out"]), "eval_size": 128},
            "rollout": {"n": 8, "max_new_tokens": 32},
            "train": {"max_steps": rl_steps, "batch_size": 8, "lr": 3e-4, "bf16": False, "eval_every": 10},
            "algo": {"kl_coef": 1e-3}})
        t_rl = time.perf_counter() - t0
        evals = [(r["step"], r["eval/accuracy"]) for r in rl_rows if "eval/accuracy" in r]
        t0 = time.perf_counter()
        bt_rows = train(root / "bt", {
            "trainer": "reward_model", "output_dir": str(root / "bt"), "model": {"path": str(model)},
            "data": {"path": str(splits["pairs"]), "eval_path": str(as_pairs(splits["held_out"], root / "held.jsonl")),
                     "eval_size": 128},
            "rm": {"loss": "bt"}, "train": {"max_steps": BT_STEPS, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5,
                                            "bf16": False}})
        t_bt = time.perf_counter() - t0
        bt_accuracy = [r["eval/accuracy"] for r in bt_rows if "eval/accuracy" in r][-1]
        cost = judge_cost(root / "rl" / "final", splits["held_out"])

    results = {
        **C.run_info(C.bench_command(NAME, quick), quick, "peft"),
        "task": "word worths (tests/support/verdict_task.py), tiny Llama 2x128 from scratch, 128 held-out pairs",
        "accuracy": {"after_sft": evals[0][1], "after_rl": evals[-1][1], "rl_curve": evals,
                     "bradley_terry": bt_accuracy},
        "steps": {"sft": SFT_STEPS, "rl": rl_steps, "bt": BT_STEPS},
        "train_seconds": {"sft": t_sft, "rl": t_rl, "bt": t_bt},
        "judge_cost": cost,
    }
    path = C.write_results(NAME, results)
    print(C.table([["Think-RM after SFT", f"{evals[0][1]:.3f}", SFT_STEPS, f"{t_sft:.0f}"],
                   ["Think-RM after SFT + RL", f"{evals[-1][1]:.3f}", rl_steps, f"{t_rl:.0f}"],
                   ["Bradley-Terry RM", f"{bt_accuracy:.3f}", BT_STEPS, f"{t_bt:.0f}"]],
                  ["model", "held-out accuracy", "steps", "train s"]))
    print(f"judge cost: {cost['tokens_per_comparison']:.1f} tokens, {cost['seconds_per_comparison'] * 1000:.1f} ms "
          f"per comparison (greedy, hf engine, batch of {cost['comparisons']}); its accuracy {cost['judge_accuracy']:.3f}")
    print(f"results: {path}")
