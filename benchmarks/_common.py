"""Helpers shared by the benchmarks: machine and version info, matmul peak, timing stats, results JSON."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"


def quiet_torch(threads: int) -> None:
    """A benchmark's process set-up: fixed thread count and seed; library chatter off."""
    import logging
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    logging.getLogger("alignment").setLevel(logging.WARNING)


def bench_command(name: str, quick: bool, overrides: tuple[str, ...] = ()) -> str:
    """The `align bench` line that reproduces a run."""
    return " ".join([f"align bench {name}", *(["--quick"] if quick else []), *overrides])


def script_args() -> dict:
    """`python benchmarks/NAME.py [--quick] [KEY=VALUE ...]` as `main`'s keyword arguments."""
    return {"quick": "--quick" in sys.argv, "overrides": tuple(a for a in sys.argv[1:] if a != "--quick")}


def run_info(command: str, quick: bool, *packages: str) -> dict:
    """The head of every results JSON: what ran, on which code, machine and package versions."""
    import torch

    return {"mode": "quick" if quick else "full", "command": command, "argv": sys.argv, "git": git_state(ROOT),
            "machine": {**machine_info(), "torch_threads": torch.get_num_threads()},
            "versions": versions("torch", "transformers", *packages)}


def machine_info() -> dict:
    from alignment.precision import cpu_features

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "cpu_features": cpu_features().summary(),  # what `train.bf16: auto` decides from
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }


def versions(*names: str) -> dict:
    out = {}
    for name in names:
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except ImportError:
            out[name] = None
    return out


def git_state(root: Path) -> dict:
    """Commit of the code measured, and whether the framework's files differed from it."""
    import subprocess

    def run(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = run("status", "--porcelain", "--", "alignment", "trainers", "rewards", "configs", "benchmarks/*.py")
    return {"commit": run("rev-parse", "HEAD") or None, "dirty_files": dirty.splitlines()}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_stall_s() -> float | None:
    """Seconds (cumulative) during which some runnable task waited for a CPU (Linux PSI).

    On a 2-core machine running a 2-thread benchmark this grows only when other processes compete;
    its growth during a step marks that step as contended.
    """
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return int(line.rsplit("total=", 1)[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return None


def synchronize(device) -> None:
    """Queued kernels finished, before a clock is read (a no-op on CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(dtype, n: int = 2048, seconds: float = 1.5, trials: int = 3, device="cpu") -> float:
    """Best-of-`trials` n x n matmul throughput in TFLOP/s on `device` (on CPU: the current torch
    thread count); a GPU's queue is drained before each clock read."""
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):  # kernel selection and clocks
        a @ b
    synchronize(device)
    t = time.perf_counter()
    a @ b
    synchronize(device)
    one = max(time.perf_counter() - t, 1e-6)
    reps = max(1, int(seconds / trials / one))
    best = float("inf")
    for _ in range(trials):
        synchronize(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n**3 / best / 1e12


def memory_bandwidth_gbs(megabytes: int = 256, trials: int = 5) -> float:
    """Best-of-`trials` copy bandwidth in GB/s (bytes read + written) on the current torch threads."""
    import torch

    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(trials):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def summarize(times: list[float], warmup: int, stalls: list[float | None] | None = None,
              max_stall: float = 0.10) -> dict:
    """Median / mean / min / max of the steady-state step times (the first `warmup` steps left out).

    With per-step CPU stall seconds (see `cpu_stall_s`), also the same over the uncontended steps:
    those where other processes kept a runnable task waiting less than `max_stall` of the step.
    """
    steady = times[warmup:] if len(times) > warmup else times
    out = _stats(steady)
    out["warmup_steps_excluded"] = len(times) - len(steady)
    if stalls is not None and all(x is not None for x in stalls):
        pairs = list(zip(times, stalls))[len(times) - len(steady):]
        clean = [t for t, st in pairs if st < max_stall * t]
        out["contended_steps"] = len(steady) - len(clean)
        out["uncontended"] = _stats(clean) if clean else None
    return out


def _stats(steady: list[float]) -> dict:
    return {
        "median_s": statistics.median(steady),
        "mean_s": statistics.fmean(steady),
        "min_s": min(steady),
        "max_s": max(steady),
        "stdev_s": statistics.stdev(steady) if len(steady) > 1 else 0.0,
        "steps_timed": len(steady),
    }


def write_results(name: str, data: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    data = {"benchmark": name, "date": datetime.datetime.now().isoformat(timespec="seconds"), **data}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for k, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
