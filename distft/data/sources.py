"""Load and validate fine-tuning examples (GSM8K, generic instruction/chat JSONL).

Validation is eager: the whole file is read and every problem is collected, so a user fixes a bad
dataset in one pass instead of one crash per line. Each problem names ``file:line`` and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distft.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
MAX_LISTED_PROBLEMS = 20


@dataclass(frozen=True)
class Example:
    """One training/eval example.

    Attributes:
        messages: The conversation before the answer, e.g. ``({"role": "user", "content": ...},)``.
            Optional system message first; always ends with a user turn.
        response: The assistant answer that is trained on (and scored in evaluation).
        origin: Where the example came from (``"path/file.jsonl:LINE"`` or ``"openai/gsm8k:train[i]"``),
            for error messages.
        meta: Task data the scorer needs (``{"context": CREATE TABLE ...}`` for SQL).
    """

    messages: tuple[dict, ...]
    response: str
    origin: str
    meta: dict | None = field(default=None, compare=False)  # what a task's scorer needs besides the answer (SQL schema)


# A row parser turns one decoded JSON value into an Example, or returns a list of problems
# ("problem (fix)" strings without the location, which the caller adds).
RowParser = Callable[[Any, str], "Example | list[str]"]


def load_examples(
    name: str,
    path: str | None,
    split: str,
    *,
    hub_id: str = "openai/gsm8k",
    limit: int | None = None,
    system_prompt: str | None = None,
) -> list[Example]:
    """Load and validate every example of one split.

    Args:
        name: Dataset format: ``"gsm8k"`` (rows ``{"question", "answer"}``) or ``"jsonl"`` (rows
            ``{"prompt", "response", "system"?}`` or ``{"messages": [...]}``).
        path: A directory holding ``{split}.jsonl``; for ``name="jsonl"`` and split ``"train"`` it may
            also be a single ``.jsonl`` file. For ``gsm8k``, ``None`` downloads ``hub_id`` from the Hub.
        split: ``"train"`` or ``"test"``.
        hub_id: Hub dataset used when ``name="gsm8k"`` and ``path`` is None.
        limit: Keep only the first ``limit`` examples (after validating all of them).
        system_prompt: If given, prepended as a system message to examples that have none.

    Raises:
        DataError: The file is missing or malformed, or holds no examples.
        ConfigError: ``limit`` is not a positive integer.
    """
    parsers = PARSERS
    if name not in parsers:
        raise DataError(
            f"unknown dataset name {name!r}; valid names: {', '.join(sorted(parsers))} (set data.name)"
        )
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigError([f"data.limit={limit!r}: must be a positive integer, or null for all examples"])

    if name in HUB and path is None:
        examples = _load_hub(name, hub_id, split)
    else:
        file = _resolve_file(name, path, split)
        examples = _parse_records(_read_jsonl(file), parsers[name], where=str(file))

    if limit is not None:
        examples = examples[:limit]
    if system_prompt:
        examples = [_with_system_prompt(ex, system_prompt) for ex in examples]
    logger.info("loaded %d %s examples (split=%s)", len(examples), name, split)
    return examples


def _resolve_file(name: str, path: str | None, split: str) -> Path:
    """Find the JSONL file for ``split`` under ``path``, or explain what should be there."""
    if path is None:
        raise DataError(f"data.path is not set; dataset {name!r} needs data.path=DIR with {split}.jsonl")
    p = Path(path).expanduser()
    if p.is_dir():
        file = p / f"{split}.jsonl"
        if not file.is_file():
            present = sorted(f.name for f in p.glob("*.jsonl"))
            raise DataError(
                f"{file}: file not found; data.path={path} must be a directory holding {split}.jsonl "
                f"(one JSON object per line). JSONL files present: {present or 'none'}"
            )
        return file
    if p.is_file():
        if name == "jsonl" and split == "train" and p.suffix == ".jsonl":
            return p
        raise DataError(
            f"{p}: data.path must be a directory holding {split}.jsonl"
            + (
                " (a single .jsonl file is accepted only for name=jsonl, split=train)"
                if name == "jsonl"
                else ""
            )
        )
    raise DataError(
        f"{p}: data.path does not exist; point data.path at a directory holding {split}.jsonl"
        + (" (or, for the train split, at a single .jsonl file)" if name == "jsonl" else "")
    )


def _read_jsonl(file: Path) -> Iterable[tuple[str, Any]]:
    """Yield ``(origin, value)`` per non-blank line; value is a ``_BadJson`` when the line does not parse."""
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            origin = f"{file}:{lineno}"
            try:
                yield origin, json.loads(line)
            except json.JSONDecodeError as e:
                yield (
                    origin,
                    _BadJson(f"invalid JSON ({e.msg} at column {e.colno}) (write one JSON object per line)"),
                )


@dataclass(frozen=True)
class _BadJson:
    problem: str


def _parse_records(records: Iterable[tuple[str, Any]], parse: RowParser, *, where: str) -> list[Example]:
    """Parse every record, collecting all problems into one DataError."""
    examples: list[Example] = []
    problems: list[str] = []
    for origin, value in records:
        result = [value.problem] if isinstance(value, _BadJson) else parse(value, origin)
        if isinstance(result, Example):
            examples.append(result)
        else:
            problems.extend(f"{origin}: {p}" for p in result)
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:MAX_LISTED_PROBLEMS])
        rest = len(problems) - MAX_LISTED_PROBLEMS
        more = f"\n  ... and {rest} more problem(s)" if rest > 0 else ""
        raise DataError(f"{where}: {len(problems)} invalid row problem(s):\n{shown}{more}")
    if not examples:
        raise DataError(f"{where} contains no examples (the file is empty or only blank lines)")
    return examples


def _required_str(row: dict, key: str, problems: list[str]) -> str | None:
    """Return ``row[key]`` if it is a non-empty string, else record why not."""
    if key not in row:
        problems.append(f"missing field {key!r} (add a non-empty string {key!r})")
        return None
    value = row[key]
    if not isinstance(value, str):
        problems.append(
            f"field {key!r} must be a string, got {type(value).__name__} (make it a non-empty string)"
        )
        return None
    if not value.strip():
        problems.append(f"field {key!r} is empty (give it text or remove the row)")
        return None
    return value


def _not_object(value: Any) -> list[str]:
    return [f"row is a JSON {type(value).__name__}, not an object (write one JSON object per line)"]


def _parse_gsm8k_row(row: Any, origin: str) -> Example | list[str]:
    """GSM8K row: ``{"question": str, "answer": str}`` -> one user turn and the answer."""
    if not isinstance(row, dict):
        return _not_object(row)
    problems: list[str] = []
    question = _required_str(row, "question", problems)
    answer = _required_str(row, "answer", problems)
    if problems:
        return problems
    return Example(messages=({"role": "user", "content": question},), response=answer, origin=origin)


def _parse_jsonl_row(row: Any, origin: str) -> Example | list[str]:
    """Generic row: ``{"prompt", "response", "system"?}`` or ``{"messages": [...]}``."""
    if not isinstance(row, dict):
        return _not_object(row)
    if "messages" in row and "prompt" in row:
        return ["row has both 'messages' and 'prompt' (use one format per row)"]
    if "messages" in row:
        return _parse_messages(row["messages"], origin)
    if "prompt" in row or "response" in row:
        return _parse_prompt_response(row, origin)
    return [
        "row has neither 'prompt'/'response' nor 'messages' "
        '(use {"prompt": ..., "response": ...} or {"messages": [{"role": ..., "content": ...}, ...]})'
    ]


def _parse_prompt_response(row: dict, origin: str) -> Example | list[str]:
    problems: list[str] = []
    prompt = _required_str(row, "prompt", problems)
    response = _required_str(row, "response", problems)
    system = row.get("system")
    if system is not None:
        system = _required_str(row, "system", problems)
    if problems:
        return problems
    messages = ({"role": "system", "content": system},) if system else ()
    return Example(
        messages=(*messages, {"role": "user", "content": prompt}), response=response, origin=origin
    )


def _parse_messages(messages: Any, origin: str) -> Example | list[str]:
    """Chat row: the last message is the assistant answer; the one before it a user turn."""
    if not isinstance(messages, list) or not messages:
        return ['\'messages\' must be a non-empty list of {"role", "content"} objects']
    problems: list[str] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            problems.append(f'messages[{i}] is not an object (use {{"role": ..., "content": ...}})')
            continue
        role = m.get("role")
        if role not in ROLES:
            problems.append(f"messages[{i}] has invalid role {role!r} (use one of {', '.join(ROLES)})")
        elif role == "system" and i != 0:
            problems.append(
                f"messages[{i}] is a system message after the first turn (move it to messages[0])"
            )
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            problems.append(f"messages[{i}] content must be a non-empty string (got {content!r:.40})")
    if problems:
        return problems
    roles = [m["role"] for m in messages]
    if roles[-1] != "assistant":
        return [f"last message has role {roles[-1]!r} (the last message must be the assistant answer)"]
    if len(roles) < 2 or roles[-2] != "user":
        return ["the message before the final assistant answer must be a user turn (add the user's question)"]
    prompt = tuple({"role": m["role"], "content": m["content"]} for m in messages[:-1])
    return Example(messages=prompt, response=messages[-1]["content"], origin=origin)


def _parse_sql_row(row: Any, origin: str) -> Example | list[str]:
    """b-mc2/sql-create-context row: ``{"question", "context" (CREATE TABLE ...), "answer" (the SQL)}``."""
    if not isinstance(row, dict):
        return _not_object(row)
    problems: list[str] = []
    question = _required_str(row, "question", problems)
    context = _required_str(row, "context", problems)
    answer = _required_str(row, "answer", problems)
    if problems:
        return problems
    prompt = f"Schema:\n{context}\n\nQuestion: {question}\nAnswer with one SQL query."
    return Example(messages=({"role": "user", "content": prompt},), response=answer, origin=origin,
                   meta={"context": context})


def _parse_viggo_row(row: Any, origin: str) -> Example | list[str]:
    """GEM/viggo row: ``{"meaning_representation", "target" (the sentence), ...}``; the task writes the MR."""
    if not isinstance(row, dict):
        return _not_object(row)
    problems: list[str] = []
    mr = _required_str(row, "meaning_representation", problems)
    target = _required_str(row, "target", problems)
    if problems:
        return problems
    prompt = ("Give the meaning representation of this sentence about a video game, as function(attribute[value], "
              f"...):\n{target}")
    return Example(messages=({"role": "user", "content": prompt},), response=mr, origin=origin)


PARSERS: dict[str, RowParser] = {"gsm8k": _parse_gsm8k_row, "sql": _parse_sql_row, "viggo": _parse_viggo_row,
                                 "jsonl": _parse_jsonl_row}
# Hub datasets: (config name, row schema in words for the offline hint)
HUB = {"gsm8k": ("main", '{"question", "answer"}'), "sql": (None, '{"question", "context", "answer"}'),
       "viggo": (None, '{"meaning_representation", "target"}')}
SQL_TEST_ROWS = 1000  # b-mc2/sql-create-context has one split: the last rows of a seeded shuffle are held out


def _load_hub(name: str, hub_id: str, split: str) -> list[Example]:
    """Download a task's dataset from the Hub; explain how to use a local copy when offline. sql-create-context has
    only a train split: `test` is a fixed held-out 1,000 rows (seeded shuffle), `train` the rest."""
    config, schema = HUB[name]
    try:
        import datasets

        if name == "sql":
            ds = datasets.load_dataset(hub_id, split="train").shuffle(seed=0)
            keep = range(len(ds) - SQL_TEST_ROWS, len(ds)) if split == "test" else range(len(ds) - SQL_TEST_ROWS)
            ds = ds.select(keep)
        else:
            ds = datasets.load_dataset(hub_id, config, split=split) if config else \
                datasets.load_dataset(hub_id, split=split)
    except Exception as e:  # noqa: BLE001 - any failure here means "use a local copy"
        raise DataError(
            f"cannot load {hub_id} (split={split}) from the Hugging Face Hub ({type(e).__name__}: {e}). "
            f"The hub cannot be reached or the dataset is unavailable: set data.path=DIR to a directory "
            f"with train.jsonl/test.jsonl (rows {schema})"
        ) from e
    records = ((f"{hub_id}:{split}[{i}]", row) for i, row in enumerate(ds))
    return _parse_records(records, PARSERS[name], where=f"{hub_id}:{split}")


def with_fewshot(examples: list[Example], exemplars: list[Example], n: int, seed: int) -> list[Example]:
    """Each example with `n` solved exemplars before its question, as earlier user/assistant turns (the plain
    template then renders lm-eval's "Question: ...\nAnswer: ...\n\n" few-shot prompt). The exemplars are drawn per
    example with one seeded generator, so the same inputs always give the same prompts; an exemplar is never the
    example itself."""
    if n <= 0:
        return list(examples)
    if len(exemplars) <= n:
        raise DataError(f"eval.fewshot={n} needs more than {n} train examples; the train split has {len(exemplars)}")
    rng = random.Random(seed)
    out = []
    for example in examples:
        picked = []
        for i in rng.sample(range(len(exemplars)), n + 1):
            if len(picked) < n and exemplars[i].messages != example.messages:
                picked.append(exemplars[i])
        turns = [t for ex in picked for t in (*_without_system(ex.messages), {"role": "assistant",
                                                                              "content": ex.response})]
        system = [m for m in example.messages[:1] if m["role"] == "system"]
        rest = example.messages[len(system):]
        out.append(Example(messages=(*system, *turns, *rest), response=example.response, origin=example.origin,
                           meta=example.meta))
    return out


def _without_system(messages: tuple[dict, ...]) -> tuple[dict, ...]:
    return tuple(m for m in messages if m["role"] != "system")


def _with_system_prompt(example: Example, system_prompt: str) -> Example:
    """Prepend a system message unless the example already carries its own."""
    if example.messages and example.messages[0]["role"] == "system":
        return example
    messages = ({"role": "system", "content": system_prompt}, *example.messages)
    return dataclasses.replace(example, messages=messages)  # keeps meta (the SQL schema the scorer runs)
