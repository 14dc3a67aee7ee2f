"""Think-RM's judgement data: rows `{"prompt", "response_a", "response_b", "label", "reasoning"?}` read as
`Comparison`s, their labels as strengths (> 0: A better) for a GenRM verdict type ("binary" or "multiclass",
rewards/generative.py)."""

from __future__ import annotations

from dataclasses import dataclass

from alignment.config import DataConfig
from alignment.data import DataError, _rows_with_held_out, validate_rows


@dataclass
class Comparison:
    """One judgement example: `{"prompt", "response_a", "response_b", "label", "reasoning"?}`."""

    prompt: str | list[dict]
    response_a: str
    response_b: str
    strength: int  # the gold verdict (> 0: A better)
    reasoning: str | None = None  # a teacher's reasoning (SFT warm-up)
    origin: str = ""  # where the row comes from, e.g. "sft.jsonl: row 4"


def label_strength(label, verdict: str, where: str) -> int:
    """A data label as a strength: "A" / "B" (binary), or the reference's signed score -3..3 without 0
    (negative: A better; multiclass)."""
    if verdict == "binary":
        if label in ("A", "B"):
            return 1 if label == "A" else -1
        raise DataError(f"{where}: field 'label' must be \"A\" or \"B\" for binary verdicts, got {label!r}")
    if isinstance(label, int) and not isinstance(label, bool) and label in (-3, -2, -1, 1, 2, 3):
        return -label
    raise DataError(f"{where}: field 'label' must be an int in -3..3 without 0 (negative: A better) for "
                    f"multiclass verdicts, got {label!r}")


def load_comparisons(cfg: DataConfig, verdict: str, seed: int, reasoning: bool
                     ) -> tuple[list[Comparison], list[Comparison]]:
    """(train, held-out) judgement rows; with `reasoning`, each row needs its teacher reasoning."""
    rows, origin, held, held_origin = _rows_with_held_out(cfg, seed)
    required = {"prompt": (str, list), "response_a": (str,), "response_b": (str,), "label": (str, int)}
    if reasoning:
        required["reasoning"] = (str,)

    def comparison(r, where):
        return Comparison(r["prompt"], r["response_a"], r["response_b"], label_strength(r["label"], verdict, where),
                          r.get("reasoning"), where)

    def comparisons(rows, origin):
        validate_rows(rows, required, origin)
        return [comparison(r, f"{origin}: row {r['_row']}") for r in rows]

    return comparisons(rows, origin), comparisons(held, held_origin)
