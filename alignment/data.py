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
    origin: str = ""  # the file (or dataset and split) of the row, for messages
    row: int = 0  # its 1-based row number there


@dataclass
class Demonstration:
    prompt: str | list[dict]
    completion: str | list[dict]
    origin: str = ""  # the file (or dataset and split) of the row, for messages
    row: int = 0  # its 1-based row number there


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


def _open(cfg: DataConfig, path: str) -> tuple[Any, str]:
    """(what `path` holds, its name in messages): a data file's numbered rows [(number, row)], or a
    `datasets` Dataset or DatasetDict (a save_to_disk folder, a folder of data files, a hub name)."""
    folder = Path(path)
    # a file whatever data.source says (a hub dataset's eval_path may be a local file)
    if folder.is_file() or (cfg.source != "datasets" and not folder.is_dir()):
        return _numbered_rows(path), path
    import datasets

    try:
        if folder.is_dir() and ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()):
            return datasets.load_from_disk(str(folder)), path
        return datasets.load_dataset(path, cfg.name), f"{path}:{cfg.name}" if cfg.name else path
    except Exception as e:  # noqa: BLE001 - any hub/dataset failure becomes one clear message
        config = f" (config {cfg.name})" if cfg.name else ""
        raise DataError(f"cannot load dataset '{path}'{config}: {type(e).__name__}: {e}") from e


def _mapped(row: dict, columns: dict, origin: str) -> dict:
    """The row with our fields set from the data's (`data.columns`: ours <- theirs); theirs stay too."""
    values = {}
    for ours, theirs in columns.items():
        if theirs not in row:
            raise DataError(f"{origin}: row {row['_row']}: missing column '{theirs}' "
                            f"(data.columns maps {ours} <- {theirs})")
        values[ours] = row[theirs]
    row.update(values)
    return row


def _split_rows(cfg: DataConfig, opened: Any, label: str, split: str, optional: bool = False
                ) -> tuple[list[dict] | None, str]:
    """The rows of `split` of an opened source (a file or a single Dataset is its one table), each an
    object with `_row`, its number there, and `data.columns` applied; None for a split a DatasetDict
    lacks when `optional`."""
    if isinstance(opened, dict):  # a DatasetDict
        if split not in opened:
            if optional:
                return None, label
            raise DataError(f"{label}: no split '{split}' (it has {', '.join(opened) or 'none'}); "
                            f"set data.split / data.eval_split")
        numbered, origin = enumerate(opened[split], 1), f"{label}[{split}]"
    else:
        numbered, origin = (opened if isinstance(opened, list) else enumerate(opened, 1)), label
    rows = []
    for number, row in numbered:
        if not isinstance(row, dict):
            raise DataError(f"{origin}: row {number}: expected an object, got {type(row).__name__}")
        rows.append(_mapped({**row, "_row": number}, cfg.columns, origin))
    return rows, origin


def _rows_from(cfg: DataConfig, path: str, split: str) -> tuple[list[dict], str]:
    """The rows of `split` of a file, folder or `datasets` name (a file has one table, whatever the
    split), each an object with `_row`, its number in the file."""
    opened, label = _open(cfg, path)
    return _split_rows(cfg, opened, label, split)


ANSWER = (str, int, float)  # what a verifiable reward compares a response with


def _extra(row: dict, consumed: tuple[str, ...]) -> dict:
    """The row's fields besides the ones we read, under their names in the data (a mapped column keeps
    its own name too: with `{answer: solution}`, `solution` stays)."""
    return {k: v for k, v in row.items() if k not in consumed and k != "_row"}


def _prompt_examples(cfg: DataConfig, rows: list[dict], origin: str, answer_needed_by: str | None
                     ) -> list[Example]:
    validate_rows(rows, {"prompt": CONVERSATION}, origin)
    if answer_needed_by:
        for row in rows:
            if row.get("answer") is None:
                raise DataError(f"{origin}: row {row['_row']}: missing field 'answer' ({answer_needed_by} checks "
                                "each response against it)")
        validate_rows(rows, {"answer": ANSWER}, origin)
    out = [Example(prompt=r["prompt"], answer=r.get("answer"), extra=_extra(r, ("prompt", "answer")), origin=origin,
                   row=r["_row"]) for r in rows]
    for ex in out:
        if cfg.prompt_suffix and isinstance(ex.prompt, str):
            ex.prompt += cfg.prompt_suffix
    return out


def _reasoning_gym(cfg: DataConfig, size: int, seed: int) -> list[Example]:
    import reasoning_gym

    if not cfg.task:
        raise ConfigError("data.task: required with data.source=reasoning_gym (e.g. chain_sum)")
    try:
        dataset = reasoning_gym.create_dataset(cfg.task, size=size, seed=seed, **cfg.task_args)
    except Exception as e:  # noqa: BLE001 - unknown task or bad task_args
        raise ConfigError(f"data.task={cfg.task!r} with data.task_args={cfg.task_args}: {e}") from e
    suffix = cfg.prompt_suffix
    # `extra` holds the entry's fields besides question and answer (its `metadata`), so a TRL-style reward
    # function can take `metadata=`; the whole entry stays in `entry` for reasoning-gym's own checker.
    return [Example(prompt=e["question"] + suffix, answer=e["answer"], entry=e,
                    extra={k: v for k, v in e.items() if k not in ("question", "answer")},
                    origin=f"reasoning_gym:{cfg.task}", row=i) for i, e in enumerate(dataset, 1)]


def _load(cfg: DataConfig, seed: int, convert, generated=None) -> tuple[list, list]:
    """(train, held-out) of one source or of a mixture: `convert(cfg, rows, origin)` makes the items of a
    file's rows, `generated(cfg, seed)` those of a reasoning-gym task (None: not for this kind of data)."""
    if cfg.mixture:
        return _mixture(cfg, seed, convert, generated)
    if cfg.source == "reasoning_gym" and generated is not None:
        return generated(cfg, seed)
    rows, origin, held, held_origin = _rows_with_held_out(cfg, seed)
    return convert(cfg, rows, origin), convert(cfg, held, held_origin)


def load_prompts(cfg: DataConfig, seed: int, answer_needed_by: str | None = None
                 ) -> tuple[list[Example], list[Example]]:
    """(train, held-out) prompt examples; with `answer_needed_by` (what needs them, e.g.
    "reward.type=verifiable"), every file row must have an `answer`."""
    def generated(cfg, seed):  # held-out problems come from a different generator seed
        return _reasoning_gym(cfg, cfg.size, seed), _reasoning_gym(cfg, cfg.eval_size, seed + 1_000_003)

    return _load(cfg, seed, lambda c, rows, origin: _prompt_examples(c, rows, origin, answer_needed_by), generated)


def _rows_with_held_out(cfg: DataConfig, seed: int) -> tuple[list[dict], str, list[dict], str]:
    """Training rows (`data.split` of the path) and held-out rows: `data.eval_path` if given (its
    `data.eval_split`, or its only split), else a seeded `data.eval_fraction` of the training rows, else
    the path's own `data.eval_split` where it has one (a DatasetDict folder, a folder of data files, a hub
    dataset); at most `data.eval_size` of them but for eval_fraction. Each row dict gets `_row`, its
    1-based number in its file."""
    if cfg.mixture:
        raise ConfigError("data.mixture: not supported for this trainer's data; give data.path")
    if not cfg.path:
        raise ConfigError(f"data.path: required with data.source={cfg.source}")
    opened, label = _open(cfg, cfg.path)
    rows, origin = _split_rows(cfg, opened, label, cfg.split)
    if not rows:
        raise DataError(f"{origin}: no rows")
    if cfg.eval_path:
        held_open, held_label = _open(cfg, cfg.eval_path)
        split = cfg.eval_split
        if isinstance(held_open, dict) and split not in held_open and len(held_open) == 1:
            split = next(iter(held_open))
        held, held_origin = _split_rows(cfg, held_open, held_label, split)
        return rows, origin, held[: cfg.eval_size], held_origin
    if cfg.eval_fraction > 0:
        count = max(1, round(len(rows) * cfg.eval_fraction))
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + 17)).tolist()
        return [rows[i] for i in sorted(order[count:])], origin, [rows[i] for i in sorted(order[:count])], origin
    if isinstance(opened, dict) and cfg.eval_split != cfg.split:
        held, held_origin = _split_rows(cfg, opened, label, cfg.eval_split, optional=True)
        if held is not None:
            return rows, origin, held[: cfg.eval_size], held_origin
    return rows, origin, [], origin


def _mixture(cfg: DataConfig, seed: int, convert, generated) -> tuple[list, list]:
    """`data.mixture`: each entry is the data section with the entry's keys (path and eval_path are the
    entry's own). The mix has as many training items as its sources together; source i gets
    round(total * w_i / sum w) of them (largest remainder, so the shares are exact for any seed), drawn
    without replacement from a seeded permutation of its items, permuted afresh each time a source must
    repeat (upsampling), and the mix is shuffled. Held-out: `data.eval_path` when given, else each
    source's own held-out items (its eval_path, eval_fraction or eval split), interleaved, at most
    `data.eval_size`. Preference pairs are renumbered by their place in the mix (outliers.jsonl)."""
    base = replace(cfg, mixture=[], path=None, eval_path=None)
    trains, helds, names = [], [], []
    for entry in cfg.mixture:
        sub = replace(base, **{k: v for k, v in entry.items() if k != "weight"})
        if sub.source == "reasoning_gym" and generated is None:
            raise ConfigError("data.mixture: source reasoning_gym gives prompts or demonstrations only")
        train, held = _load(sub, seed, convert, generated)
        if not train:
            raise DataError(f"{sub.path or sub.task}: no rows")
        trains.append(train)
        helds.append(held)
        names.append(sub.path or f"reasoning_gym:{sub.task}")
    weights = [entry["weight"] for entry in cfg.mixture]
    total = sum(len(t) for t in trains)
    quotas = [total * w / sum(weights) for w in weights]
    counts = [int(q) for q in quotas]
    for i in sorted(range(len(quotas)), key=lambda i: counts[i] - quotas[i])[: total - sum(counts)]:
        counts[i] += 1  # largest remainders first
    gen = torch.Generator().manual_seed(seed * 7919 + 104_729)
    mixed = []
    for items, count in zip(trains, counts):
        picks: list[int] = []
        while len(picks) < count:
            picks += torch.randperm(len(items), generator=gen).tolist()
        mixed += [items[i] for i in picks[:count]]
    mixed = [mixed[i] for i in torch.randperm(len(mixed), generator=gen).tolist()]
    if cfg.eval_path:
        held_cfg = replace(base, path=cfg.eval_path, split=cfg.eval_split)
        opened, label = _open(held_cfg, cfg.eval_path)
        split = cfg.eval_split
        if isinstance(opened, dict) and split not in opened and len(opened) == 1:
            split = next(iter(opened))
        rows, origin = _split_rows(held_cfg, opened, label, split)
        held_out = convert(held_cfg, rows, origin)[: cfg.eval_size]
    else:
        held_out = [h[i] for i in range(max(map(len, helds), default=0)) for h in helds if i < len(h)][: cfg.eval_size]
    if mixed and isinstance(mixed[0], Pair):
        mixed = [replace(p, index=i) for i, p in enumerate(mixed)]
    log.info("data.mixture: %d training rows: %s", len(mixed),
             ", ".join(f"{n} {c} of {len(t)}" for n, c, t in zip(names, counts, trains)))
    return mixed, held_out


def _same_turn(a: dict, b: dict) -> bool:
    return a.get("role") == b.get("role") and a.get("content") == b.get("content")


def _implicit_prompt(chosen: list, rejected: list) -> int:
    """How many leading turns chosen and rejected share, as TRL's `extract_prompt`: the longest common
    prefix of turns, leaving each at least its last turn."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and _same_turn(chosen[shared], rejected[shared]):
        shared += 1
    return shared


def _repeated_prompt(prompt: str | list, response: str | list) -> int:
    """How many leading turns of a message-list response repeat the prompt (ultrafeedback_binarized's
    `chosen` is [the prompt's user turn, the assistant turn]): all of the prompt's turns, or 0."""
    lead = as_messages(prompt)
    if isinstance(response, list) and len(response) >= len(lead) and all(
            isinstance(m, dict) and _same_turn(m, p) for m, p in zip(response, lead)):
        return len(lead)
    return 0


def _pair(r: dict, origin: str) -> Pair:
    """A pair of a row, TRL's way: an explicit prompt; or none, chosen and rejected being whole
    conversations whose shared leading turns are the prompt; a response that repeats the prompt's turns
    first is read without them. After the prompt, a message-list response holds assistant turns only."""
    where = f"{origin}: row {r['_row']}"
    chosen, rejected = r.get("chosen"), r.get("rejected")
    if "prompt" not in r and isinstance(chosen, list) and isinstance(rejected, list):
        validate_rows([r], {"chosen": CONVERSATION, "rejected": CONVERSATION}, origin)
        skip = {"chosen": _implicit_prompt(chosen, rejected)}
        skip["rejected"] = skip["chosen"]
        if not skip["chosen"]:
            raise DataError(f"{where}: missing field 'prompt' (and 'chosen' and 'rejected' share no leading turns "
                            "to read as the prompt)")
        prompt = chosen[: skip["chosen"]]
    else:
        validate_rows([r], {"prompt": CONVERSATION, "chosen": CONVERSATION, "rejected": CONVERSATION}, origin)
        prompt = r["prompt"]
        skip = {"chosen": _repeated_prompt(prompt, chosen), "rejected": _repeated_prompt(prompt, rejected)}
    responses = {}
    for name in ("chosen", "rejected"):
        value = r[name][skip[name]:] if skip[name] else r[name]
        if isinstance(value, list):
            problem = _conversation_problem(value)
            bad = next((i for i, m in enumerate(value) if m["role"] != "assistant"), None) if not problem else None
            if bad is not None:
                problem = (f"[{skip[name] + bad}]: after the prompt, a response holds assistant turns only, got "
                           f"role {value[bad]['role']!r}")
            elif problem and skip[name]:
                problem = ": no response after the prompt's turns" if not value else problem
            if problem:
                raise DataError(f"{where}: field '{name}'{problem}")
        responses[name] = value
    if r.get("strength") is not None and (not isinstance(r["strength"], int) or isinstance(r["strength"], bool)):
        raise DataError(f"{where}: field 'strength' must be a signed int")
    return Pair(prompt, responses["chosen"], responses["rejected"], r.get("strength"), r["_row"] - 1, origin, r["_row"])


def load_pairs(cfg: DataConfig, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out) preference pairs: `{"prompt", "chosen", "rejected", "strength"?}`, or TRL's
    implicit prompt `{"chosen": [messages], "rejected": [messages]}` (see `_pair`)."""
    return _load(cfg, seed, lambda c, rows, origin: [_pair(r, origin) for r in rows])


def _demonstrations(rows: list[dict], origin: str) -> list[Demonstration]:
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
            out.append(Demonstration(msgs[:-1], [msgs[-1]], origin, r["_row"]))
        else:
            validate_rows([r], {"prompt": CONVERSATION, "completion": CONVERSATION}, origin)
            completion = r["completion"]
            skip = _repeated_prompt(r["prompt"], completion)  # a completion that repeats the prompt first
            if skip:
                completion = completion[skip:]
                problem = ": no completion after the prompt's turns" if not completion else \
                    _conversation_problem(completion)
                if problem:
                    raise DataError(f"{origin}: row {r['_row']}: field 'completion'{problem}")
            out.append(Demonstration(r["prompt"], completion, origin, r["_row"]))
    return out


def load_demonstrations(cfg: DataConfig, seed: int) -> tuple[list[Demonstration], list[Demonstration]]:
    """(train, held-out) demonstrations `{"prompt", "completion"}` or `{"messages": [...]}` (the
    last assistant message is the completion); from a reasoning-gym task, its answers."""
    def generated(cfg, seed):
        # Drawn with their own generator seed, so prompts of the same task and seed (an online
        # stage's) are unseen; held-out problems are the prompts' held-out ones.
        train, held = _reasoning_gym(cfg, cfg.size, seed + 7_919), _reasoning_gym(cfg, cfg.eval_size, seed + 1_000_003)
        return ([Demonstration(e.prompt, str(e.answer)) for e in train],
                [Demonstration(e.prompt, str(e.answer)) for e in held])

    return _load(cfg, seed, lambda c, rows, origin: _demonstrations(rows, origin), generated)


def cap_prompt_length(cfg: DataConfig, encode, train: list[Example], held_out: list[Example]
                      ) -> tuple[Any, list[Example], list[Example], str | None]:
    """`data.max_prompt_length` applied as `data.long_prompts` says: (encode, train, held-out, the line to
    log). Prompts are measured in tokens as `encode` makes them (after the chat template). `drop`
    removes the long ones, `truncate_left` returns an encode that keeps their last max_prompt_length
    tokens (TRL's convention), `error` raises a DataError naming the file and the first long rows."""
    cap = cfg.max_prompt_length
    if cap is None:
        return encode, train, held_out, None
    lengths = {"train": [len(encode(e.prompt)) for e in train], "held": [len(encode(e.prompt)) for e in held_out]}
    over = {k: [i for i, n in enumerate(v) if n > cap] for k, v in lengths.items()}
    if cfg.long_prompts == "error" and (over["train"] or over["held"]):
        which, sets = ("train", train) if over["train"] else ("held", held_out)
        first = sets[over[which][0]]
        same = [i for i in over[which] if sets[i].origin == first.origin]
        rows = ", ".join(str(sets[i].row or i + 1) for i in same[:5])
        more = len(over["train"]) + len(over["held"]) - min(5, len(same))
        raise DataError(f"{first.origin or 'prompts'}: row{'s' if len(same) > 1 else ''} {rows}"
                        f"{f' (and {more} more)' if more else ''}: prompt longer than data.max_prompt_length={cap} "
                        f"tokens (the longest has {max(lengths['train'] + lengths['held'])}); set "
                        "data.long_prompts=truncate_left or drop, or raise data.max_prompt_length")
    done = {"drop": "dropped", "truncate_left": f"cut to their last {cap} tokens", "error": "none"}[cfg.long_prompts]
    line = (f"data.max_prompt_length={cap}: {len(over['train'])} of {len(train)} training prompts and "
            f"{len(over['held'])} of {len(held_out)} held-out ones are longer (tokens after the chat template): "
            f"{done}")
    if cfg.long_prompts == "drop":
        long = {k: set(v) for k, v in over.items()}
        train = [e for i, e in enumerate(train) if i not in long["train"]]
        held_out = [e for i, e in enumerate(held_out) if i not in long["held"]]
        if not train:
            raise DataError(f"every training prompt is longer than data.max_prompt_length={cap} tokens")
    elif cfg.long_prompts == "truncate_left":
        full = encode

        def encode(prompt):
            return full(prompt)[-cap:]
    return encode, train, held_out, line


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
                         max_length: int, max_prompt_length: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and response token ids for teacher forcing (SFT, DPO), each pair cut to max_length; a prompt
    first keeps its last `max_prompt_length` tokens (data.long_prompts: truncate_left, TRL's DPO way)."""
    prompt_ids, response_ids = [], []
    for prompt, response in zip(prompts, responses):
        p_ids = encode_prompt(tokenizer, prompt, chat_template)
        r_ids = encode_response(tokenizer, prompt, p_ids, response, chat_template)
        p_ids, r_ids = fit_length(p_ids[-max_prompt_length:] if max_prompt_length else p_ids, r_ids, max_length)
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
