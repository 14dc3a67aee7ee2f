#!/usr/bin/env bash
# The accelerator check (benchmarks/gpu_check.py): bf16 matmul peak, PMD vs TRL GRPO steps, KV caches.
#   bash benchmarks/gpu_check.sh --assets DIR   # on a GPU host: tokenizer from `gpu_check.py --prepare DIR`
#   bash benchmarks/gpu_check.sh --shrink       # tiny shapes, the same code paths (~1 min on CPU)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi

# Wheels the host lacks (e.g. trl) travel in benchmarks/wheels/: the host has no network.
shopt -s nullglob
wheels=(benchmarks/wheels/*.whl)
if (( ${#wheels[@]} )); then
  "$PY" -m pip install --quiet --no-index --no-deps "${wheels[@]}"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" -m benchmarks.gpu_check "$@"
