"""Datasets: local json/jsonl/parquet/csv/arrow files, `save_to_disk` folders, folders of data files,
hub datasets (`data.source: datasets`), reasoning-gym tasks, and weighted mixtures of them.

Rows are validated on load; a malformed row is an error naming the file, the row and the field. Rows
are numbered from 1: a jsonl row by its line, a json row by its place in the list, a csv row by its
place after the header, a `datasets` row by its place in its split. A prompt or a response is plain
text or chat messages (a non-empty list of `{"role", "content"}` objects). `data.columns` renames the
data's fields to ours first (`{prompt: question}`: our `prompt` is the row's `question`).

Folders and hub names go through `datasets` only: `load_from_disk` for a `save_to_disk` folder (a
Dataset, or a DatasetDict whose `data.split` / `data.eval_split` are picked), else `load_dataset(path,
data.name)` for a folder of data files and for a hub name alike (the same code path).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import replace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignment.config import ConfigError, DataConfig

log = logging.getLogger("alignment")


class DataError(ValueError):
    """A data file or row that cannot be used."""


@dataclass
class Example:
    prompt: str | list[dict]  # plain text or chat messages
    answer: Any = None  # for verifiable rewards
    entry: dict | None = None  # the reasoning-gym entry, for its own answer checker
    # the row's other fields under their names in the data (TRL-style reward functions get them as keywords)
    extra: dict = field(default_factory=dict)
    origin: str = ""  # the file (or dataset and split) of the row, for messages
    row: int = 0  # its 1-based row number there


@dataclass
class Pair:
    prompt: str | list[dict]
    chosen: str | list[dict]  # response text or assistant messages
    rejected: str | list[dict]
    strength: int | None = None  # signed preference strength, if the data has it
    index: int = 0  # row position in its file (outliers.jsonl names pairs by it)


@dataclass
class Demonstration:
    prompt: str | list[dict]
    completion: str | list[dict]


CONVERSATION = (str, list)  # a field of plain text or chat messages
ROLES = ("system", "user", "assistant", "tool")


def _parse_json(text: str, where: str, one_line: bool) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"column {e.colno}" if one_line else f"line {e.lineno}, column {e.colno}"
        raise DataError(f"{where}: invalid JSON at {at} ({e.msg})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply") from None


def _numbered_rows(path: str | Path) -> list[tuple[int, Any]]:
    """(row number, row) of a local json (a list of objects), jsonl or parquet file."""
    path = Path(path)
    if not path.is_file():
        hint = "" if path.suffix.lower() in DATA_SUFFIXES else " (a hub dataset needs data.source=datasets)"
        raise DataError(f"data file not found: {path}{hint}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows, offset = [], 0
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}: row {line_no}: not UTF-8 text (byte {offset + e.start} of the file)"
                                    ) from None
                offset += len(line)
                if text.strip():
                    rows.append((line_no, _parse_json(text, f"{path}: row {line_no}", one_line=True)))
        return rows
    if suffix == ".json":
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise DataError(f"{path}: not UTF-8 text (byte {e.start}, line {line})") from None
        rows = _parse_json(text, str(path), one_line=False)
        if isinstance(rows, dict) and isinstance(rows.get("data"), list):
            rows = rows["data"]
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of rows")
        return list(enumerate(rows, 1))
    if suffix in (".parquet", ".csv", ".arrow"):
        import datasets

        try:
            if suffix == ".parquet":
                table = datasets.Dataset.from_parquet(str(path))
            elif suffix == ".csv":
                table = datasets.Dataset.from_csv(str(path))
            else:
                table = _arrow_file(path)
            return list(enumerate(table, 1))
        except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds for a damaged file
            raise DataError(f"{path}: cannot read {suffix[1:]} ({type(e).__name__}: {e})") from None
    raise DataError(f"{path}: unsupported data file type '{suffix}' (use .json, .jsonl, .parquet, .csv or .arrow, "
                    "or a folder)")


DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow")


def _arrow_file(path: Path):
    """An .arrow file: the stream format `datasets` writes (a save_to_disk shard), or an Arrow IPC file."""
    import datasets

    try:
        return datasets.Dataset.from_file(str(path))
    except Exception:  # noqa: BLE001 - not the stream format: try the IPC file (Feather v2) format
        from pyarrow import feather

        return datasets.Dataset(feather.read_table(str(path), memory_map=False))


def read_rows(path: str | Path) -> list:
    """Rows of a local json (a list of objects), jsonl or parquet file."""
    return [row for _, row in _numbered_rows(path)]


def _conversation_problem(value: str | list) -> str | None:
    """Why a prompt or response cannot be used, or None: text must not be blank; messages must be
    objects with a `role` from ROLES and a string `content`, and hold some text."""
    if isinstance(value, str):
        return None if value.strip() else ": empty text"
    if not value:
        return ": no messages"
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            return f"[{i}]: expected a message object, got {type(message).__name__}"
        if "role" not in message:
            return f"[{i}]: message has no 'role'"
        if message["role"] not in ROLES:
            return f"[{i}]: message role must be one of {', '.join(ROLES)}, got {message['role']!r}"
        if "content" not in message:
            return f"[{i}]: message has no 'content'"
        if not isinstance(message["content"], str):
            return f"[{i}]: message 'content' must be str, got {type(message['content']).__name__}"
    if not any(m["content"].strip() for m in value):
        return ": every message is empty"
    return None


def validate_rows(rows: list, required: dict[str, tuple[type, ...]], origin: str) -> None:
    """Each row a dict with each required field of an allowed type; row numbers are 1-based (a row's
    `_row` key keeps its number in the file). A field allowed to be CONVERSATION (str or list) must be
    usable text or chat messages; any other text field must not be blank."""
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"{origin}: row {i}: expected an object, got {type(row).__name__}")
        number = row.get("_row", i)
        for name, types_ in required.items():
            if name not in row:
                raise DataError(f"{origin}: row {number}: missing field '{name}'")
            value = row[name]
            if not isinstance(value, types_) or (isinstance(value, bool) and bool not in types_):
                allowed = " or ".join(t.__name__ for t in types_)
                raise DataError(f"{origin}: row {number}: field '{name}' must be {allowed}, "
                                f"got {type(value).__name__}")
            if tuple(types_) == CONVERSATION:
                problem = _conversation_problem(value)
            else:
                problem = ": empty text" if isinstance(value, str) and not value.strip() else None
            if problem:
                raise DataError(f"{origin}: row {number}: field '{name}'{problem}")


def _rows_from(cfg: DataConfig, path: str, split: str) -> tuple[list[dict], str]:
    """The rows of a file or a `datasets` name, each an object with `_row`, its number in the file."""
    if Path(path).suffix.lower() in (".json", ".jsonl", ".parquet") or Path(path).exists():
        numbered, origin = _numbered_rows(path), path
    else:
        import datasets

        try:
            numbered, origin = list(enumerate(datasets.load_dataset(path, split=split), 1)), f"{path}[{split}]"
        except Exception as e:  # noqa: BLE001 - any hub/dataset failure becomes one clear message
            raise DataError(f"cannot load dataset '{path}' (split {split}): {e}") from e
    for number, row in numbered:
        if not isinstance(row, dict):
            raise DataError(f"{origin}: row {number}: expected an object, got {type(row).__name__}")
    return [{**row, "_row": number} for number, row in numbered], origin


ANSWER = (str, int, float)  # what a verifiable reward compares a response with


def _prompt_examples(rows: list[dict], origin: str, answer_needed_by: str | None) -> list[Example]:
    validate_rows(rows, {"prompt": CONVERSATION}, origin)
    if answer_needed_by:
        for row in rows:
            if row.get("answer") is None:
                raise DataError(f"{origin}: row {row['_row']}: missing field 'answer' ({answer_needed_by} checks "
                                "each response against it)")
        validate_rows(rows, {"answer": ANSWER}, origin)
    return [Example(prompt=r["prompt"], answer=r.get("answer")) for r in rows]


def _reasoning_gym(cfg: DataConfig, size: int, seed: int) -> list[Example]:
    import reasoning_gym

    if not cfg.task:
        raise ConfigError("data.task: required with data.source=reasoning_gym (e.g. chain_sum)")
    try:
        dataset = reasoning_gym.create_dataset(cfg.task, size=size, seed=seed, **cfg.task_args)
    except Exception as e:  # noqa: BLE001 - unknown task or bad task_args
        raise ConfigError(f"data.task={cfg.task!r} with data.task_args={cfg.task_args}: {e}") from e
    suffix = cfg.prompt_suffix
    return [Example(prompt=e["question"] + suffix, answer=e["answer"], entry=e) for e in dataset]


def load_prompts(cfg: DataConfig, seed: int, answer_needed_by: str | None = None
                 ) -> tuple[list[Example], list[Example]]:
    """(train, held-out) prompt examples; with `answer_needed_by` (what needs them, e.g.
    "reward.type=verifiable"), every file row must have an `answer`."""
    if cfg.source == "reasoning_gym":
        # Held-out problems come from a different generator seed.
        return _reasoning_gym(cfg, cfg.size, seed), _reasoning_gym(cfg, cfg.eval_size, seed + 1_000_003)
    if not cfg.path:
        raise ConfigError(f"data.path: required with data.source={cfg.source}")
    rows, origin = _rows_from(cfg, cfg.path, cfg.split)
    train = _prompt_examples(rows, origin, answer_needed_by)
    if not train:
        raise DataError(f"{origin}: no rows")
    held_out: list[Example] = []
    if cfg.eval_path:
        rows, origin = _rows_from(cfg, cfg.eval_path, "test")
        held_out = _prompt_examples(rows, origin, answer_needed_by)[: cfg.eval_size]
    if cfg.prompt_suffix:
        for ex in train + held_out:
            if isinstance(ex.prompt, str):
                ex.prompt += cfg.prompt_suffix
    return train, held_out


def _rows_with_held_out(cfg: DataConfig, seed: int) -> tuple[list[dict], str, list[dict], str]:
    """Training rows and held-out rows: `data.eval_path` if given, else a seeded `data.eval_fraction`.
    Each row dict gets `_row`, its 1-based number in its file."""
    if not cfg.path:
        raise ConfigError(f"data.path: required with data.source={cfg.source}")
    rows, origin = _rows_from(cfg, cfg.path, cfg.split)
    if not rows:
        raise DataError(f"{origin}: no rows")
    if cfg.eval_path:
        held, held_origin = _rows_from(cfg, cfg.eval_path, "test")
        return rows, origin, held[: cfg.eval_size], held_origin
    if cfg.eval_fraction > 0:
        count = max(1, round(len(rows) * cfg.eval_fraction))
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + 17)).tolist()
        return [rows[i] for i in sorted(order[count:])], origin, [rows[i] for i in sorted(order[:count])], origin
    return rows, origin, [], origin


def load_pairs(cfg: DataConfig, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out) preference pairs `{"prompt", "chosen", "rejected", "strength"?}`."""
    rows, origin, held, held_origin = _rows_with_held_out(cfg, seed)

    def pairs(rows, origin):
        validate_rows(rows, {"prompt": CONVERSATION, "chosen": CONVERSATION, "rejected": CONVERSATION}, origin)
        for r in rows:
            if r.get("strength") is not None and (not isinstance(r["strength"], int) or isinstance(r["strength"], bool)):
                raise DataError(f"{origin}: row {r['_row']}: field 'strength' must be a signed int")
        return [Pair(r["prompt"], r["chosen"], r["rejected"], r.get("strength"), r["_row"] - 1) for r in rows]

    return pairs(rows, origin), pairs(held, held_origin)


def load_demonstrations(cfg: DataConfig, seed: int) -> tuple[list[Demonstration], list[Demonstration]]:
    """(train, held-out) demonstrations `{"prompt", "completion"}` or `{"messages": [...]}` (the
    last assistant message is the completion); from a reasoning-gym task, its answers."""
    if cfg.source == "reasoning_gym":
        # Drawn with their own generator seed, so prompts of the same task and seed (an online
        # stage's) are unseen; held-out problems are the prompts' held-out ones.
        train, held = _reasoning_gym(cfg, cfg.size, seed + 7_919), _reasoning_gym(cfg, cfg.eval_size, seed + 1_000_003)
        return ([Demonstration(e.prompt, str(e.answer)) for e in train],
                [Demonstration(e.prompt, str(e.answer)) for e in held])
    rows, origin, held, held_origin = _rows_with_held_out(cfg, seed)

    def demos(rows, origin):
        out = []
        for r in rows:
            if "messages" in r:
                validate_rows([r], {"messages": (list,)}, origin)
                problem = _conversation_problem(r["messages"])
                msgs = r["messages"]
                if problem is None and not (len(msgs) >= 2 and msgs[-1]["role"] == "assistant"
                                            and msgs[-1]["content"].strip()):
                    problem = ": must be a prompt, then an assistant message with text (the completion)"
                if problem:
                    raise DataError(f"{origin}: row {r['_row']}: field 'messages'{problem}")
                out.append(Demonstration(msgs[:-1], [msgs[-1]]))
            else:
                validate_rows([r], {"prompt": CONVERSATION, "completion": CONVERSATION}, origin)
                out.append(Demonstration(r["prompt"], r["completion"]))
        return out

    return demos(rows, origin), demos(held, held_origin)


def in_both_orders(prompts: list, firsts: list, seconds: list) -> tuple[list, list, list]:
    """Every pair (prompt, A, B) followed by all of them swapped, (prompt, B, A): the position swap of
    judges and preference models. A score s(A, B) then comes back as (s[:n] - s[n:]) / 2."""
    return list(prompts) * 2, list(firsts) + list(seconds), list(seconds) + list(firsts)


def as_messages(prompt: str | list[dict], response: str | list[dict] | None = None) -> list[dict]:
    """Chat messages of a prompt (and a response): plain text becomes a user / assistant turn."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if response is not None:
        messages += [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
    return messages


def message_text(content: str | list[dict]) -> str:
    """Plain text of a prompt or response given as text or chat messages (for tokenizers without a
    chat template)."""
    return content if isinstance(content, str) else "\n".join(m["content"] for m in content)


def _template_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding or a plain list


def encode_prompt(tokenizer, prompt: str | list[dict], chat_template: bool) -> list[int]:
    if chat_template and tokenizer.chat_template:
        return _template_ids(tokenizer, as_messages(prompt), add_generation_prompt=True)
    return tokenizer(message_text(prompt), add_special_tokens=True)["input_ids"]


def encode_response(tokenizer, prompt: str | list[dict], prompt_ids: list[int], response: str | list[dict],
                    chat_template: bool) -> list[int]:
    """Token ids of a response after its encoded prompt: the template's assistant turn (end-of-turn
    token included) when the tokenizer has a chat template, else the text followed by EOS."""
    if chat_template and tokenizer.chat_template:
        full = _template_ids(tokenizer, as_messages(prompt, response))
        if full[: len(prompt_ids)] == prompt_ids:
            return full[len(prompt_ids):]
    return tokenizer(message_text(response), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def fit_length(prompt_ids: list[int], response_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut a too-long sequence: the response keeps at least half the budget, the prompt loses its start."""
    if len(prompt_ids) + len(response_ids) <= max_length:
        return prompt_ids, response_ids
    response_ids = response_ids[: max(max_length - len(prompt_ids), max_length // 2)]
    return prompt_ids[len(prompt_ids) - (max_length - len(response_ids)):], response_ids


def encode_conversations(tokenizer, prompts: list, responses: list, chat_template: bool,
                         max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and response token ids for teacher forcing (SFT, DPO), each pair cut to max_length."""
    prompt_ids, response_ids = [], []
    for prompt, response in zip(prompts, responses):
        p_ids = encode_prompt(tokenizer, prompt, chat_template)
        p_ids, r_ids = fit_length(p_ids, encode_response(tokenizer, prompt, p_ids, response, chat_template),
                                  max_length)
        prompt_ids.append(p_ids)
        response_ids.append(r_ids)
    return prompt_ids, response_ids


def step_indices(step: int, batch_size: int, num_examples: int, seed: int) -> list[int]:
    """Prompt indices of a rollout step: a fresh permutation each epoch, a function of (seed, step).

    Being stateless makes resume exact and keeps every rank's view of the global batch identical.
    """
    out = []
    start = step * batch_size
    for pos in range(start, start + batch_size):
        epoch, offset = divmod(pos, num_examples)
        out.append(_epoch_order(seed, epoch, num_examples)[offset])
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, num_examples: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 7919 + epoch)
    return torch.randperm(num_examples, generator=gen).tolist()
