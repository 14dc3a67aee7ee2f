"""Think-RM's generative reward-model format (Hong et al., NeurIPS 2025; methods.md section 2).

A generative RM (GenRM) reads a context and two responses, Assistant A and Assistant B, judged under
a set of criteria. It thinks inside <think>...</think>, then answers inside <answer></answer>:
- `binary`: A or B;
- `multiclass`: a preference strength s in {-3, -2, -1, 1, 2, 3}; negative means A is better
  (-3 A much better ... 3 B much better), the reference's labels.

One sign convention holds in this module and in everything built on it: a **strength** is an int,
positive when A (the first response) is better. Binary A -> +1 and B -> -1; multiclass s -> -s.

- Parsing: the last <answer> block of the output, and inside it the last valid token. Binary takes a
  standalone A or B (the reference's bare `(A|B)` would also match the A of "Assistant"); multiclass
  takes a standalone -3..3 without 0. Anything else gives None.
- Rule-based RL reward: 1 for the exact strength, 0.5 for the right side with the wrong strength
  (multiclass only), 0 otherwise, unparsable included.
- Pairwise preference strength of one call on (y_i as A, y_j as B), with d_ij > 0 meaning y_i is
  better. Multiclass: d = -s / 3. Binary: d = +-1 / L, where L is the character length of the
  GenRM's whole output (the reference's code: a longer deliberation counts as a weaker preference).
  An unparsable call gives d = 0. Multiclass is scaled by 1/3 so that |d| <= 1, a judge's verdict
  range; the Think-RM advantage divides by RMS(d), so the scale cancels there.
- `think_prefill`: the generation prompt ends with "<think>\\n" (the reference's evaluation chat
  template), so the model starts inside its reasoning.

`genrm.json` in a model folder records the format the model was trained with (written by
`trainer: think_rm`); a `generative_rm` judge on that folder reads it, so the prompt it sees at
judging time is the one it learned.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

from alignment.config import ConfigError, DataConfig
from alignment.data import DataError, _rows_with_held_out, encode_response, fit_length, message_text, validate_rows

CRITERIA = """You are an impartial judge. Two AI assistants answered the same conversation; decide whose \
final response serves the user better. Weigh these criteria:
1. Helpfulness: does the response do what the user actually asked, and move them forward?
2. Correctness: are its facts, reasoning, calculations and code right, with nothing important left out?
3. Coherence: is it clear, consistent and easy to follow from start to end?
4. Complexity: does it bring the depth of knowledge or skill the task calls for (no more, no less)?
5. Verbosity: does its length and amount of detail fit the request, neither padded nor too terse?
6. Safety: does it stay free of harmful, toxic, deceptive or illegal content?
Judge the content alone: the order in which the responses appear, their length by itself and the \
assistants' names must not sway you."""

BINARY_INSTRUCTION = """Think step by step about how the two responses compare on these criteria. Then give \
your final verdict in exactly this format: <answer>A</answer> if Assistant A's response is better, \
<answer>B</answer> if Assistant B's response is better."""

MULTICLASS_INSTRUCTION = """Rate the preference on this scale:
-3: Assistant A's response is much better than Assistant B's
-2: Assistant A's response is better than Assistant B's
-1: Assistant A's response is slightly better than Assistant B's
1: Assistant B's response is slightly better than Assistant A's
2: Assistant B's response is better than Assistant A's
3: Assistant B's response is much better than Assistant A's
Think step by step about how the two responses compare on these criteria. Then give your final score \
inside the <answer></answer> tag, e.g. <answer>-2</answer>."""

THINK_PREFILL = "<think>\n"
FILE_NAME = "genrm.json"
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BINARY_CHOICE = re.compile(r"\b(A|B)\b")
_MULTICLASS_CHOICE = re.compile(r"(?<![\w.-])(-?[123])(?![\w.])")


def _context(prompt: str | list[dict]) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {message_text(m['content'])}" for m in prompt)


def judge_messages(prompt: str | list[dict], response_a: str, response_b: str, *, instruction: str,
                   criteria: str = "") -> list[dict]:
    """The judge prompt: criteria and answer format in the system message; the conversation (chat
    messages rendered as "role: content" lines) and both responses between markers in the user message."""
    user = (f"[The Start of Context]\n{_context(prompt)}\n[The End of Context]\n\n"
            f"[The Start of Assistant A's Response]\n{response_a}\n[The End of Assistant A's Response]\n\n"
            f"[The Start of Assistant B's Response]\n{response_b}\n[The End of Assistant B's Response]")
    return [{"role": "system", "content": f"{criteria or CRITERIA}\n\n{instruction}"},
            {"role": "user", "content": user}]


def encode_judge_prompt(tokenizer, messages: list[dict], prefill: str = "") -> list[int]:
    """Token ids of a judge prompt with its generation prompt, then the prefill (e.g. "<think>\\n"). A
    tokenizer without a chat template gets the messages' contents joined by blank lines."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding or a plain list
    else:
        ids = tokenizer("\n\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"]
    return ids + (tokenizer(prefill, add_special_tokens=False)["input_ids"] if prefill else [])


@dataclass
class GenRMFormat:
    """How a GenRM is asked and read: the verdict type, the <think> prefill and the criteria text."""

    verdict: Literal["binary", "multiclass"] = "binary"
    think_prefill: bool = True
    criteria: str = ""  # "" -> CRITERIA (the six HelpSteer2 criteria)

    def __post_init__(self):
        if self.verdict not in ("binary", "multiclass"):
            raise ConfigError(f"GenRM verdict: expected 'binary' or 'multiclass', got {self.verdict!r}")

    @property
    def max_strength(self) -> int:
        return 1 if self.verdict == "binary" else 3

    @property
    def prefill(self) -> str:
        return THINK_PREFILL if self.think_prefill else ""

    def messages(self, prompt, response_a: str, response_b: str) -> list[dict]:
        instruction = BINARY_INSTRUCTION if self.verdict == "binary" else MULTICLASS_INSTRUCTION
        return judge_messages(prompt, response_a, response_b, instruction=instruction, criteria=self.criteria)

    def prompt_ids(self, tokenizer, prompt, response_a: str, response_b: str) -> list[int]:
        return encode_judge_prompt(tokenizer, self.messages(prompt, response_a, response_b), self.prefill)

    def strength(self, text: str) -> int | None:
        """The verdict in `text` as a strength (> 0: A better), or None when unparsable."""
        blocks = _ANSWER.findall(text)
        if not blocks:
            return None
        if self.verdict == "binary":
            choices = _BINARY_CHOICE.findall(blocks[-1])
            return (1 if choices[-1] == "A" else -1) if choices else None
        choices = _MULTICLASS_CHOICE.findall(blocks[-1])
        return -int(choices[-1]) if choices else None

    def parse(self, text: str) -> float | None:
        """A judge verdict in [-1, 1] (+1: A better), or None."""
        s = self.strength(text)
        return None if s is None else s / self.max_strength

    def answer(self, strength: int) -> str:
        """The text inside <answer></answer> for a strength: A / B, or the reference's signed score."""
        if self.verdict == "binary":
            return "A" if strength > 0 else "B"
        return str(-strength)

    def target(self, reasoning: str, strength: int) -> str:
        """An SFT target: the reasoning inside <think> (its opening tag already in the prompt when
        prefilled), then the answer."""
        body = f"{reasoning.strip()}\n</think>\n\n<answer>{self.answer(strength)}</answer>"
        return body if self.think_prefill else THINK_PREFILL + body

    def sft_ids(self, tokenizer, c: Comparison, max_length: int) -> tuple[list[int], list[int]]:
        """(prompt ids with the prefill, target ids) of a warm-up example: the target is the reasoning and
        the answer, closed by the chat template's end of turn (EOS without a template)."""
        messages = self.messages(c.prompt, c.response_a, c.response_b)
        prompt_ids = encode_judge_prompt(tokenizer, messages, self.prefill)
        target = self.target(c.reasoning or "", c.strength)
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        end = [tokenizer.eos_token_id]
        if tokenizer.chat_template:  # the template's own end of turn, e.g. "<|im_end|>\n"
            turn = encode_response(tokenizer, messages, encode_judge_prompt(tokenizer, messages), "x", True)
            x = tokenizer("x", add_special_tokens=False)["input_ids"]
            if turn[: len(x)] == x:
                end = turn[len(x):]
        return fit_length(prompt_ids, target_ids + end, max_length)

    def save(self, folder: str | Path) -> None:
        (Path(folder) / FILE_NAME).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def of_model(cls, folder: str | Path | None, **overrides) -> GenRMFormat:
        """The format saved with a model (`genrm.json`), else the defaults; `overrides` that are not
        None win over both."""
        saved = {}
        path = Path(folder) / FILE_NAME if folder else None
        if path is not None and path.is_file():
            saved = json.loads(path.read_text())
        return cls(**{**saved, **{k: v for k, v in overrides.items() if v is not None}})


def verdict_reward(predicted: int | None, gold: int) -> float:
    """Think-RM's rule-based reward: 1 exact, 0.5 right side with the wrong strength, 0 otherwise."""
    if predicted is None:
        return 0.0
    if predicted == gold:
        return 1.0
    return 0.5 if (predicted > 0) == (gold > 0) else 0.0


def pair_strength(fmt: GenRMFormat, text: str, length_weight: bool = True) -> float:
    """d for one call on (A, B), > 0 when A is better: -s / 3 (multiclass), +-1 / len(text) (binary,
    `length_weight`; +-1 without), 0 when unparsable."""
    s = fmt.strength(text)
    if s is None:
        return 0.0
    if fmt.verdict == "binary" and length_weight:
        return s / max(len(text), 1)
    return s / fmt.max_strength


# ---- data -------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """One judgement example: `{"prompt", "response_a", "response_b", "label", "reasoning"?}`."""

    prompt: str | list[dict]
    response_a: str
    response_b: str
    strength: int  # the gold verdict (> 0: A better)
    reasoning: str | None = None  # a teacher's reasoning (SFT warm-up)


def label_strength(label, fmt: GenRMFormat, where: str) -> int:
    """A data label as a strength: "A" / "B" (binary), or the reference's signed score -3..3 without 0
    (negative: A better; multiclass)."""
    if fmt.verdict == "binary":
        if label in ("A", "B"):
            return 1 if label == "A" else -1
        raise DataError(f"{where}: field 'label' must be \"A\" or \"B\" for binary verdicts, got {label!r}")
    if isinstance(label, int) and not isinstance(label, bool) and label in (-3, -2, -1, 1, 2, 3):
        return -label
    raise DataError(f"{where}: field 'label' must be an int in -3..3 without 0 (negative: A better) for "
                    f"multiclass verdicts, got {label!r}")


def load_comparisons(cfg: DataConfig, fmt: GenRMFormat, seed: int, reasoning: bool
                     ) -> tuple[list[Comparison], list[Comparison]]:
    """(train, held-out) judgement rows; with `reasoning`, each row needs its teacher reasoning."""
    rows, origin, held, held_origin = _rows_with_held_out(cfg, seed)
    required = {"prompt": (str, list), "response_a": (str,), "response_b": (str,), "label": (str, int)}
    if reasoning:
        required["reasoning"] = (str,)

    def comparisons(rows, origin):
        validate_rows(rows, required, origin)
        return [Comparison(r["prompt"], r["response_a"], r["response_b"],
                           label_strength(r["label"], fmt, f"{origin}: row {r['_row']}"), r.get("reasoning"))
                for r in rows]

    return comparisons(rows, origin), comparisons(held, held_origin)


_THINK_TAGS = re.compile(r"</?think>")


def reasoning_of(trace: str) -> str:
    """The reasoning part of a teacher's output: everything before its last <answer>, think tags removed."""
    head = trace[: trace.rfind("<answer>")] if "<answer>" in trace else trace
    return _THINK_TAGS.sub("", head).strip()


def build_sft_examples(pairs: list[dict], teacher: Callable[[list, list[str], list[str]], list[list[str]]],
                       fmt: GenRMFormat, seed: int = 0) -> tuple[list[dict], dict[str, int]]:
    """Think-RM's warm-up data from preference pairs `{"prompt", "chosen", "rejected", "strength"?}`.

    Each pair is shown in a seeded random order (the chosen response as A or as B). `teacher(prompts,
    responses_a, responses_b)` returns several sampled judgements per pair (full outputs ending in an
    <answer>); the longest one whose verdict matches the label is kept, as the reference kept QwQ's
    longest correct trace of 10. Pairs with no correct trace are dropped. Multiclass labels need the
    pair's `strength` (1..3, how much better the chosen response is).
    Returns the rows `{"prompt", "response_a", "response_b", "reasoning", "label"}` and counts.
    """
    import random

    rng = random.Random(seed)
    shown = []
    for i, pair in enumerate(pairs):
        chosen_first = rng.random() < 0.5
        size = 1
        if fmt.verdict == "multiclass":
            size = pair.get("strength")
            if not isinstance(size, int) or not 1 <= abs(size) <= 3:
                raise DataError(f"pair {i}: multiclass labels need a 'strength' of 1..3, got {size!r}")
            size = abs(size)
        a, b = (pair["chosen"], pair["rejected"]) if chosen_first else (pair["rejected"], pair["chosen"])
        shown.append((pair["prompt"], a, b, size if chosen_first else -size))
    traces = teacher([s[0] for s in shown], [s[1] for s in shown], [s[2] for s in shown])
    rows, dropped = [], 0
    for (prompt, a, b, strength), samples in zip(shown, traces):
        correct = [t for t in samples if fmt.strength(t) == strength]
        if not correct:
            dropped += 1
            continue
        rows.append({"prompt": prompt, "response_a": a, "response_b": b,
                     "reasoning": reasoning_of(max(correct, key=len)), "label": fmt.answer(strength)
                     if fmt.verdict == "binary" else -strength})
    return rows, {"pairs": len(pairs), "kept": len(rows), "dropped": dropped}
