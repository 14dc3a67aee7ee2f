"""PPO (ours) step time against TRL 1.16 on the same model and rollout budget, in one process.

    align bench ppo_vs_trl            # 14 steps per contender, 64 held-out problems (~12-13 min on 2 cores)
    align bench ppo_vs_trl --quick    # 3 steps per contender, 16 held-out problems (smoke check, ~3 min)

TRL 1.16 ships no PPOTrainer (neither `trl.PPOTrainer` nor `trl.experimental`; the script checks and
records it), so the peer is TRL's GRPOTrainer given the same rollout budget. This is NOT PPO against
PPO: per rollout batch our PPO also runs a critic (a second backbone: one forward for the rollout-time
values, then forward + backward in every update) and a reference-model forward for its per-token KL
penalty, which GRPO without a KL term (beta 0, TRL's default) does not have. The FLOP columns count
that work, so the step-time ratio can be read next to the ratio of work done.

Workload, the same for every contender: SmolLM2-135M-Instruct (embedded, offline), reasoning-gym
`chain_sum` (2 terms, 1-2 digits), prompt suffix " Reply with just the number.", chat template,
4 prompts x 4 samples per step (the recipe's own batch), at most 16 new tokens, lr 1e-5,
temperature 1.0, and 4 optimizer steps on each rollout batch: 2 epochs x 2 mini-batches of 8 samples.
  - ours: trainers.ppo.PPOTrainer from configs/ppo_chain_sum.yaml (critic, GAE, clipped policy and
    value losses, kl.coef 0.05 to the initial policy, ppo.passes 2, bf16 autocast with fp32 master
    weights), timing each `step()` call: rollout, old / reference log-prob and value forwards, GAE,
    the policy and critic updates, and the verified weight sync. Its own metrics split the step into
    time/rollout_s (generation + reward + those three forwards + GAE), time/train_s (the updates of
    policy and critic) and time/sync_s; the time inside `engine.generate` is measured separately.
  - trl-fp32 / trl-bf16: GRPOTrainer with bf16=False / True, num_generations 4, per-device batch 8,
    steps_per_generation 2 (2 mini-batches per generation batch) and num_iterations 2 (2 passes over
    it), hence the same 4 optimizer steps per rollout batch; with them TRL adds an old log-prob forward
    at generation. TRL's other defaults stay (beta 0, gradient checkpointing on, loss_type "dapo",
    scale_rewards "group", epsilon 0.2 = our ppo.clip). Reward 1 / 0 with the same checker (GRPO
    normalises per group, so the scale does not matter). A TRL step here is one generation batch: the
    4 optimizer steps it feeds, timed as the sum of their step times (generation happens in the first).

Everything else follows benchmarks/pmd_vs_trl_grpo.py, whose runners, evaluator and FLOP helpers
this script reuses: 2 torch threads, medians after the warm-up steps (over the steps other processes
did not stall when there are enough of them, Linux PSI), held-out greedy accuracy from one fp32
evaluator (a sanity check only: a few steps of 4 prompts move it by noise), FLOPs from the real
token counts (2 per parameter per token forward, 4 backward; the LM head only at completion
positions, and not in the critic).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import statistics
import sys
import tempfile

import torch

from benchmarks import _common as C
from benchmarks import pmd_vs_trl_grpo as P

ROOT = C.ROOT
NAME = "ppo_vs_trl"
CONFIG = ROOT / "configs" / "ppo_chain_sum.yaml"
THREADS = P.THREADS
PROMPTS, SAMPLES = 4, 4  # the recipe's batch; build_ours_config's shared workload has 2 x 8
EXTRA = (f"train.batch_size={PROMPTS}", f"rollout.n={SAMPLES}")


def trl_ppo_trainer() -> str | None:
    """Where this TRL keeps a PPOTrainer, if anywhere (None in 1.16)."""
    import trl

    if hasattr(trl, "PPOTrainer"):
        return "trl.PPOTrainer"
    for module in ("trl.experimental.ppo", "trl.trainer.ppo_trainer"):
        if importlib.util.find_spec(module) is not None:
            return module
    return None


def forward_passes(cfg, trl_config: dict | None) -> tuple[int, int]:
    """Forward-equivalent passes per rollout batch over every token: (through the policy, with its LM
    head at the completion positions; through a backbone without the head: critic or recompute)."""
    if trl_config is None:  # ours: generation, old and reference log-probs + updates; critic: values + updates
        return 3 + 3 * cfg.ppo.passes, 1 + 3 * cfg.ppo.passes
    iterations = trl_config["num_iterations"]
    old_logp = trl_config["steps_per_generation"] * iterations > 1  # gradient accumulation is 1 here
    return 1 + int(old_logp) + 3 * iterations, iterations if trl_config["gradient_checkpointing"] else 0


def trl_phases(run: dict, warmup: int) -> dict:
    """TRL's step split from its optimizer-step times: the first step of a generation batch also
    generates, scores and runs the old log-prob forward; the others only update."""
    group = run["config"]["steps_per_generation"] * run["config"]["num_iterations"]
    opt = run["optimizer_step_times_s"]
    batches = [opt[i:i + group] for i in range(0, len(opt), group)]
    batches = batches[warmup:] or batches
    update = statistics.median(t for b in batches for t in b[1:]) if group > 1 else None
    first = statistics.median(b[0] for b in batches)
    return {"first_optimizer_step_s": first, "update_s": update,
            "generate_score_s": first - update if update is not None else None,
            "updates_s": update * group if update is not None else None}


def main(quick: bool = False) -> dict:
    from alignment.data import load_prompts
    from alignment.models import load_tokenizer, resolve_path

    C.quiet_torch(THREADS)

    steps, warmup, eval_size = (3, 1, 16) if quick else (14, 2, 64)
    command = C.bench_command(NAME, quick)
    print(f"{command}: {steps} steps per contender, {eval_size} held-out problems, {THREADS} threads", flush=True)

    peer_ppo = trl_ppo_trainer()
    print(f"TRL PPOTrainer: {peer_ppo or 'none in this TRL'}; the peer is TRL's GRPOTrainer with the same rollout "
          f"budget (GRPO has no critic and, with beta 0, no reference model)", flush=True)

    _, cfg = P.build_ours_config(steps, eval_size, tempfile.gettempdir(), CONFIG, EXTRA)
    model_path = resolve_path(cfg.model.path)
    tokenizer = load_tokenizer(cfg.model)
    train_set, eval_set = load_prompts(cfg.data, cfg.seed)
    # The same samples per optimizer step and optimizer steps per rollout batch as ours.
    grpo = {"num_generations": cfg.rollout.n,
            "per_device_train_batch_size": cfg.train.batch_size // cfg.train.mini_batches * cfg.rollout.n,
            "steps_per_generation": cfg.train.mini_batches, "num_iterations": cfg.ppo.passes,
            "max_completion_length": cfg.rollout.max_new_tokens}

    peaks = {"bf16_tflops": [C.matmul_peak_tflops(torch.bfloat16)],
             "fp32_tflops": [C.matmul_peak_tflops(torch.float32)]}
    print(f"matmul peak (2048^3, {THREADS} threads): bf16 {peaks['bf16_tflops'][0]:.2f} TFLOP/s, "
          f"fp32 {peaks['fp32_tflops'][0]:.3f} TFLOP/s", flush=True)

    evaluator = P.GreedyEval(model_path, tokenizer, eval_set, cfg.rollout.max_new_tokens)
    params = P.param_counts(evaluator.engine.model)
    before = evaluator(evaluator.engine.model)
    print(f"held-out greedy accuracy before training: {before:.3f} ({eval_size} problems)", flush=True)

    runs = {}
    print("ours (PPO: critic, GAE, KL to the initial policy, bf16 autocast):", flush=True)
    runs["ours"] = P.run_ours(steps, eval_size, evaluator, params, CONFIG, EXTRA)
    for bf16 in (False, True):
        name = "trl-bf16" if bf16 else "trl-fp32"
        print(f"{name} (TRL GRPOTrainer, bf16={bf16}, {grpo['steps_per_generation']} mini-batches x "
              f"{grpo['num_iterations']} iterations per generation batch):", flush=True)
        runs[name] = P.run_trl(bf16, steps, train_set, model_path, tokenizer, evaluator, **grpo)

    peaks["bf16_tflops"].append(C.matmul_peak_tflops(torch.bfloat16))
    peaks["fp32_tflops"].append(C.matmul_peak_tflops(torch.float32))
    peak_bf16, peak_fp32 = max(peaks["bf16_tflops"]), max(peaks["fp32_tflops"])

    figures = {}
    for name, run in runs.items():
        policy_passes, backbone_passes = forward_passes(cfg, run.get("config"))

        def executed_flops(tokens, completion):  # called at once, inside this iteration
            return P.flops(params, tokens, completion, policy_passes) + P.flops(params, tokens, 0.0, backbone_passes)

        figures[name] = f = P.contender_figures(run, warmup, executed_flops, peak_bf16, peak_fp32)
        steady = run["per_step"][warmup:] or run["per_step"]
        if name == "ours":
            phases = {k: statistics.median(p[k] for p in steady)
                      for k in ("seconds", "generate_s", "rollout_s", "train_s", "sync_s")}
            phases["score_s"] = statistics.median(p["rollout_s"] - p["generate_s"] for p in steady)
        else:
            phases = trl_phases(run, warmup)
        f.update({
            "phases_median_s": phases,
            "accuracy_before": before,
            "accuracy_after": run["after"],
            "reward_mean_per_step": [p["reward_mean"] for p in run["per_step"]],
            "forward_passes": {"policy": policy_passes, "critic" if name == "ours" else "recompute": backbone_passes},
        })

    ours = figures["ours"]
    ratios = {f"ours_over_{k.replace('-', '_')}": {
        "step_time": ours["step_s"] / figures[k]["step_s"],
        "step_time_median_all_steps": ours["median_s"] / figures[k]["median_s"],
        "step_time_mean_all_steps": ours["mean_s"] / figures[k]["mean_s"],
        "executed_flops": ours["executed_flops_per_step"] / figures[k]["executed_flops_per_step"],
    } for k in runs if k != "ours"}

    rows = []
    for name, f in figures.items():
        clean = f.get("uncontended")
        passes = f["forward_passes"]
        rows.append([name, "PPO (policy + critic + ref)" if name == "ours" else "GRPO, beta 0",
                     f"{f['step_s']:.2f}",
                     f"{clean['steps_timed']}/{f['steps_timed']}" if clean else f"-/{f['steps_timed']}",
                     f"{f['median_s']:.2f}", f"{f['mean_s']:.2f}",
                     "1.00" if name == "ours" else f"{ours['step_s'] / f['step_s']:.2f}",
                     "+".join(str(v) for v in passes.values()),
                     f"{f['executed_flops_per_step'] / 1e12:.2f}", f"{f['achieved_tflops']:.3f}",
                     f"{100 * f['fraction_of_bf16_peak']:.1f}%",
                     f"{f['accuracy_before']:.3f} -> {f['accuracy_after']:.3f}"])
    header = ["contender", "trainer", "s/step", "clean steps", "med all", "mean all", "ours/this",
              "passes", "TFLOP/step", "TFLOP/s", "of bf16 peak", f"acc ({eval_size})"]
    print()
    print(f"{steps} steps each (a step = one rollout batch of {PROMPTS} prompts x {SAMPLES} samples, <= "
          f"{cfg.rollout.max_new_tokens} new tokens, then {cfg.ppo.passes} epochs x {cfg.train.mini_batches} "
          f"mini-batches = {cfg.ppo.passes * cfg.train.mini_batches} optimizer steps); steady state = steps "
          f"{warmup + 1}..{steps}; s/step = median over the clean (uncontended) steps")
    print(f"TRL {C.versions('trl')['trl']} has no PPOTrainer, so the peer is GRPOTrainer with the same rollout "
          f"budget. Not like for like: our PPO also trains a critic and runs a reference forward.")
    print("passes = forward-equivalents per step over every token: policy (with LM head) + critic (ours) or "
          "gradient-checkpointing recompute (TRL); backward counts 2")
    print(C.table(rows, header))

    p = ours["phases_median_s"]
    print()
    print("ours, one step split (medians over the steady steps, from its metrics; they need not add up to "
          "the step median):")
    print(C.table([
        ["step (timed around trainer.step)", f"{p['seconds']:.2f}", ""],
        ["time/rollout_s", f"{p['rollout_s']:.2f}", "generation + reward + old/ref log-prob + value forwards + GAE"],
        ["  of which engine.generate", f"{p['generate_s']:.2f}", ""],
        ["  of which the rest", f"{p['score_s']:.2f}", "reward, old/ref log-probs, critic values, GAE"],
        ["time/train_s", f"{p['train_s']:.2f}",
         f"{cfg.ppo.passes * cfg.train.mini_batches} policy + "
         f"{cfg.ppo.passes * cfg.train.mini_batches} critic optimizer steps"],
        ["time/sync_s", f"{p['sync_s']:.2f}", "weight push to the engine + canary check"],
    ], ["phase", "s", "contains"]))
    for name, f in figures.items():
        q = f["phases_median_s"]
        if name != "ours" and q["update_s"] is not None:
            print(f"{name}, from its optimizer-step times: generation + reward + old log-probs ~ "
                  f"{q['generate_score_s']:.2f} s, {len(f['optimizer_step_times_s']) // len(f['step_times_s'])} "
                  f"updates ~ {q['updates_s']:.2f} s ({q['update_s']:.2f} s each); end-to-end cadence (with "
                  f"TRL's logging and data loading) {statistics.median(f['cadence_s'][warmup:]):.2f} s")
    print()
    for k, v in ratios.items():
        print(f"{k}: step time {v['step_time']:.2f} (clean median), {v['step_time_median_all_steps']:.2f} "
              f"(median of all timed steps), {v['step_time_mean_all_steps']:.2f} (mean); "
              f"executed FLOPs {v['executed_flops']:.2f}")

    result = {
        **C.run_info(command, quick, "trl", "datasets", "accelerate", "reasoning_gym"),
        "peer": {"trl_ppo_trainer": peer_ppo,
                 "used": "trl.GRPOTrainer with the same rollout budget (beta 0: no reference model, no critic)",
                 "grpo_overrides": grpo},
        "workload": {
            "model": "SmolLM2-135M-Instruct (builtin:smollm2-135m-instruct)", "task": "reasoning-gym chain_sum",
            "task_args": cfg.data.task_args, "prompt_suffix": cfg.data.prompt_suffix, "chat_template": True,
            "prompts_per_step": PROMPTS, "samples_per_prompt": SAMPLES,
            "max_new_tokens": cfg.rollout.max_new_tokens, "lr": cfg.train.lr, "temperature": cfg.rollout.temperature,
            "optimizer_steps_per_rollout": cfg.ppo.passes * cfg.train.mini_batches,
            "ours": {"config": str(CONFIG.relative_to(ROOT)), "overrides": list(EXTRA), "kl_coef": cfg.kl.coef,
                     "ppo": dataclasses.asdict(cfg.ppo), "bf16": cfg.train.bf16},
            "steps": steps, "warmup_steps_excluded": warmup, "eval_problems": eval_size,
            "eval": "greedy, fp32 HFEngine, rewards.verifiable.is_correct", "params": params,
            "rewards": {"ours": "+1 / -1", "trl": "1 / 0"},
        },
        "matmul_peak": {**peaks, "size": 2048, "threads": THREADS},
        "ratios": ratios,
        "contenders": figures,
    }
    path = C.write_results(NAME + (".quick" if quick else ""), result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
