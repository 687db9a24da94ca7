"""WikiSQL analogue: a question about one table → the SQL query that answers it.

Queries have WikiSQL's shape: one table, one selected column under an optional
aggregation (COUNT, MAX, MIN, SUM, AVG) and zero to two WHERE conditions joined by AND,
each with ``=``, ``>`` or ``<``. The tables (``sql_tables.TABLES``) get seeded rows, and
every condition is drawn so that one chosen row satisfies it, so no gold query comes back
empty. Questions are phrased several ways; the split is by query, so no test query is
asked in training.

Scored as the paper scores WikiSQL, by execution accuracy: predicted and gold SQL run on a
fresh in-memory SQLite database built from the same seed, and a prediction is right when
it returns the same rows (as a multiset; in order only when the gold query has ORDER BY).
Exact match, after collapsing whitespace and case, is reported beside it. A prediction runs
only if it is one SELECT statement, on a throwaway database that refuses every write, with
a cap on the work it may do; whatever fails to run counts as wrong.
"""

from __future__ import annotations

import random
import re
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from .splits import Candidate, GeneratedTask
from .sql_tables import TABLES, Column, Table, table_rows
from .task import Example, TaskError, as_text, check_lengths, percent

AGGREGATIONS = ("", "COUNT", "MAX", "MIN", "SUM", "AVG")  # "" selects the column itself
DEFAULT_SIZES = {"train": 2000, "validation": 200, "test": 200}
MAXIMA = {"train": 12_000, "validation": 1_200, "test": 1_200}
MAX_RESULT_ROWS = 10_000  # a prediction returning more is wrong, and is not read further
MAX_STEPS = 1_000  # progress-handler calls, each 1000 virtual-machine instructions

QUESTIONS = {
    "": (
        "List the {plural} of {entities}{where}.",
        "What are the {plural} of {entities}{where}?",
        "Show the {plural} of all {entities}{where}.",
    ),
    "COUNT": (
        "How many {entities}{where} are there?",
        "Count the {entities}{where}.",
        "What is the number of {entities}{where}?",
    ),
    "MAX": (
        "What is the highest {column} of {entities}{where}?",
        "What is the maximum {column} among {entities}{where}?",
        "Find the largest {column} among {entities}{where}.",
    ),
    "MIN": (
        "What is the lowest {column} of {entities}{where}?",
        "What is the minimum {column} among {entities}{where}?",
        "Find the smallest {column} among {entities}{where}.",
    ),
    "SUM": (
        "What is the total {column} of {entities}{where}?",
        "Add up the {plural} of {entities}{where}.",
        "What is the combined {column} of {entities}{where}?",
    ),
    "AVG": (
        "What is the average {column} of {entities}{where}?",
        "What is the mean {column} of {entities}{where}?",
        "On average, what is the {column} of {entities}{where}?",
    ),
}


class SqlTask(GeneratedTask):
    """Question + table header → SQL; execution accuracy and exact match (0–100)."""

    name = "sql"
    kind = "generation"
    primary_metric = "execution_accuracy"
    higher_is_better = True
    labels = None
    max_new_tokens = 40  # gold queries run to ~27 SmolLM2 tokens

    default_sizes = DEFAULT_SIZES
    maxima = MAXIMA

    def candidates(self, seed: int) -> Iterable[Candidate]:
        return _candidates(seed)

    def score(self, predictions: Sequence[Any], examples: Sequence[Example]) -> dict[str, float]:
        """Execution accuracy and exact match; each example names its database seed."""
        check_lengths(self.name, predictions, examples)
        outcomes = _outcomes(predictions, examples)
        total = len(examples)
        return {
            "execution_accuracy": percent(sum(executed for executed, _ in outcomes), total),
            "exact_match": percent(sum(exact for _, exact in outcomes), total),
        }

    def rewards(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        """GRPO's verifiable reward: 1 where the completion's query returns the gold
        query's rows on the example's database, else 0."""
        check_lengths(self.name, completions, examples)
        return [float(executed) for executed, _ in _outcomes(completions, examples)]


def _outcomes(predictions: Sequence[Any], examples: Sequence[Example]) -> list[tuple[bool, bool]]:
    """(executes to the gold rows, matches the gold query) for each prediction."""
    databases: dict[int, sqlite3.Connection] = {}
    outcomes = []
    try:
        for prediction, example in zip(predictions, examples, strict=True):
            seed = example["db_seed"]
            if seed not in databases:
                databases[seed] = open_database(seed)
            predicted, gold = as_text(prediction), example["sql"]
            gold_rows = run_query(databases[seed], gold)
            if gold_rows is None:
                raise TaskError(f"sql: the gold query {gold!r} does not run on its database")
            executed = run_query(databases[seed], predicted) == gold_rows
            outcomes.append((executed, normalise(predicted) == normalise(gold)))
    finally:
        for connection in databases.values():
            connection.close()
    return outcomes


def normalise(sql: str) -> str:
    """SQL for exact match: one space between tokens, lower case, no final semicolon."""
    return " ".join(sql.strip().rstrip(";").split()).lower()


# -- running queries ------------------------------------------------------------------------


def open_database(seed: int) -> sqlite3.Connection:
    """A fresh in-memory database with every table's rows for ``seed``, read-only."""
    connection = sqlite3.connect(":memory:")
    for table in TABLES:
        columns = ", ".join(f"{c.name} {'INTEGER' if c.numeric else 'TEXT'}" for c in table.columns)
        connection.execute(f"CREATE TABLE {table.name} ({columns})")
        marks = ", ".join("?" for _ in table.columns)
        connection.executemany(
            f"INSERT INTO {table.name} VALUES ({marks})", table_rows(seed)[table.name]
        )
    connection.commit()
    connection.execute("PRAGMA query_only = ON")
    connection.set_authorizer(_allow_reading_only)
    return connection


def _allow_reading_only(action: int, *_: Any) -> int:
    allowed = (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION)
    return sqlite3.SQLITE_OK if action in allowed else sqlite3.SQLITE_DENY


def run_query(connection: sqlite3.Connection, sql: str) -> Counter | list | None:
    """The rows of one SELECT: a multiset, or a list under ORDER BY; None if refused/failed."""
    statement = sql.strip().removesuffix(";").strip()
    if ";" in statement or not re.match(r"select\b", statement, flags=re.IGNORECASE):
        return None  # a second statement could be anything; only one SELECT is run
    steps = 0

    def give_up() -> int:  # a nonzero return aborts the query
        nonlocal steps
        steps += 1
        return steps > MAX_STEPS

    connection.set_progress_handler(give_up, 1000)
    try:
        rows = connection.execute(statement).fetchmany(MAX_RESULT_ROWS + 1)
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError):
        return None
    finally:
        connection.set_progress_handler(None, 0)
    if len(rows) > MAX_RESULT_ROWS:
        return None
    rows = [tuple(round(v, 6) if isinstance(v, float) else v for v in row) for row in rows]
    return rows if re.search(r"\border\s+by\b", statement, re.IGNORECASE) else Counter(rows)


# -- the generator --------------------------------------------------------------------------


def _candidates(seed: int) -> Iterator[Candidate]:
    rng = random.Random(f"sql:{seed}")
    rows = table_rows(seed)
    while True:
        table = rng.choice(TABLES)
        query = _draw_query(table, rows[table.name], rng)
        if query is None:
            continue
        key = _canonical(table, *query)
        yield Candidate(
            group=key,
            key=key,
            build=lambda t=table, q=query, k=key: _example(t, *q, key=k, seed=seed),
        )


Condition = tuple[Column, str, Any]


def _draw_query(
    table: Table, rows: list[tuple], rng: random.Random
) -> tuple[str, Column, list[Condition]] | None:
    anchor = rng.choice(rows)  # satisfies every condition, so the answer is never empty
    key, *others = table.columns
    aggregation = rng.choice(AGGREGATIONS)
    if not aggregation and rng.random() < 0.3:  # a lookup: "the salary of Alice Smith"
        conditions: list[Condition] = [(key, "=", anchor[0])]
    else:  # aggregating over the one row a key picks would be a silly question
        conditions = [_condition(c, anchor, table, rng) for c in _sample(others, rng)]
    pinned = {column.name for column, operator, _ in conditions if operator == "="}
    if aggregation == "COUNT":
        choices = [key]  # WikiSQL counts a column; ours is the key column
    elif aggregation:
        choices = [c for c in others if c.numeric and (c.additive or aggregation != "SUM")]
    else:
        choices = list(table.columns)
    # asking for a column that a condition pins to one value would be a silly question
    choices = [c for c in choices if c.name not in pinned or aggregation == "COUNT"]
    if not choices:
        return None
    return aggregation, rng.choice(choices), conditions


def _sample(columns: list[Column], rng: random.Random) -> list[Column]:
    return rng.sample(columns, rng.choice((0, 1, 1, 2, 2)))


def _condition(column: Column, anchor: tuple, table: Table, rng: random.Random) -> Condition:
    """A condition on ``column`` that the ``anchor`` row satisfies."""
    value = anchor[table.columns.index(column)]
    below = [t for t in column.thresholds if t < value]
    above = [t for t in column.thresholds if t > value]
    operator = rng.choice(["=", *([">"] if below else []), *(["<"] if above else [])])
    if operator == ">":
        value = rng.choice(below)
    elif operator == "<":
        value = rng.choice(above)
    return column, operator, value


def _canonical(table: Table, aggregation: str, column: Column, conditions: list) -> str:
    """One key per query meaning: the order of the AND-ed conditions does not count."""
    parts = sorted(f"{c.name} {op} {value!r}" for c, op, value in conditions)
    return f"{table.name}|{aggregation}|{column.name}|" + " AND ".join(parts)


def _example(
    table: Table,
    aggregation: str,
    column: Column,
    conditions: list[Condition],
    key: str,
    seed: int,
) -> Example:
    rng = random.Random(f"sql-words:{key}")
    selected = f"{aggregation}({column.name})" if aggregation else column.name
    sql = f"SELECT {selected} FROM {table.name}"
    if conditions:
        sql += " WHERE " + " AND ".join(
            f"{c.name} {op} {_literal(value)}" for c, op, value in conditions
        )
    phrases = [rng.choice(c.phrases[op]).format(v=value) for c, op, value in conditions]
    where = "".join(" " + p for p in phrases[:1]) + "".join(" and " + p for p in phrases[1:])
    question = rng.choice(QUESTIONS[aggregation]).format(
        entities=table.entities, where=where, column=column.label, plural=column.plural
    )
    header = f"{table.name}({', '.join(c.name for c in table.columns)})"
    return {
        "prompt": f"Table: {header}\nQuestion: {question}\nSQL:",
        "completion": " " + sql,
        "question": question,
        "sql": sql,
        "table": table.name,
        "columns": [c.name for c in table.columns],
        "aggregation": aggregation,
        "select": column.name,
        "conditions": [[c.name, op, value] for c, op, value in conditions],
        "db_seed": seed,
    }


def _literal(value: Any) -> str:
    return str(value) if isinstance(value, int) else "'" + str(value).replace("'", "''") + "'"
