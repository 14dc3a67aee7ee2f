"""Strong LLM judges of response pairs: one interface, three backends.

`judge.compare(prompts, responses_a, responses_b)` returns one verdict per pair: VERDICT_A (+1) when
A is better, VERDICT_B (-1) when B is better, TIE (0) when the judge cannot tell, and None where no
valid verdict could be had (a failed HTTP call, an unparsable reply). A failed call never raises: the
caller keeps its own score for that pair, and `judge.failures` counts it. With `position_swap` every
pair is asked in both orders and the verdict is (v_ab - v_ba) / 2, so a judge that only prefers a
position ends at 0.

Backends (`JudgeConfig.type`):
- `openai`: any OpenAI-compatible chat-completions server (`vllm serve`, a hosted API);
- `local`: a judge model run in process on our rollout engine (hf or vllm), same prompt and parser;
- `generative_rm`: a Think-RM style generative reward model on the same engine, with its own prompt
  (`<answer>A</answer>` / `<answer>B</answer>`) and parser.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx

from alignment.config import ConfigError, JudgeConfig

log = logging.getLogger("alignment")
logging.getLogger("httpx").setLevel(logging.WARNING)  # not one log line per judge call

VERDICT_A, VERDICT_B, TIE = 1.0, -1.0, 0.0

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

LABEL_INSTRUCTION = """Reason about the two responses first if that helps. Then end your reply with exactly \
one of these labels and nothing after it:
<label>1</label> if Assistant A's response is better,
<label>2</label> if Assistant B's response is better,
<label>0</label> if you cannot tell which is better."""

ANSWER_INSTRUCTION = """Think step by step about how the two responses compare on these criteria. Then end \
your reply with <answer>A</answer> if Assistant A's response is better, or <answer>B</answer> if \
Assistant B's response is better."""

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_LABEL = re.compile(r"<label>\s*(.*?)\s*</label>", re.DOTALL)
_LABEL_VERDICTS = {"1": VERDICT_A, "2": VERDICT_B, "0": TIE}
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_CHOICE = re.compile(r"\b(A|B)\b")


def _context(prompt: str | list[dict]) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def judge_messages(prompt: str | list[dict], response_a: str, response_b: str, *,
                   instruction: str = LABEL_INSTRUCTION) -> list[dict]:
    """Chat messages asking for a verdict on (A, B): the criteria and the answer format in the system
    message, the conversation and both responses between markers in the user message. A chat-message
    prompt is rendered as "role: content" lines."""
    user = (f"[The Start of Context]\n{_context(prompt)}\n[The End of Context]\n\n"
            f"[The Start of Assistant A's Response]\n{response_a}\n[The End of Assistant A's Response]\n\n"
            f"[The Start of Assistant B's Response]\n{response_b}\n[The End of Assistant B's Response]")
    return [{"role": "system", "content": f"{CRITERIA}\n\n{instruction}"}, {"role": "user", "content": user}]


def _strip_thinking(text: str) -> str:
    # A reasoning model whose chat template opens <think> in the prompt emits only the closing tag.
    return _THINK.sub("", text).rpartition("</think>")[2]


def parse_verdict(text: str) -> float | None:
    """The last <label>X</label> outside <think>...</think> blocks (or after a lone </think>):
    1 -> A, 2 -> B, 0 -> tie; else None."""
    labels = _LABEL.findall(_strip_thinking(text))
    return _LABEL_VERDICTS.get(labels[-1]) if labels else None


class Judge:
    """`compare(prompts, responses_a, responses_b) -> list[float | None]` (+1 A better, -1 B better,
    0 tie, None: no valid verdict). Backends implement `_ask`, one (verdict, failure reason) per pair;
    `messages` and `parse` are the prompt format and its parser."""

    messages = staticmethod(judge_messages)
    parse = staticmethod(parse_verdict)

    def __init__(self, cfg: JudgeConfig):
        self.cfg = cfg
        self.calls = 0  # judge calls made (both orders count with position_swap)
        self.failures = 0  # calls that gave no verdict

    def compare(self, prompts: list, responses_a: list[str], responses_b: list[str]) -> list[float | None]:
        if not len(prompts) == len(responses_a) == len(responses_b):
            raise ValueError(f"{len(prompts)} prompts, {len(responses_a)} responses_a and {len(responses_b)} "
                             "responses_b (one pair per prompt)")
        if not prompts:
            return []
        prompts, responses_a, responses_b = list(prompts), list(responses_a), list(responses_b)
        if not self.cfg.position_swap:
            return self._judge(prompts, responses_a, responses_b)
        # Both orders in one batch; v_ba is a verdict on (B, A), so A's advantage there is -v_ba.
        n = len(prompts)
        both = self._judge(prompts * 2, responses_a + responses_b, responses_b + responses_a)
        return [None if ab is None or ba is None else (ab - ba) / 2 for ab, ba in zip(both[:n], both[n:])]

    def _judge(self, prompts, responses_a, responses_b) -> list[float | None]:
        results = self._ask(prompts, responses_a, responses_b)
        self.calls += len(results)
        reasons = [reason for verdict, reason in results if verdict is None]
        self.failures += len(reasons)
        if reasons:  # one line per compare(), however many calls failed
            kinds = Counter(reason.split(": ", 1)[0] for reason in reasons)  # e.g. "HTTP 500" x3
            log.warning("judge (%s): %d of %d calls gave no verdict (%s); e.g. %s", self.cfg.type, len(reasons),
                        len(results), ", ".join(f"{k} x{c}" for k, c in kinds.most_common(3)), reasons[0])
        return [verdict for verdict, _ in results]

    def _ask(self, prompts, responses_a, responses_b) -> list[tuple[float | None, str]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _shorten(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else "..." + text[-limit:]


class OpenAIJudge(Judge):
    """A judge behind an OpenAI-compatible `POST {base_url}/chat/completions`, up to
    `max_concurrency` calls in flight. Transport errors, timeouts, 429 and 5xx are retried with
    exponential backoff; other 4xx and malformed or unparsable replies fail at once."""

    def __init__(self, cfg: JudgeConfig, backoff_s: float = 0.2):
        super().__init__(cfg)
        if not cfg.model:
            raise ConfigError("reward.judge.model: required with reward.judge.type=openai (the served model's name)")
        self.backoff_s = backoff_s
        self.url = cfg.base_url.rstrip("/")
        api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=cfg.timeout_s, limits=limits)
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="judge")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()

    def _ask(self, prompts, responses_a, responses_b):
        return list(self._pool.map(self._call, map(self.messages, prompts, responses_a, responses_b)))

    def _call(self, messages: list[dict]) -> tuple[float | None, str]:
        body = {"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
                "top_p": self.cfg.top_p, "max_tokens": self.cfg.max_tokens}
        attempts = self.cfg.retries + 1
        last_error = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self._http.post("/chat/completions", json=body)
            except httpx.TransportError as e:  # refused or dropped connections, timeouts
                last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last_error = f"HTTP {response.status_code}: {_shorten(response.text, 80)}"
                continue
            if response.status_code >= 400:  # our request is wrong: asking again cannot help
                return None, f"HTTP {response.status_code}: {_shorten(response.text, 80)}"
            return self._read_reply(response)
        return None, f"no reply after {attempts} attempts: {last_error}"

    def _read_reply(self, response: httpx.Response) -> tuple[float | None, str]:
        try:
            # a reasoning server may put its thinking in message.reasoning_content: only content is read
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            return None, f"malformed reply ({type(e).__name__}): {_shorten(response.text, 80)!r}"
        if not isinstance(content, str) or not content.strip():
            return None, "empty message content"
        verdict = self.parse(content)
        return verdict, "" if verdict is not None else f"no verdict in the reply: {_shorten(content, 80)!r}"


class LocalJudge(Judge):
    """A judge model run in process on the rollout engine (`backend` hf or vllm); all pairs of a
    compare() go in one generate call, sampled with a fixed seed."""

    def __init__(self, cfg: JudgeConfig, seed: int = 0):
        super().__init__(cfg)
        if not cfg.model:
            raise ConfigError(f"reward.judge.model: required with reward.judge.type={cfg.type} "
                              "(a model folder or builtin:NAME)")
        import torch

        from alignment.config import ModelConfig, RolloutConfig
        from alignment.models import load_causal_lm, load_tokenizer
        from alignment.rollout import make_engine

        model_cfg = ModelConfig(path=cfg.model)
        self.tokenizer = load_tokenizer(model_cfg)
        hf_copy = None
        if cfg.backend == "hf":
            hf_copy = load_causal_lm(model_cfg).to("cuda" if torch.cuda.is_available() else "cpu")
        self.engine = make_engine(RolloutConfig(backend=cfg.backend), model_cfg, self.tokenizer, bf16=False,
                                  seed=seed, hf_copy=hf_copy)
        self.seed = seed

    def _encode(self, messages: list[dict]) -> list[int]:
        if self.tokenizer.chat_template:
            ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding or a plain list
        text = "\n\n".join(m["content"] for m in messages)  # a base model without a template
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def _ask(self, prompts, responses_a, responses_b):
        from alignment.rollout import SamplingParams

        ids = [self._encode(self.messages(p, a, b)) for p, a, b in zip(prompts, responses_a, responses_b)]
        sampling = SamplingParams(n=1, max_new_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature,
                                  top_p=self.cfg.top_p, seed=self.seed)
        rollouts = self.engine.generate(ids, sampling, prompt_uids=list(range(len(ids))))
        texts = self.tokenizer.batch_decode(rollouts.response_ids, skip_special_tokens=True)
        results = []
        for text, finish in zip(texts, rollouts.finish_reasons):
            verdict = self.parse(text)
            results.append((verdict, "" if verdict is not None else
                            f"no verdict in the output ({finish}): {_shorten(text, 80)!r}"))
        return results


def _answer_instruction_messages(prompt, response_a, response_b) -> list[dict]:
    return judge_messages(prompt, response_a, response_b, instruction=ANSWER_INSTRUCTION)


def parse_answer(text: str) -> float | None:
    """The last <answer>...</answer> block; inside it the last standalone A or B -> +1 / -1; else None."""
    blocks = _ANSWER.findall(text)
    choices = _ANSWER_CHOICE.findall(blocks[-1]) if blocks else []
    return (VERDICT_A if choices[-1] == "A" else VERDICT_B) if choices else None


class GenerativeRMJudge(LocalJudge):
    """A Think-RM style generative reward model: it reasons, then answers <answer>A</answer> or
    <answer>B</answer>. Replace `messages` / `parse` for another output format (e.g. scores -3..3)."""

    messages = staticmethod(_answer_instruction_messages)
    parse = staticmethod(parse_answer)


JUDGES = {"openai": OpenAIJudge, "local": LocalJudge, "generative_rm": GenerativeRMJudge}


def build_judge(cfg: JudgeConfig) -> Judge:
    if cfg.type not in JUDGES:
        raise ConfigError(f"reward.judge.type: unknown {cfg.type!r} (valid: {', '.join(JUDGES)})")
    return JUDGES[cfg.type](cfg)
