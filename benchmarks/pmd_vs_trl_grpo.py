"""PMD-mean (ours) against TRL 1.16 GRPOTrainer (fp32 and bf16) on the same workload, in one process.

    align bench pmd_vs_trl_grpo            # 60 steps per contender, 256 held-out problems (~26 min)
    align bench pmd_vs_trl_grpo --quick    # 3 steps per contender, 16 held-out problems (smoke check)
    align bench pmd_vs_trl_grpo rollout.backend=vllm   # KEY=VALUE overrides apply to ours only

Workload (the same for every contender): SmolLM2-135M-Instruct (embedded, offline), reasoning-gym
`chain_sum` (2 terms, 1-2 digits), prompt suffix " Reply with just the number.", chat template,
2 prompts x 8 samples per step, at most 16 new tokens, lr 1e-5, temperature 1.0, no KL term.

Contenders, run one after the other in this process with 2 torch threads:
  - trl-fp32: GRPOTrainer with bf16=False (the peer figure measured on this machine when the project started: 8.2 s/step).
  - trl-bf16: GRPOTrainer with bf16=True (TRL's own default precision since 1.x).
    Both keep TRL's other defaults (gradient checkpointing on, loss_type "dapo", scale_rewards
    "group", epsilon 0.2, one optimizer step per generation batch). Reward: exact match 1 / 0
    (GRPO normalises rewards per group, so the scale does not matter), same checker as ours.
    trl-bf16 is skipped where bf16 is emulated (no bf16 units: 215 s/step on an AVX2-only EPYC), and
    ours is then compared with trl-fp32, the faster TRL configuration there.
  - ours: trainers.pmd.PMDTrainer from configs/pmd_chain_sum.yaml (+1 / -1 reward, tau 0.1,
    2 mini-batches per step, its default precision `train.bf16: auto`: bf16 autocast with fp32
    master weights where the CPU has bf16 units, fp32 elsewhere), timing each `step()` call,
    which includes rollout, the old log-prob forward (second mini-batch), both updates and the
    verified weight sync.

Step times leave out the first warm-up steps. Each step also records the CPU stall time other
processes caused (Linux PSI, /proc/pressure/cpu); the headline step time is the median over the
uncontended steps (stall < 10% of the step) when there are enough of them. Held-out greedy
accuracy is measured by one evaluator for every contender: the trained weights loaded into an fp32
`HFEngine`, greedy decoding, at most 16 new tokens, `rewards.verifiable.is_correct`, with its
standard error over the problems; two contenders compare by their paired per-problem difference
(and its standard error), since both answer the same problems. FLOPs are
estimated from the real (unpadded) token counts: 2 FLOPs per parameter per token forward, 4
backward; the decoder's matmul parameters see every token it runs, the LM head (tied embedding)
only the completion positions. The bf16 bound counts the FLOPs each contender executes: ours runs
each distinct prompt once per pass (shared prefill and shared prefix), TRL every row's whole prompt.
"""

from __future__ import annotations

import gc
import re
import statistics
import tempfile
import time

import torch

from alignment.precision import cpu_features, native_bf16, resolve_bf16
from benchmarks import _common as C

ROOT = C.ROOT
NAME = "pmd_vs_trl_grpo"
CONFIG = ROOT / "configs" / "pmd_chain_sum.yaml"
THREADS = 2
DOC_PEAK_BF16, DOC_PEAK_FP32 = 2.0, 0.32  # TFLOP/s, this machine's documented peaks (workplace notes)
TARGET_VS_FP32, TARGET_VS_BF16, TARGET_OVER_BOUND = 3.0, 1.5, 2.0
TARGET_VS_FASTEST_NO_BF16 = 2.0  # where bf16 is emulated: ours against the faster TRL configuration
# 256 problems: a binomial standard error of about 0.03 on an accuracy near 0.5, and the paired
# difference of two models on the same problems is tighter still (they agree on most problems).
EVAL_PROBLEMS = 256




# ---- workload -----------------------------------------------------------------------------------
def build_ours_config(steps: int, eval_size: int, output_dir: str, config=CONFIG, extra: tuple[str, ...] = ()):
    """The recipe `config` with the shared workload overrides, then `extra` overrides (which win)."""
    from align.cli import build_config

    overrides = [
        f"output_dir={output_dir}", f"train.max_steps={steps}", "train.batch_size=2", "rollout.n=8",
        "rollout.max_new_tokens=16", "rollout.temperature=1.0", "train.lr=1.0e-5", f"data.eval_size={eval_size}",
        "train.save_every=0", "train.eval_every=0", "rollout.backend=hf", "model.path=builtin:smollm2-135m-instruct",
    ]
    return build_config(str(config), [*overrides, *extra])


def param_counts(model) -> dict:
    """Matmul parameters of the decoder layers and of the LM head (tied to the embedding here)."""
    layers = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in name)
    head = model.get_output_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return {"layers": layers, "head": head, "total": total}


def old_logprob_passes(cfg) -> float:
    """Forward passes over the batch for the old log-probs: mini-batches 2..k get a no-grad pass (the
    first is on-policy and uses its own), none with the engine's (`train.old_logprobs: rollout`)."""
    if cfg.train.old_logprobs == "rollout":
        return 0.0
    return (cfg.train.mini_batches - 1) / cfg.train.mini_batches


def decoder_tokens(rollouts) -> int:
    """Tokens ours' decoder runs per pass over a batch: each distinct prompt once (the engine's shared
    prefill, the trainer's shared prefix: alignment.logprobs.response_hidden), then each row's last
    prompt token and its response."""
    distinct = {i: len(p) for i, p in zip(rollouts.prompt_index, rollouts.prompt_ids)}
    return sum(distinct.values()) + len(rollouts.prompt_ids) + sum(len(r) for r in rollouts.response_ids)


def memory_bytes(params: dict, decode_steps: float, optimizer_steps: int) -> float:
    """Bytes ours must move where the work is bound by memory, not matmuls: each decode step reads the
    engine's bf16 weights once (2 bytes per parameter); each fused AdamW step reads parameter, gradient
    and both moments and writes three back, and clipping reads the gradient (32); the weight sync
    writes the engine's fp32 and bf16 copies (8 + 6) and each side's fp32 canary forward reads the
    fp32 weights (8)."""
    return params["total"] * (2 * decode_steps + 32 * optimizer_steps + 22)


def flops(params: dict, tokens: float, completion_tokens: float, passes: float) -> float:
    """`passes` forward-equivalents (1 forward, 3 forward+backward) over `tokens` real tokens."""
    return 2.0 * passes * (params["layers"] * tokens + params["head"] * completion_tokens)


class GreedyEval:
    """The one held-out evaluator: trained weights -> fp32 HFEngine -> greedy -> is_correct."""

    def __init__(self, model_path, tokenizer, examples, max_new_tokens: int):
        from transformers import AutoModelForCausalLM

        from alignment.data import encode_prompt
        from alignment.rollout.hf import HFEngine

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.engine = HFEngine(model, tokenizer, bf16=False)
        self.tokenizer = tokenizer
        self.examples = examples
        self.prompts = [encode_prompt(tokenizer, e.prompt, True) for e in examples]
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def __call__(self, model) -> float:
        from alignment.adapters import hf_model
        from alignment.rollout import SamplingParams
        from rewards.verifiable import is_correct

        self.engine.load_weights({n: p.detach() for n, p in hf_model(model).named_parameters()})
        rollouts = self.engine.generate(self.prompts, SamplingParams(n=1, max_new_tokens=self.max_new_tokens,
                                                                     temperature=0.0))
        texts = self.tokenizer.batch_decode(rollouts.response_ids, skip_special_tokens=True)
        self.last_number_accuracy = sum(_last_number(t) == str(e.answer).strip()
                                        for e, t in zip(self.examples, texts)) / len(self.examples)
        self.last_correct = [float(is_correct(e, t)) for e, t in zip(self.examples, texts)]
        return statistics.fmean(self.last_correct)


def standard_error(values: list[float]) -> float:
    """Of the mean of `values` (per-problem scores, or per-problem differences of two models)."""
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")


def _last_number(text: str) -> str | None:
    """A secondary check kept in the JSON: the last integer of the reply equals the answer."""
    found = re.findall(r"-?\d+", text)
    return found[-1] if found else None


# ---- contenders ---------------------------------------------------------------------------------
def timed_steps(trainer, steps: int, label: str, synchronize=lambda: None) -> list[dict]:
    """`steps` trainer steps, one row each: wall seconds (`synchronize` runs before each clock read:
    CUDA's queue), the CPU stall, reward and loss, the trainer's phases, the engine's generate time
    and what its rollout held (prompt, completion and decoder tokens; decode steps, the longest
    response)."""
    generate, rows = trainer.engine.generate, []

    def recording_generate(*args, **kwargs):
        t = time.perf_counter()
        out = generate(*args, **kwargs)
        rows[-1]["generate_s"] += time.perf_counter() - t
        rows[-1].update(prompt_tokens=sum(len(p) for p in out.prompt_ids),
                        completion_tokens=sum(len(r) for r in out.response_ids), decoder_tokens=decoder_tokens(out),
                        decode_steps=max(len(r) for r in out.response_ids))
        return out

    trainer.engine.generate = recording_generate
    try:
        for s in range(steps):
            rows.append({"step": s + 1, "generate_s": 0.0})
            synchronize()
            stall, t = C.cpu_stall_s(), time.perf_counter()
            metrics = trainer.step(s)
            synchronize()
            row = rows[-1]
            row.update(seconds=time.perf_counter() - t, cpu_stall_s=C.cpu_stall_s() - stall if stall is not None else None,
                       reward_mean=metrics["reward/mean"], loss=metrics.get("loss"), rollout_s=metrics["time/rollout_s"],
                       train_s=metrics["time/train_s"], sync_s=metrics["time/sync_s"])
            print(f"  {label} step {s + 1}/{steps}: {row['seconds']:.2f} s  reward {row['reward_mean']:+.3f}  "
                  f"stall {row['cpu_stall_s'] if row['cpu_stall_s'] is not None else float('nan'):.2f} s  "
                  f"(rollout {row['rollout_s']:.2f} s, generate {row['generate_s']:.2f} s, train {row['train_s']:.2f} s, "
                  f"sync {row['sync_s']:.2f} s)", flush=True)
    finally:
        trainer.engine.generate = generate
    return rows


def run_ours(steps: int, eval_size: int, evaluator: GreedyEval, params: dict, config=CONFIG,
             extra: tuple[str, ...] = ()) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_pmd_") as tmp:
        trainer_cls, cfg = build_ours_config(steps, eval_size, tmp, config, extra)
        t0 = time.perf_counter()
        trainer = trainer_cls(cfg)
        setup_s = time.perf_counter() - t0
        trainer.sync_weights()
        own_before = trainer.evaluate().get("eval/accuracy")

        loads = [C.load_average()]
        per_step = timed_steps(trainer, steps, "ours")
        loads.append(C.load_average())
        own_after = trainer.evaluate().get("eval/accuracy")
        after = evaluator(trainer.model)
        after_lenient, correct = evaluator.last_number_accuracy, evaluator.last_correct
        del trainer
        gc.collect()
    return {"times": [p["seconds"] for p in per_step], "stalls": [p["cpu_stall_s"] for p in per_step],
            "per_step": per_step, "after": after, "correct": correct,
            "after_last_number": after_lenient, "overrides": list(extra),
            "setup_s": setup_s, "load_average": loads,
            "own_eval": {"before": own_before, "after": own_after},
            "extra_forward_passes": old_logprob_passes(cfg), "optimizer_steps": cfg.train.mini_batches,
            "phases": {k: statistics.median(p[k] for p in per_step)
                       for k in ("rollout_s", "generate_s", "train_s", "sync_s")}}


def run_trl(bf16: bool, steps: int, train_set, model_path, tokenizer, evaluator: GreedyEval, **grpo) -> dict:
    """`steps` generation batches; `grpo` overrides GRPOConfig fields. With steps_per_generation x
    num_iterations = g > 1 optimizer steps per generation batch, a step here is g optimizer steps
    (the first one generates), timed as the sum of their times."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards.verifiable import is_correct

    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": e.prompt}] for e in train_set],
        "answer": [str(e.answer) for e in train_set],
        "idx": list(range(len(train_set))),
    })

    def exact_match(completions, idx, **_):
        """1 / 0 with the framework's checker (reasoning-gym's own scorer for chain_sum)."""
        return [1.0 if is_correct(train_set[i], c[0]["content"]) else 0.0 for c, i in zip(completions, idx)]

    group = grpo.get("steps_per_generation", 1) * grpo.get("num_iterations", 1)  # with gradient accumulation 1

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.end, self.stalls, self._stall = [], [], [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._stall = C.cpu_stall_s()
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.end.append(time.perf_counter())
            stall = C.cpu_stall_s()
            self.stalls.append(stall - self._stall if stall is not None and self._stall is not None else None)
            if len(self.end) % group == 0:
                seconds = sum(e - b for b, e in zip(self.begin[-group:], self.end[-group:]))
                stalls = self.stalls[-group:]
                print(f"  trl-{'bf16' if bf16 else 'fp32'} step {len(self.end) // group}/{steps}: "
                      f"{seconds:.2f} s  stall "
                      f"{sum(stalls) if None not in stalls else float('nan'):.2f} s", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_trl_") as tmp:
        args = GRPOConfig(**{
            "output_dir": tmp, "per_device_train_batch_size": 16, "num_generations": 8, "max_completion_length": 16,
            "learning_rate": 1e-5, "beta": 0.0, "temperature": 1.0, "max_steps": steps * group, "logging_steps": 1,
            "report_to": "none", "use_cpu": True, "save_strategy": "no", "bf16": bf16, "seed": 0,
            "disable_tqdm": True, **grpo,
        })
        if args.steps_per_generation * args.num_iterations != group * args.gradient_accumulation_steps:
            raise ValueError(f"run_trl: give steps_per_generation and num_iterations explicitly ({grpo})")
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        timer = StepTimer()
        t0 = time.perf_counter()
        trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer])
        setup_s = time.perf_counter() - t0
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)
        loads = [C.load_average()]
        t_train = time.perf_counter()
        trainer.train()
        train_wall = time.perf_counter() - t_train
        loads.append(C.load_average())
        opt_times = [e - b for b, e in zip(timer.begin, timer.end)]
        times = [sum(opt_times[i:i + group]) for i in range(0, len(opt_times), group)]
        stalls = [None if None in timer.stalls[i:i + group] else sum(timer.stalls[i:i + group])
                  for i in range(0, len(timer.stalls), group)]
        ends = timer.end[group - 1::group]
        cadence = [ends[0] - timer.begin[0]] + [b - a for a, b in zip(ends, ends[1:])]
        logs = [h for h in trainer.state.log_history if "reward" in h]
        per_step, prev_tokens = [], 0.0
        for k, h in enumerate(logs):
            tokens = float(h.get("num_tokens", 0.0))
            completion_tokens = float(h.get("completions/mean_length", 0.0)) * args.generation_batch_size
            prompt_tokens = tokens - prev_tokens - completion_tokens
            per_step.append({
                "step": k + 1, "seconds": times[k] if k < len(times) else None,
                "cpu_stall_s": stalls[k] if k < len(stalls) else None, "reward_mean": h.get("reward"),
                "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "decoder_tokens": prompt_tokens + completion_tokens,  # every row runs its whole prompt
                "loss": h.get("loss"),
            })
            prev_tokens = tokens
        after = evaluator(trainer.model)
        after_lenient, correct = evaluator.last_number_accuracy, evaluator.last_correct
        del trainer, model
        gc.collect()
    return {"times": times, "stalls": stalls, "cadence_s": cadence, "per_step": per_step, "after": after,
            "correct": correct,
            "after_last_number": after_lenient, "setup_s": setup_s,
            "train_wall_s": train_wall, "load_average": loads, "optimizer_step_times_s": opt_times,
            "extra_forward_passes": 1.0,  # gradient checkpointing recomputes the forward in backward
            "config": {"gradient_checkpointing": args.gradient_checkpointing, "loss_type": args.loss_type,
                       "scale_rewards": args.scale_rewards, "epsilon": args.epsilon, "bf16": args.bf16,
                       "steps_per_generation": args.steps_per_generation, "num_iterations": args.num_iterations,
                       "per_device_train_batch_size": args.per_device_train_batch_size,
                       "num_generations": args.num_generations, "generation_batch_size": args.generation_batch_size,
                       "beta": args.beta}}


# ---- report -------------------------------------------------------------------------------------
def headline_step_s(stats: dict) -> tuple[float, str]:
    """The step time the figures use, from `C.summarize`: the median over steps no other process
    competed in, when there are enough of them (a third of the timed steps), else over all timed steps."""
    clean = stats.get("uncontended")
    if clean is not None and clean["steps_timed"] >= max(2, stats["steps_timed"] // 3):
        return clean["median_s"], "uncontended median"
    return stats["median_s"], "median of all timed steps"


def contender_figures(run: dict, warmup: int, executed_flops, peak_bf16: float, peak_fp32: float) -> dict:
    """What every contender reports: steady-state step times (`C.summarize`, `headline_step_s`),
    tokens per step, throughput of the work `executed_flops(decoder tokens, completion tokens)` it does,
    and its raw per-step records."""
    stats = C.summarize(run["times"], warmup, run["stalls"])
    t, t_from = headline_step_s(stats)
    steady = run["per_step"][warmup:] or run["per_step"]
    tokens = statistics.fmean(p["prompt_tokens"] + p["completion_tokens"] for p in steady)
    completion = statistics.fmean(p["completion_tokens"] for p in steady)
    executed = executed_flops(statistics.fmean(p["decoder_tokens"] for p in steady), completion)
    figures = {
        **stats, "step_s": t, "step_s_from": t_from,
        "tokens_per_step": tokens, "completion_tokens_per_step": completion,
        "executed_flops_per_step": executed, "achieved_tflops": executed / t / 1e12,
        "fraction_of_bf16_peak": executed / t / 1e12 / peak_bf16,
        "fraction_of_fp32_peak": executed / t / 1e12 / peak_fp32,
        "setup_s": run["setup_s"], "load_average_before_after": run["load_average"],
        "step_times_s": run["times"], "per_step": run["per_step"],
    }
    for key in ("cadence_s", "config", "train_wall_s", "own_eval", "phases", "optimizer_step_times_s"):
        if key in run:
            figures[key] = run[key]
    return figures


def main(quick: bool = False, overrides: tuple[str, ...] = ()) -> dict:
    """`overrides` (KEY=VALUE) apply to ours only, after the shared workload's, e.g. rollout.backend=vllm."""
    from alignment.data import load_prompts
    from alignment.models import load_tokenizer, resolve_path

    C.quiet_torch(THREADS)

    steps, warmup, eval_size = (3, 1, 16) if quick else (60, 2, EVAL_PROBLEMS)
    command = C.bench_command(NAME, quick, overrides)
    print(f"{command}: {steps} steps per contender, {eval_size} held-out problems, {THREADS} threads", flush=True)

    _, cfg = build_ours_config(steps, eval_size, tempfile.gettempdir())
    model_path = resolve_path(cfg.model.path)
    tokenizer = load_tokenizer(cfg.model)
    train_set, eval_set = load_prompts(cfg.data, cfg.seed)

    features = cpu_features()
    native, why = native_bf16(features=features)
    # ours' precision is its recipe's, after the KEY=VALUE overrides (train.bf16: auto unless overridden)
    precision = resolve_bf16(build_ours_config(steps, eval_size, tempfile.gettempdir(), extra=tuple(overrides))[1]
                             .train.bf16, features=features)
    print(f"CPU features: {', '.join(f'{k} {v}' for k, v in features.summary().items())}; "
          f"precision resolved for ours: {precision.name} ({precision.reason})", flush=True)
    # where bf16 is emulated, one 2048^3 bf16 matmul takes minutes: the fp32 peak stands in for it
    def bf16_peak():
        return C.matmul_peak_tflops(torch.bfloat16 if native else torch.float32)

    peaks = {"bf16_tflops": [bf16_peak()],
             "fp32_tflops": [C.matmul_peak_tflops(torch.float32)], "copy_gbs": [C.memory_bandwidth_gbs()]}
    bf16_label = "bf16" if native else "bf16 (emulated here: fp32's stands in)"
    print(f"matmul peak (2048^3, {THREADS} threads): {bf16_label} {peaks['bf16_tflops'][0]:.2f} TFLOP/s, "
          f"fp32 {peaks['fp32_tflops'][0]:.3f} TFLOP/s; copy bandwidth {peaks['copy_gbs'][0]:.1f} GB/s", flush=True)

    evaluator = GreedyEval(model_path, tokenizer, eval_set, cfg.rollout.max_new_tokens)
    params = param_counts(evaluator.engine.model)
    before = evaluator(evaluator.engine.model)
    before_lenient, before_correct = evaluator.last_number_accuracy, evaluator.last_correct
    print(f"held-out greedy accuracy before training: {before:.3f} ({eval_size} problems; "
          f"last number in the reply right: {before_lenient:.3f})", flush=True)

    runs = {}
    print(f"ours (PMD-mean, {precision.name}):", flush=True)
    runs["ours"] = run_ours(steps, eval_size, evaluator, params, extra=tuple(overrides))
    for bf16 in (False, True):
        name = "trl-bf16" if bf16 else "trl-fp32"
        if bf16 and not native:
            print(f"{name}: skipped, bf16 is emulated on this CPU ({why})", flush=True)
            continue
        print(f"{name} (TRL GRPOTrainer, bf16={bf16}):", flush=True)
        runs[name] = run_trl(bf16, steps, train_set, model_path, tokenizer, evaluator)

    peaks["bf16_tflops"].append(bf16_peak())
    peaks["fp32_tflops"].append(C.matmul_peak_tflops(torch.float32))
    peaks["copy_gbs"].append(C.memory_bandwidth_gbs())
    peak_bf16, peak_fp32, bandwidth = max(peaks["bf16_tflops"]), max(peaks["fp32_tflops"]), max(peaks["copy_gbs"])

    figures = {}
    for name, run in runs.items():
        def executed_flops(tokens, completion):  # called at once, inside this iteration
            model = flops(params, tokens, completion, 1 + 3)  # rollout forward + train forward/backward
            return model + flops(params, tokens, completion if name == "ours" else 0.0, run["extra_forward_passes"])

        figures[name] = f = contender_figures(run, warmup, executed_flops, peak_bf16, peak_fp32)
        executed, t = f["executed_flops_per_step"], f["step_s"]
        f.update({
            "accuracy_before": before,
            "accuracy_after": run["after"],
            "accuracy_gain": run["after"] - before,
            "accuracy_after_se": standard_error(run["correct"]),
            "accuracy_gain_se": standard_error([a - b for a, b in zip(run["correct"], before_correct)]),
            "last_number_accuracy_before": before_lenient,
            "last_number_accuracy_after": run["after_last_number"],
            "reward_mean_first5": statistics.fmean(p["reward_mean"] for p in run["per_step"][:5]),
            "reward_mean_last10": statistics.fmean(p["reward_mean"] for p in run["per_step"][-10:]),
            "model_flops_per_step": flops(params, f["tokens_per_step"], f["completion_tokens_per_step"], 1 + 3),
            "fraction_of_doc_bf16_2tflops": executed / t / 1e12 / DOC_PEAK_BF16,
            "bf16_bound_s": executed / (peak_bf16 * 1e12),
        })

    ours = figures["ours"]
    ours["step_over_bf16_bound"] = ours["step_s"] / ours["bf16_bound_s"]
    # The bound of the workload as TRL runs it: every row's whole prompt (the definition before issue 19).
    ours["bf16_bound_unshared_s"] = (ours["model_flops_per_step"] + flops(
        params, ours["tokens_per_step"], ours["completion_tokens_per_step"], runs["ours"]["extra_forward_passes"])
    ) / (peak_bf16 * 1e12)
    # Roofline: the matmul bound plus the time the memory-bound work needs at the measured bandwidth.
    steady = runs["ours"]["per_step"][warmup:]
    ours["memory_bytes_per_step"] = memory_bytes(params, statistics.fmean(p["decode_steps"] for p in steady),
                                                 runs["ours"]["optimizer_steps"])
    ours["roofline_bound_s"] = ours["bf16_bound_s"] + ours["memory_bytes_per_step"] / (bandwidth * 1e9)
    ours["step_over_roofline_bound"] = ours["step_s"] / ours["roofline_bound_s"]
    ratios = {}
    for k in [k for k in ("trl-fp32", "trl-bf16") if k in runs]:
        # Held-out accuracy after training, ours minus the peer's, paired over the same problems.
        difference = [a - b for a, b in zip(runs["ours"]["correct"], runs[k]["correct"])]
        ratios[f"ours_vs_{k.replace('-', '_')}"] = {
            "x_faster": figures[k]["step_s"] / ours["step_s"],
            "x_faster_median_all_steps": figures[k]["median_s"] / ours["median_s"],
            "x_faster_mean_all_steps": figures[k]["mean_s"] / ours["mean_s"],
            "accuracy_after_difference": statistics.fmean(difference),
            "accuracy_after_difference_se": standard_error(difference)}
    # "Equal" accuracy within the noise: ours is not below the peer by more than 2 standard errors.
    targets = {f"ours held-out accuracy >= TRL {k[-4:]}'s (within 2 SE)":
               v["accuracy_after_difference"] >= -2 * v["accuracy_after_difference_se"] for k, v in ratios.items()}
    if "ours_vs_trl_bf16" in ratios:
        targets["ours >= 3x faster per step than TRL fp32"] = ratios["ours_vs_trl_fp32"]["x_faster"] >= TARGET_VS_FP32
        targets["ours >= 1.5x faster per step than TRL bf16"] = ratios["ours_vs_trl_bf16"]["x_faster"] >= TARGET_VS_BF16
        targets["ours step within 2x of its bf16 matmul bound"] = ours["step_over_bf16_bound"] <= TARGET_OVER_BOUND
    else:
        targets["ours >= 2x faster per step than TRL fp32 (the faster TRL here)"] = (
            ratios["ours_vs_trl_fp32"]["x_faster"] >= TARGET_VS_FASTEST_NO_BF16)

    rows = []
    for name, f in figures.items():
        clean = f.get("uncontended")
        ratio = "1.00x" if name == "ours" else f"{f['step_s'] / ours['step_s']:.2f}x"
        rows.append([name, f"{f['step_s']:.2f}",
                     f"{clean['steps_timed']}/{f['steps_timed']}" if clean else f"-/{f['steps_timed']}",
                     f"{f['median_s']:.2f}", f"{f['mean_s']:.2f}", ratio,
                     f"{f['accuracy_before']:.3f} -> {f['accuracy_after']:.3f} +- {f['accuracy_after_se']:.3f}",
                     f"{f['accuracy_gain']:+.3f} +- {f['accuracy_gain_se']:.3f}",
                     f"{f['executed_flops_per_step'] / 1e12:.2f}", f"{f['achieved_tflops']:.3f}",
                     f"{100 * f['fraction_of_bf16_peak']:.1f}%", f"{f['bf16_bound_s']:.2f}"])
    header = ["contender", "s/step", "clean steps", "med all", "mean all", "ours x faster",
              f"acc ({eval_size}) before -> after", "gain", "TFLOP/step", "TFLOP/s", "of bf16 peak", "bf16 bound s"]
    print()
    print(f"{steps} steps each, steady state = steps {warmup + 1}..{steps}; s/step = median over the clean "
          f"(uncontended) steps; matmul peak bf16 {peak_bf16:.2f} / fp32 {peak_fp32:.3f} TFLOP/s ({THREADS} threads)")
    print(C.table(rows, header))
    for k, v in ratios.items():
        print(f"{k}: {v['x_faster']:.2f}x faster (clean median), {v['x_faster_median_all_steps']:.2f}x "
              f"(median of all steps), {v['x_faster_mean_all_steps']:.2f}x (mean of all steps); held-out "
              f"accuracy after, ours minus theirs: {v['accuracy_after_difference']:+.3f} "
              f"+- {v['accuracy_after_difference_se']:.3f} (paired standard error)")
    print(f"ours: step {ours['step_s']:.2f} s = {ours['step_over_bf16_bound']:.2f}x its bf16 bound "
          f"({ours['bf16_bound_s']:.2f} s; {ours['bf16_bound_unshared_s']:.2f} s counting every row's prompt), "
          f"{ours['step_over_roofline_bound']:.2f}x its roofline bound ({ours['roofline_bound_s']:.2f} s: "
          f"+ {ours['memory_bytes_per_step'] / 1e9:.1f} GB at {bandwidth:.1f} GB/s)")
    for k, v in targets.items():
        print(f"target {k}: {'met' if v else 'NOT met'}")

    result = {
        **C.run_info(command, quick, "trl", "datasets", "accelerate", "reasoning_gym"),
        "workload": {
            "model": "SmolLM2-135M-Instruct (builtin:smollm2-135m-instruct)", "task": "reasoning-gym chain_sum",
            "task_args": cfg.data.task_args, "prompt_suffix": cfg.data.prompt_suffix, "chat_template": True,
            "prompts_per_step": 2, "samples_per_prompt": 8, "max_new_tokens": 16, "lr": 1e-5,
            "temperature": 1.0, "kl": 0.0, "steps": steps, "warmup_steps_excluded": warmup,
            "eval_problems": eval_size, "eval": "greedy, fp32 HFEngine, rewards.verifiable.is_correct",
            "ours_overrides": list(overrides),
            "params": params, "rewards": {"ours": "+1 / -1", "trl": "1 / 0"},
        },
        "precision": {"ours": precision.name, "reason": precision.reason},
        "matmul_peak": {**peaks, "size": 2048, "threads": THREADS, "doc_bf16_tflops": DOC_PEAK_BF16,
                        "doc_fp32_tflops": DOC_PEAK_FP32},
        "ratios": ratios,
        "targets": targets,
        "contenders": figures,
    }
    name = NAME + (".quick" if quick else "")
    path = C.write_results(name, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main(**C.script_args())
