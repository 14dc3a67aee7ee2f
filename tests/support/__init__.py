"""What tests and benchmarks share: tiny models, recipes, test servers and toy tasks (no tests here)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
