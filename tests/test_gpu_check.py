"""The accelerator check (benchmarks/gpu_check.py) end to end at its shrunk shapes, on this machine's
device: the tokenizer prepared as for a GPU host, then every part measured and written as JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.support import REPO

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
# In its own process (the check sets process-wide torch, logging and warning state), with the results
# folder moved out of the repo.
SHRUNK_CHECK = ("import sys; from pathlib import Path; from benchmarks import _common, gpu_check; "
                "_common.RESULTS_DIR = Path(sys.argv[1]); gpu_check.main(quick=True, assets=sys.argv[2])")


def run(*args: str):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env={**os.environ, **OFFLINE}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# slow tier: the fast tier stays under 10 minutes on an AVX2-only CPU (issue 26)
@pytest.mark.slow
def test_shrunk_gpu_check_measures_every_part(tmp_path):
    assets, results = tmp_path / "assets", tmp_path / "results"
    run("benchmarks/gpu_check.py", "--prepare", str(assets))  # by path, as on this machine before a GPU run
    assert (assets / "tokenizer.json").is_file()
    assert sum(p.stat().st_size for p in assets.iterdir()) < 10 * 2**20
    run("-c", SHRUNK_CHECK, str(results), str(assets))
    data = json.loads((results / "gpu_check.quick.json").read_text())
    on_cpu = data["device"] == "cpu"

    assert positive(data["matmul_bf16"]["tflops"])

    comparison = data["pmd_vs_trl"]["tiny"]
    ours, trl = comparison["ours"], comparison["trl"]
    for unit in (comparison, ours, trl, data["kv_cache"], *data["kv_cache"]["caches"].values()):
        if isinstance(unit, dict):  # TRL's is a string when it is not installed
            assert "error" not in unit and "skipped" not in unit, unit  # a guarded unit failed: its message
    assert positive(ours["step_s"]) and positive(ours["bf16_mfu"]) and positive(ours["achieved_tflops"])
    phases = ours["phases_median_s"]
    assert all(positive(phases[k]) for k in ("rollout_s", "train_s", "sync_s"))
    assert sum(phases.values()) <= ours["step_s"]  # the trainer's laps lie inside the timed step
    assert 0 < ours["completion_tokens_per_step"] <= 2 * 8 * 16  # prompts x samples x new tokens
    assert (ours["peak_alloc_bytes"] is None) == on_cpu
    if isinstance(trl, str):
        assert trl.startswith("not installed: ")
    else:
        assert positive(trl["step_s"]) and positive(comparison["ours_x_faster"])

    caches = data["kv_cache"]["caches"]
    assert set(caches) == {"none", "kivi-2", "gear-2"}
    for name, cache in caches.items():
        assert positive(cache["kv_bytes"]) and positive(cache["tokens_per_s"]), name
        assert 0 < cache["tokens"] <= 4 * 64, name
        assert "peak_alloc_bytes" in cache and (cache["peak_alloc_bytes"] is None) == on_cpu, name
    for name in ("kivi-2", "gear-2"):
        assert caches[name]["kv_bytes"] < caches["none"]["kv_bytes"], name
        assert 0 < caches[name]["kv_bytes_over_none"] < 1, name

    # server mode: on CPU one vLLM server with the gloo transport, max_staleness 0 and 1
    server = data["server_mode"]
    assert server["model"] == "tiny-head-64" and "error" not in server and "skipped" not in server, server
    assert list(server) == (["model", "gloo"] if on_cpu else ["model", "nccl", "gloo"])
    for k in (0, 1):
        run_k = server["gloo"][f"max_staleness_{k}"]
        assert "error" not in run_k, run_k
        assert positive(run_k["step_s"]) and all(positive(run_k[p]) for p in ("rollout_s", "train_s", "sync_s"))
        assert [r["step"] for r in run_k["per_step"]] == [1, 2] and 0 <= run_k["staleness"] <= k
