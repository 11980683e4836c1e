"""SQL generation (b-mc2/sql-create-context): exact match after normalisation, and execution match on the schema.

The dataset's schemas are bare CREATE TABLE statements, so its tables are empty and every valid SELECT on them returns
the same empty result. Execution match therefore fills each table with a few rows built from the gold query's own
literals (and defaults), so a WHERE clause, a COUNT or a wrong column changes the result; the same rows serve both
queries. It is a stricter check than "the query runs", still not a proof of equivalence.
"""

from __future__ import annotations

import re
import sqlite3
from collections import Counter

_LITERAL = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|\b\d+(?:\.\d+)?\b""")
_TOKEN = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|\S+""")
_FENCE = re.compile(r"```(?:sql)?\s*(.*?)(?:```|$)", re.S | re.I)
MAX_STEPS = 200_000  # sqlite3 VM steps before a query is abandoned (a runaway cross join)


def extract_sql(text: str) -> str:
    """The query in a generated text: inside a ``` fence when there is one, up to the first ";" or blank line."""
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1)
    text = text.strip().split("\n\n")[0]
    return text.split(";")[0].strip()


def normalise(sql: str) -> str:
    """Whitespace collapsed, case folded outside string literals, no trailing ";", double quotes as single."""
    sql = extract_sql(sql)
    tokens = []
    for token in _TOKEN.findall(sql):
        if token[0] in "'\"":
            tokens.append("'" + token[1:-1] + "'")
        else:
            tokens.append(token.lower())
    text = " ".join(tokens)
    text = re.sub(r"\s*([(),=<>])\s*", r"\1", text)  # "count( * )" and "count(*)" are one query
    return text


def exact_match(prediction: str, gold: str) -> bool:
    return normalise(prediction) == normalise(gold)


def _literals(sql: str) -> list:
    out = []
    for lit in _LITERAL.findall(sql):
        if lit[0] in "'\"":
            out.append(lit[1:-1].replace(lit[0] * 2, lit[0]))
        else:
            out.append(float(lit) if "." in lit else int(lit))
    return out


def _database(context: str, gold: str) -> sqlite3.Connection:
    """The schema, each table filled with rows made of the gold query's literals, their neighbours and defaults."""
    db = sqlite3.connect(":memory:")
    db.executescript(context)
    literals = _literals(gold)
    numbers = [v for v in literals if isinstance(v, (int, float))] or [1]
    texts = [v for v in literals if isinstance(v, str)] or ["a"]
    values = [(n, t) for n in numbers for t in texts]
    variants = [(n + 1, t + "x") for n, t in values] + [(n - 1, "") for n, _ in values]
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    for table in tables:
        columns = db.execute(f'PRAGMA table_info("{table}")').fetchall()
        for i, (n, t) in enumerate(values + variants):
            row = [n + j if _numeric(c[2]) else t for j, c in enumerate(columns)] if i % 2 else \
                [n if _numeric(c[2]) else t for c in columns]
            db.execute(f'INSERT INTO "{table}" VALUES ({", ".join("?" * len(columns))})', row)
    return db


def _numeric(declared: str) -> bool:
    return any(k in (declared or "").upper() for k in ("INT", "REAL", "NUM", "FLOA", "DOUB", "DEC"))


def _run(db: sqlite3.Connection, sql: str):
    steps = [0]

    def tick():
        steps[0] += 1
        return steps[0] > MAX_STEPS // 1000  # called every 1000 VM instructions: nonzero aborts

    db.set_progress_handler(tick, 1000)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.set_progress_handler(None, 0)


def execution_match(prediction: str, gold: str, context: str) -> bool:
    """Both queries run on the filled schema and return the same rows (in order only when the gold orders them).
    A prediction that does not run is not a match; a schema or gold that does not run matches nothing."""
    try:
        db = _database(context, gold)
        expected = _run(db, extract_sql(gold))
    except (sqlite3.Error, ValueError):
        return False
    try:
        got = _run(db, extract_sql(prediction))
    except (sqlite3.Error, ValueError, OverflowError):
        return False
    finally:
        db.close()
    if "order by" in normalise(gold):
        return got == expected
    return Counter(map(repr, got)) == Counter(map(repr, expected))
