"""Think-RM's generative reward-model format (Hong et al., NeurIPS 2025).

A generative RM (GenRM) reads a context and two responses, Assistant A and Assistant B, judged under
a set of criteria. It thinks inside <think>...</think>, then answers inside <answer></answer>:
- `binary`: A or B;
- `multiclass`: a preference strength s in {-3, -2, -1, 1, 2, 3}; negative means A is better
  (-3 A much better ... 3 B much better), the reference's labels.

One sign convention holds in this module and in everything built on it: a **strength** is an int,
positive when A (the first response) is better. Binary A -> +1 and B -> -1; multiclass s -> -s.

- Parsing (`read_verdict`, shared with the <label> judges of rewards/judges.py): only the text outside
  the reasoning counts: everything up to the first </think> is reasoning, and so is any later
  <think>...</think> block or <think> left open. With `think_prefill` the output starts inside <think>,
  so an output with no </think> never closed its reasoning and has no verdict. Outside it, every
  <answer> block must hold exactly one valid choice (whitespace aside): binary A or B, multiclass
  -3..3 without 0. None ("unparsable") when there is no block, a block holds anything else ("A or B",
  "Assistant B", "score: 3": a hedge is no verdict), an <answer> is left unclosed, or blocks disagree
  (an answer, more reasoning, another answer: no verdict, not the last one); identical repeats
  ("<answer>A</answer> ... so <answer>A</answer>") state one verdict and are accepted. Text around the
  blocks is not read (a model that runs on after its answer, e.g. "<answer>A</answer>B</think>", keeps
  its verdict).
- Rule-based RL reward: 1 for the exact strength, 0.5 for the right side with the wrong strength
  (multiclass only), 0 otherwise, unparsable included.
- Pairwise preference strength of one call on (y_i as A, y_j as B), with d_ij > 0 meaning y_i is
  better. Multiclass: d = -s / 3. Binary: d = +-1 / L, where L is the character length of the
  GenRM's whole output (the reference's code: a longer deliberation counts as a weaker preference).
  An unparsable call gives d = 0. Multiclass is scaled by 1/3 so that |d| <= 1, a judge's verdict
  range; the Think-RM advantage divides by RMS(d), so the scale cancels there.
- `think_prefill`: the generation prompt ends with "<think>\\n" (the reference's evaluation chat
  template), so the model starts inside its reasoning.
- SFT targets that do not fit `sft.max_length` (`GenRMFormat.sft_ids`): the judge prompt is kept whole
  and the reasoning loses its middle (its beginning and end stay, joined by a "\\n...\\n" line), so
  the target always ends with </think>, the answer and the end of turn; a row whose prompt and verdict
  alone are too long gets no ids (the Think-RM SFT stage drops it with a warning).

`genrm.json` in a model folder records the format the model was trained with (written by
`trainer: think_rm_sft` and `think_rm_rl`); a `generative_rm` judge on that folder reads it, so the prompt it sees at
judging time is the one it learned.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from alignment.config import ConfigError
from alignment.data import encode_response, message_text
from rewards.comparisons import Comparison

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
CUT_MARKER = "\n...\n"  # stands where an SFT target's reasoning lost its middle to sft.max_length
_BINARY = {"A": 1, "B": -1}
_MULTICLASS = {str(s): -s for s in (-3, -2, -1, 1, 2, 3)}  # the reference's score s -> strength -s
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)


def outside_reasoning(text: str, inside_think: bool = False) -> str:
    """The part of a model's output that may hold its verdict: what follows the first </think> (all
    before it is reasoning, opened by <think> or by the prompt), less any later <think>...</think>
    block and any <think> left open at the end. `inside_think`: the output began inside <think> (a
    prefilled reasoning), so without a </think> it is all reasoning and this is ""."""
    _, closed, tail = text.partition("</think>")
    if not closed:
        if inside_think:
            return ""
        tail = text
    return _THINK_BLOCK.sub("", tail).partition("<think>")[0]


def read_verdict(text: str, tag: str, choices: dict, inside_think: bool = False):
    """The value in `choices` of the one verdict `<tag>CHOICE</tag>` outside the reasoning, or None when
    there is none, a block holds anything but exactly one choice (whitespace aside), a block is left
    open, or blocks disagree (identical repeats count as one verdict)."""
    region = outside_reasoning(text, inside_think)
    blocks = re.findall(f"<{tag}>(.*?)</{tag}>", region, re.DOTALL)
    if not blocks or region.count(f"<{tag}>") != len(blocks):
        return None
    said = {block.strip() for block in blocks}
    return choices.get(said.pop()) if len(said) == 1 else None


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
        choices = _BINARY if self.verdict == "binary" else _MULTICLASS
        return read_verdict(text, "answer", choices, inside_think=self.think_prefill)

    def parse(self, text: str) -> float | None:
        """A judge verdict in [-1, 1] (+1: A better), or None."""
        s = self.strength(text)
        return None if s is None else s / self.max_strength

    def answer(self, strength: int) -> str:
        """The text inside <answer></answer> for a strength: A / B, or the reference's signed score."""
        if self.verdict == "binary":
            return "A" if strength > 0 else "B"
        return str(-strength)

    def _target_parts(self, strength: int) -> tuple[str, str]:
        """What an SFT target holds around its reasoning: the <think> opening (none when prefilled), then
        </think> and the answer."""
        return "" if self.think_prefill else THINK_PREFILL, f"\n</think>\n\n<answer>{self.answer(strength)}</answer>"

    def target(self, reasoning: str, strength: int) -> str:
        """An SFT target: the reasoning inside <think> (its opening tag already in the prompt when
        prefilled), then the answer."""
        opening, closing = self._target_parts(strength)
        return opening + reasoning.strip() + closing

    def sft_ids(self, tokenizer, c: Comparison, max_length: int) -> tuple[list[int], list[int], bool] | None:
        """(prompt ids with the prefill, target ids, whether the reasoning was cut) of a warm-up example:
        the target is the reasoning and the answer, closed by the chat template's end of turn (EOS
        without a template). Longer than `max_length`, the prompt stays whole and the reasoning keeps
        its beginning and its end around CUT_MARKER, so the verdict and the end of turn are always
        learned; None when even the prompt and a target with no reasoning left exceed `max_length`."""
        def encode(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        messages = self.messages(c.prompt, c.response_a, c.response_b)
        prompt_ids = encode_judge_prompt(tokenizer, messages, self.prefill)
        end = [tokenizer.eos_token_id]
        if tokenizer.chat_template:  # the template's own end of turn, e.g. "<|im_end|>\n"
            turn = encode_response(tokenizer, messages, encode_judge_prompt(tokenizer, messages), "x", True)
            x = encode("x")
            if turn[: len(x)] == x:
                end = turn[len(x):]
        reasoning = (c.reasoning or "").strip()
        target_ids = encode(self.target(reasoning, c.strength)) + end
        if len(prompt_ids) + len(target_ids) <= max_length:
            return prompt_ids, target_ids, False
        opening, closing = (encode(part) for part in self._target_parts(c.strength))
        marker, reasoning_ids = encode(CUT_MARKER), encode(reasoning)
        keep = max_length - len(prompt_ids) - len(opening) - len(marker) - len(closing) - len(end)
        if keep < 0:
            return None
        keep = min(keep, len(reasoning_ids))  # the parts may tokenize shorter than the whole text
        head, tail = reasoning_ids[: (keep + 1) // 2], reasoning_ids[len(reasoning_ids) - keep // 2:]
        return prompt_ids, opening + head + marker + tail + closing + end, True

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
