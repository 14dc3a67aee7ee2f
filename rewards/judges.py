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
- `generative_rm`: a Think-RM generative reward model (trainer: think_rm_sft, then think_rm_rl) on the same engine.

The format (`judge.verdict`): `label` asks for <label>1|2|0</label>; `binary` / `multiclass` are
Think-RM's <answer> formats (rewards/generative.py), so a GenRM served by `vllm serve` is an `openai`
judge with `verdict: binary`. Each call's output text is kept (`judge()`), for Think-RM's
length-weighted pairwise strengths. Every format reads only the text outside the reasoning (from the
first </think> on, less later <think> blocks), where its blocks must each hold exactly one valid
choice and agree: a label or answer inside the reasoning, a hedge ("1 or 2") or two different
verdicts give None (unparsable, a failure).

`judge.timeout_s` bounds each HTTP call (attempt) of the `openai` backend in wall-clock time, from
connecting to the last byte of the reply however slowly it arrives (rewards/remote.py's
`BoundedClient`); a call past it is a timeout, retried like one, so a judge call takes at most
(retries + 1) x timeout_s plus the backoff.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from alignment.config import ConfigError, JudgeConfig
from alignment.data import in_both_orders
from alignment.models import resolve_path
from rewards.generative import GenRMFormat, encode_judge_prompt, judge_messages, read_verdict
from rewards.remote import BoundedClient

log = logging.getLogger("alignment")
logging.getLogger("httpx").setLevel(logging.WARNING)  # not one log line per judge call

VERDICT_A, VERDICT_B, TIE = 1.0, -1.0, 0.0

LABEL_INSTRUCTION = """Reason about the two responses first if that helps. Then end your reply with exactly \
one of these labels and nothing after it:
<label>1</label> if Assistant A's response is better,
<label>2</label> if Assistant B's response is better,
<label>0</label> if you cannot tell which is better."""

_LABEL_VERDICTS = {"1": VERDICT_A, "2": VERDICT_B, "0": TIE}


def parse_verdict(text: str) -> float | None:
    """The verdict <label>X</label> outside the reasoning (from the first </think> on: a reasoning model
    whose chat template opens <think> in the prompt emits only the closing tag): 1 -> A, 2 -> B,
    0 -> tie. None when there is no label there, a label holds anything else, or labels disagree
    (rewards.generative.read_verdict)."""
    return read_verdict(text, "label", _LABEL_VERDICTS)


class LabelFormat:
    """The default judge format: the shared judge prompt asking for <label>1|2|0</label>."""

    prefill = ""

    def __init__(self, criteria: str = ""):
        self.criteria = criteria

    def messages(self, prompt, response_a: str, response_b: str) -> list[dict]:
        return judge_messages(prompt, response_a, response_b, instruction=LABEL_INSTRUCTION, criteria=self.criteria)

    parse = staticmethod(parse_verdict)


def judge_format(cfg: JudgeConfig) -> LabelFormat | GenRMFormat:
    """`judge.verdict`: label for openai / local judges, binary or multiclass for a GenRM. Unset, it
    is label for openai / local, and for generative_rm the format saved with the model (genrm.json,
    written by the think_rm trainers), else binary; `think_prefill` and `criteria` likewise."""
    verdict = cfg.verdict or ("label" if cfg.type != "generative_rm" else None)
    if verdict == "label":
        return LabelFormat(cfg.criteria)
    folder = resolve_path(cfg.model) if cfg.type == "generative_rm" and cfg.model else None
    return GenRMFormat.of_model(folder, verdict=verdict, think_prefill=cfg.think_prefill,
                                criteria=cfg.criteria or None)


@dataclass
class Judgement:
    """One judge call on (A, B)."""

    verdict: float | None  # in [-1, 1], > 0: A better; None: no valid verdict
    text: str = ""  # the judge's output ("" when the call failed)
    reason: str = ""  # why there is no verdict


class Judge:
    """`compare(prompts, responses_a, responses_b) -> list[float | None]` (+1 A better, -1 B better,
    0 tie, None: no valid verdict); `judge(...)` gives each call's `Judgement` (verdict and output
    text) without position swap. Backends implement `_ask`, one Judgement per pair; `fmt` is the
    prompt format and its parser (`judge_format`)."""

    def __init__(self, cfg: JudgeConfig):
        self.cfg = cfg
        self.fmt = judge_format(cfg)
        self.calls = 0  # judge calls made (both orders count with position_swap)
        self.failures = 0  # calls that gave no verdict

    def compare(self, prompts: list, responses_a: list[str], responses_b: list[str]) -> list[float | None]:
        if not self.cfg.position_swap:
            return [j.verdict for j in self.judge(prompts, responses_a, responses_b)]
        # Both orders in one batch; v_ba is a verdict on (B, A), so A's advantage there is -v_ba.
        n = len(prompts)
        both = [j.verdict for j in self.judge(*in_both_orders(prompts, responses_a, responses_b))]
        return [None if ab is None or ba is None else (ab - ba) / 2 for ab, ba in zip(both[:n], both[n:])]

    def judge(self, prompts: list, responses_a: list[str], responses_b: list[str]) -> list[Judgement]:
        """One call per pair, in the order given."""
        if not len(prompts) == len(responses_a) == len(responses_b):
            raise ValueError(f"{len(prompts)} prompts, {len(responses_a)} responses_a and {len(responses_b)} "
                             "responses_b (one pair per prompt)")
        if not len(prompts):
            return []
        results = self._ask(list(prompts), list(responses_a), list(responses_b))
        self.calls += len(results)
        reasons = [j.reason for j in results if j.verdict is None]
        self.failures += len(reasons)
        if reasons:  # one line per call batch, however many calls failed
            kinds = Counter(reason.split(": ", 1)[0] for reason in reasons)  # e.g. "HTTP 500" x3
            log.warning("judge (%s): %d of %d calls gave no verdict (%s); e.g. %s", self.cfg.type, len(reasons),
                        len(results), ", ".join(f"{k} x{c}" for k, c in kinds.most_common(3)), reasons[0])
        return results

    def _read(self, text: str, finish: str = "") -> Judgement:
        verdict = self.fmt.parse(text)
        where = f" ({finish})" if finish else ""
        return Judgement(verdict, text, "" if verdict is not None else
                         f"no verdict in the output{where}: {_shorten(text, 80)!r}")

    def _ask(self, prompts, responses_a, responses_b) -> list[Judgement]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _shorten(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else "..." + text[-limit:]


class OpenAIJudge(Judge):
    """A judge behind an OpenAI-compatible `POST {base_url}/chat/completions`, up to
    `max_concurrency` calls in flight, each HTTP call cut off `timeout_s` after it starts. Transport
    errors, timeouts, 429 and 5xx are retried with exponential backoff; other 4xx and malformed or
    unparsable replies fail at once."""

    def __init__(self, cfg: JudgeConfig, backoff_s: float = 0.2):
        super().__init__(cfg)
        if not cfg.model:
            raise ConfigError("reward.judge.model: required with reward.judge.type=openai (the served model's name)")
        self.backoff_s = backoff_s
        self.url = cfg.base_url.rstrip("/")
        api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
        self._http = BoundedClient(self.url, cfg.timeout_s, headers, limits)
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="judge")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()

    def _ask(self, prompts, responses_a, responses_b):
        return list(self._pool.map(self._call, map(self.fmt.messages, prompts, responses_a, responses_b)))

    def _call(self, messages: list[dict]) -> Judgement:
        body = {"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
                "top_p": self.cfg.top_p, "max_tokens": self.cfg.max_tokens}
        if self.fmt.prefill:  # vLLM's extension: the reply continues an assistant turn opened with the prefill
            body.update(messages=messages + [{"role": "assistant", "content": self.fmt.prefill}],
                        continue_final_message=True, add_generation_prompt=False)
        response, last_error = self._http.request_retried("POST", "/chat/completions", self.cfg.retries,
                                                          self.backoff_s, lambda r: _shorten(r.text, 80), json=body)
        if response is None:
            return Judgement(None, reason=f"no reply after {self.cfg.retries + 1} attempts: {last_error}")
        if response.status_code >= 400:  # our request is wrong: asking again cannot help
            return Judgement(None, reason=f"HTTP {response.status_code}: {_shorten(response.text, 80)}")
        return self._read_reply(response)

    def _read_reply(self, response: httpx.Response) -> Judgement:
        try:
            # a reasoning server may put its thinking in message.reasoning_content: only content is read
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            return Judgement(None, reason=f"malformed reply ({type(e).__name__}): {_shorten(response.text, 80)!r}")
        if not isinstance(content, str) or not content.strip():
            return Judgement(None, reason="empty message content")
        return self._read(content)


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

    def _ask(self, prompts, responses_a, responses_b):
        from alignment.rollout import SamplingParams

        ids = [encode_judge_prompt(self.tokenizer, self.fmt.messages(p, a, b), self.fmt.prefill)
               for p, a, b in zip(prompts, responses_a, responses_b)]
        sampling = SamplingParams(n=1, max_new_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature,
                                  top_p=self.cfg.top_p, seed=self.seed)
        rollouts = self.engine.generate(ids, sampling, prompt_uids=list(range(len(ids))))
        texts = self.tokenizer.batch_decode(rollouts.response_ids, skip_special_tokens=True)
        return [self._read(text, finish) for text, finish in zip(texts, rollouts.finish_reasons)]


class GenerativeRMJudge(LocalJudge):
    """A Think-RM generative reward model on our engine: it reasons, then answers <answer>A</answer> /
    <answer>B</answer> (binary) or a score -3..3 (multiclass), in the format saved with the model."""


JUDGES = {"openai": OpenAIJudge, "local": LocalJudge, "generative_rm": GenerativeRMJudge}


def build_judge(cfg: JudgeConfig) -> Judge:
    if cfg.type not in JUDGES:
        raise ConfigError(f"reward.judge.type: unknown {cfg.type!r} (valid: {', '.join(JUDGES)})")
    return JUDGES[cfg.type](cfg)
