"""`align` command line (also `python -m align`, and `python -m alignment` for launchers).

    align train CONFIG.yaml [key=value ...]     train with a recipe; dotted overrides
    align bench NAME [--quick] [KEY=VALUE ...]  run benchmarks/NAME.py, write benchmarks/results/NAME.json
    align serve-rm --model DIR [--port 8000]    serve a reward or preference model over HTTP (rewards/server.py)
    align vllm-serve MODEL [--port 8000] [vLLM args ...]  a vLLM server for rollout.backend=vllm_server
    align config CONFIG.yaml [key=value ...]    print the recipe resolved: every key, defaults filled in
    align config --keys                         print every config key of every trainer (the README's table)

It sits above the three packages: it picks the trainer (trainers/), which builds its rewards
(rewards/) and runs on the core (alignment/).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import sys
from pathlib import Path

import yaml

from alignment.config import ConfigError, config_keys, load_config, merge, parse_overrides, read_yaml, to_dict
from alignment.data import DataError
from alignment.precision import resolve_bf16
from trainers import TRAINERS, get_trainer

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def build_config(path: str, overrides: list[str]):
    values = merge(read_yaml(path), parse_overrides(overrides))
    trainer_cls = get_trainer(values.get("trainer", ""))
    return trainer_cls, load_config(trainer_cls.config_class, values)


def cmd_train(args) -> int:
    trainer_cls, cfg = build_config(args.config, args.overrides)
    trainer_cls(cfg).train()
    return 0


def cmd_config(args) -> int:
    if args.keys:
        print(key_table())
        return 0
    if not args.config:
        raise ConfigError("align config: give a recipe (align config CONFIG.yaml [key=value ...]) or --keys")
    _, cfg = build_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    if cfg.train.bf16 == "auto":
        precision = resolve_bf16("auto")
        print(f"# train.bf16: auto resolves to {precision.name} here ({precision.reason})")
    return 0


def _default_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`"


def key_table() -> str:
    """Markdown: every config key of every trainer, its default (per trainer where they differ) and the
    comment beside its field in the source; the README's key table is this output."""
    defaults: dict[str, dict[str, object]] = {}
    docs: dict[str, str] = {}
    for name in TRAINERS:
        for key, value, doc in config_keys(get_trainer(name).config_class):
            defaults.setdefault(key, {})[name] = value
            docs.setdefault(key, doc)
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, by_trainer in defaults.items():
        doc = docs[key].replace("|", "\\|")
        if key == "trainer":
            default, doc = "", f"{doc}: {', '.join(f'`{t}`' for t in TRAINERS)}"
        else:
            groups: dict[str, list[str]] = {}
            for trainer, value in by_trainer.items():
                groups.setdefault(_default_text(value), []).append(trainer)
            if len(groups) == 1:
                default = next(iter(groups))
            else:  # the most common default last, as "others"
                *rare, common = sorted(groups, key=lambda text: len(groups[text]))
                default = "; ".join(f"{text or 'none'} ({', '.join(groups[text])})" for text in rare)
                default += f"; {common or 'none'} (others)"
            if len(by_trainer) < len(TRAINERS):
                doc = f"({', '.join(by_trainer)}) {doc}"
        lines.append(f"| `{key}` | {default} | {doc} |")
    return "\n".join(lines)


def cmd_bench(args) -> int:
    path = BENCH_DIR / f"{args.name}.py"
    if not path.is_file():
        names = sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))
        raise ConfigError(f"unknown benchmark {args.name!r} (available: {', '.join(names)})")
    # Every benchmark runs offline on embedded models, and imports `benchmarks._common` from the repo.
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if str(BENCH_DIR.parent) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR.parent))
    spec = importlib.util.spec_from_file_location(f"benchmarks.{args.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if args.overrides and "overrides" not in inspect.signature(module.main).parameters:
        raise ConfigError(f"benchmark {args.name!r} takes no KEY=VALUE overrides (got {' '.join(args.overrides)})")
    module.main(quick=args.quick, **({"overrides": tuple(args.overrides)} if args.overrides else {}))
    return 0


def cmd_serve_rm(args) -> int:
    from rewards.server import API_KEY_ENV, serve  # fastapi and uvicorn load only to serve

    serve(args.model, args.host, args.port, api_key=args.api_key or os.environ.get(API_KEY_ENV),
          batch_size=args.batch_size, max_wait_ms=args.max_wait_ms,
          max_request_bytes=int(args.max_request_mb * 2**20), max_items=args.max_items, log_level=args.log_level,
          routing=args.routing, body_timeout_s=args.body_timeout_s, drain_timeout_s=args.drain_timeout_s)
    return 0


def vllm_serve_command(model: str, host: str, port: int, extra: list[str], cuda: bool | None = None
                       ) -> tuple[dict[str, str], list[str], str]:
    """(environment, argv, the plain `vllm serve` line it amounts to) for `align vllm-serve`: vLLM's OpenAI
    server in dev mode (the weight routes), with the scale-out token-in/token-out endpoint, raw log-probs
    (what training computes), the weight-transfer engine (vLLM's NCCL one on CUDA, our gloo one elsewhere:
    alignment/rollout/gloo.py), and on CPU fp32 and eager mode."""
    import json
    import shlex

    import torch

    from alignment.models import resolve_path

    cuda = torch.cuda.is_available() if cuda is None else cuda
    path = resolve_path(model, key="MODEL")
    given = {arg.split("=")[0] for arg in extra if arg.startswith("--")}
    flags = ["--host", host, "--port", str(port), "--enable-scale-out"]
    if "--logprobs-mode" not in given:
        flags += ["--logprobs-mode", "raw_logprobs"]
    if "--weight-transfer-config" not in given:  # vLLM's NCCL engine on CUDA, our gloo engine elsewhere
        flags += ["--weight-transfer-config", json.dumps({"backend": "nccl" if cuda else "gloo"})]
    if not cuda:
        flags += [] if "--dtype" in given else ["--dtype", "float32"]
        flags += [] if "--enforce-eager" in given else ["--enforce-eager"]
    env = {"VLLM_SERVER_DEV_MODE": "1"}
    if not cuda:
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
    plain = " ".join([*(f"{k}={v}" for k, v in env.items()), "vllm", "serve", shlex.quote(path),
                      *map(shlex.quote, flags + extra)])
    # The entry point `vllm serve` runs; vllm-cpu's `vllm` script fails looking up the `vllm` distribution.
    argv = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", path, *flags, *extra]
    return env, argv, plain


def cmd_vllm_serve(args, extra: list[str]) -> int:
    env, argv, plain = vllm_serve_command(args.model, args.host, args.port, extra)
    print(plain, flush=True)
    if args.dry_run:
        return 0
    os.execve(argv[0], argv, {**os.environ, **env})  # vLLM gets the signals (Ctrl-C stops it)


class LazyEpilogParser(argparse.ArgumentParser):
    """A parser whose epilog may be a function, called only when help is printed (`align train --help`
    lists every trainer's config sections, which imports every trainer: seconds no run should pay)."""

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def train_epilog() -> str:
    sections = sorted({key.split(".")[0] for name in TRAINERS
                       for key, _, _ in config_keys(get_trainer(name).config_class) if "." in key})
    return (f"trainers (the recipe's `trainer:`): {', '.join(TRAINERS)}\n"
            f"config sections: {', '.join(sections)}\n"
            "every key, its default and meaning: align config --keys (also the README's table)\n"
            "a recipe resolved, with its overrides: align config CONFIG.yaml [key=value ...]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="align", description="RLHF alignment training")
    # The `deepspeed` launcher inserts --local_rank before the subcommand (ranks come from
    # torch.distributed instead); `align train` accepts it after the config too.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=LazyEpilogParser)
    train = sub.add_parser("train", help="train with a YAML recipe", formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=train_epilog)
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=2e-5")
    train.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    train.set_defaults(func=cmd_train)
    config = sub.add_parser("config", help="print a recipe resolved, or every config key (--keys)")
    config.add_argument("config", nargs="?")
    config.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=2e-5")
    config.add_argument("--keys", action="store_true", help="every config key of every trainer, as a markdown table")
    config.set_defaults(func=cmd_config)
    bench = sub.add_parser("bench", help="run a benchmark from benchmarks/")
    bench.add_argument("name")
    bench.add_argument("--quick", action="store_true", help="a short run (smoke check)")
    bench.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="recipe overrides, for the benchmarks that take them (pmd_phases, pmd_vs_trl_grpo)")
    bench.set_defaults(func=cmd_bench)
    serve_rm = sub.add_parser("serve-rm", help="serve a reward model over HTTP")
    serve_rm.add_argument("--model", required=True,
                          help="reward model or pairwise preference model folder (or builtin:NAME)")
    serve_rm.add_argument("--routing", default=None,
                          help="preference models: a judge-routing YAML (reward: judge + router), e.g. "
                               "configs/judge_routing.yaml; without it /v1/compare never calls a judge")
    serve_rm.add_argument("--host", default="127.0.0.1")
    serve_rm.add_argument("--port", type=int, default=8000)
    serve_rm.add_argument("--api-key", default=None,
                          help="bearer token required on every endpoint but /health (default: $ALIGN_RM_API_KEY; "
                               "the variable keeps the key out of the process list)")
    serve_rm.add_argument("--batch-size", type=int, default=32, help="items per model batch (default 32)")
    serve_rm.add_argument("--max-wait-ms", type=float, default=5.0,
                          help="how long a request may wait for a batch to fill (default 5)")
    serve_rm.add_argument("--max-request-mb", type=float, default=32.0, help="request body limit (default 32)")
    serve_rm.add_argument("--max-items", type=int, default=8192, help="items per request limit (default 8192)")
    serve_rm.add_argument("--body-timeout-s", type=float, default=60.0,
                          help="seconds a request body may take to arrive, else 408 (default 60)")
    serve_rm.add_argument("--drain-timeout-s", type=float, default=30.0,
                          help="on SIGINT / SIGTERM, seconds the requests in flight get to finish (default 30)")
    serve_rm.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                          help="debug also logs every request")
    serve_rm.set_defaults(func=cmd_serve_rm)
    vllm_serve = sub.add_parser(
        "vllm-serve", help="start a vLLM server for rollout.backend=vllm_server (extra arguments go to vLLM)",
        description="vLLM's OpenAI server set up for rollout.backend=vllm_server: dev mode (weight push routes), "
                    "the scale-out endpoint, raw log-probs, the weight-transfer engine (vLLM's NCCL one on CUDA, "
                    "our gloo one elsewhere), on CPU fp32 and eager mode. Prints the plain `vllm serve` line it amounts to; any other argument goes to "
                    "vLLM (e.g. --max-model-len 2048 --tensor-parallel-size 2).")
    vllm_serve.add_argument("model", help="model folder, hub name or builtin:NAME (resolved to its local folder)")
    vllm_serve.add_argument("--host", default="127.0.0.1")
    vllm_serve.add_argument("--port", type=int, default=8000)
    vllm_serve.add_argument("--dry-run", action="store_true", help="print the command and exit")
    vllm_serve.set_defaults(func=cmd_vllm_serve)
    args, unknown = parser.parse_known_args(argv)
    if args.command == "vllm-serve":
        try:
            return cmd_vllm_serve(args, unknown)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if unknown and args.command == "bench" and all("=" in u and not u.startswith("-") for u in unknown):
        args.overrides += unknown  # argparse stops filling a positional list at an option (`--quick`)
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
