"""The scoring API's request bodies (contract: README.md, "Reward scoring server"), parsed and checked.

Bad input is answered before it costs anything, and never with a 500: in a thread, so that other
clients are not held up, the body's encoding and JSON, the schema and every item (422: strings valid
Unicode, chat messages non-empty lists of {role, content}, /get_reward texts not empty) and the item
count (413). An item that would fail in a model batch is refused here, before it can join one and fail
other clients' items with it.
"""

from __future__ import annotations

import json
from typing import Any, Union

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

DEFAULT_MAX_ITEMS = 8192
MAX_NESTING = 32  # levels of JSON inside a chat message's extra keys
MAX_ERRORS_SHOWN = 5


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # chat templates may read more keys (name, tool calls)
    role: str
    content: str


Text = Union[str, list[ChatMessage]]


def plain(text: Text) -> str | list[dict]:
    """A text as the scorer takes it: the string, or the messages as dicts."""
    return text if isinstance(text, str) else [m.model_dump() for m in text]


def _text_fault(text: str) -> str | None:
    """Why a string cannot reach a tokenizer, or None: JSON's \\u escapes can make lone surrogates."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not valid Unicode: a lone surrogate \\u{ord(text[e.start]):04x} at character {e.start}"
    return None


def _value_fault(value: Any) -> str | None:
    """The first string fault inside a JSON value (a chat message's extra keys), as 'where: why'.
    Iterative, so a deeply nested value cannot exhaust the stack."""
    stack = [(value, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_NESTING:
            return f"{where}: nested deeper than {MAX_NESTING} levels"
        if isinstance(value, str):
            if fault := _text_fault(value):
                return f"{where}: {fault}"
        elif isinstance(value, dict):
            for key, inner in value.items():
                if fault := _text_fault(key):
                    return f"{where}: key {fault}"
                stack.append((inner, f"{where}.{key}", depth + 1))
        elif isinstance(value, list):
            stack.extend((inner, f"{where}[{i}]", depth + 1) for i, inner in enumerate(value))
    return None


def _item_fault(text: Text, allow_empty: bool = True) -> str | None:
    """Why one prompt / response / query cannot be scored, or None."""
    if isinstance(text, str):
        return "an empty text (nothing to score)" if not text and not allow_empty else _text_fault(text)
    if not text:
        return "an empty conversation: send at least one {role, content} message"
    for j, message in enumerate(text):
        for key, value in (("role", message.role), ("content", message.content)):
            if fault := _text_fault(value):
                return f"[{j}].{key}: {fault}"
        if fault := _value_fault(message.model_extra or {}):
            return f"[{j}]{fault}"
    return None


def _check_items(fields: dict[str, list], allow_empty: bool = True) -> None:
    """422 naming the field and index of every item that would fail in a model batch (up to
    MAX_ERRORS_SHOWN), before it can join one and fail other clients' items with it."""
    faults = [f"{name}[{i}]{'' if fault.startswith(('[', '.')) else ': '}{fault}"
              for name, items in fields.items() for i, item in enumerate(items)
              if (fault := _item_fault(item, allow_empty))]
    if faults:
        raise HTTPException(422, "invalid request: " + _join_faults(faults))


def _join_faults(faults: list[str]) -> str:
    more = len(faults) - MAX_ERRORS_SHOWN
    return "; ".join(faults[:MAX_ERRORS_SHOWN]) + (f"; and {more} more" if more > 0 else "")


class ScoreRequest(BaseModel):
    prompts: list[Text]
    responses: list[Text]

    @model_validator(mode="after")
    def _one_response_per_prompt(self):
        if len(self.prompts) != len(self.responses):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.responses)} responses "
                             "(one response per prompt)")
        return self

    def count(self) -> int:
        return len(self.prompts)

    def check_items(self) -> None:
        _check_items({"prompts": self.prompts, "responses": self.responses})


class CompareRequest(BaseModel):
    prompts: list[Text]
    responses_a: list[Text]
    responses_b: list[Text]

    @model_validator(mode="after")
    def _one_pair_per_prompt(self):
        if not len(self.prompts) == len(self.responses_a) == len(self.responses_b):
            raise ValueError(f"{len(self.prompts)} prompts, {len(self.responses_a)} responses_a and "
                             f"{len(self.responses_b)} responses_b (one pair per prompt)")
        return self

    def count(self) -> int:
        return len(self.prompts)

    def check_items(self) -> None:
        _check_items({"prompts": self.prompts, "responses_a": self.responses_a, "responses_b": self.responses_b})


class GetRewardRequest(BaseModel):
    query: list[str]  # prompt + response, already formatted (chat template applied)
    prompts: list[str] | None = None  # sent by OpenRLHF's client; not used for scoring
    labels: list[Any] | None = None

    def count(self) -> int:
        return len(self.query)

    def check_items(self) -> None:
        _check_items({"query": self.query}, allow_empty=False)  # an empty text is zero tokens to a chat model


def _describe(error: dict) -> str:
    field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
    return f"{field or 'body'}: {error['msg']}"


def parse_body(model: type[BaseModel], body: bytes, content_type: str | None, max_items: int):
    """The body as a checked `model`, or an HTTPException: 415 for a content type other than JSON,
    413 for more than `max_items` items, 422 for everything else. Runs in a thread: a large body takes
    a while to decode and check."""
    if content_type and content_type.split(";")[0].strip().lower() != "application/json":
        raise HTTPException(415, f"Content-Type must be application/json (got {content_type})")
    try:
        values = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise HTTPException(422, f"the body is not valid UTF-8 (byte {e.start}: {body[e.start:e.start + 1]!r})")
    except json.JSONDecodeError as e:
        raise HTTPException(422, f"the body is not valid JSON ({e.msg}: line {e.lineno} column {e.colno})")
    except RecursionError:
        raise HTTPException(422, "the body is not valid JSON for this API (nested too deeply)")
    try:
        request = model.model_validate(values)
    except ValidationError as e:
        raise HTTPException(422, "invalid request: " + _join_faults([_describe(err) for err in e.errors()]))
    if request.count() > max_items:
        raise HTTPException(413, f"{request.count()} items in one request, over the limit of {max_items} "
                                 "(align serve-rm --max-items); split the request")
    request.check_items()
    return request
