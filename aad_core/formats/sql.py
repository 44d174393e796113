"""SQL answers: what counts as a SQL statement, and its sqlglot form.

sqlglot is imported only when a function needs it (the ``eval`` extra); without it an answer that
starts like a statement still counts as SQL for :func:`is_sql`.
"""

from __future__ import annotations

import re
from typing import Any

from aad_core.formats.fences import fenced_body, strip_fence

#: How a SQL statement starts (after a code fence is taken off).
SQL_START = re.compile(r"^\s*(select|with|insert|update|delete|create)\b", re.IGNORECASE)


def parse_sql(body: str, dialect: str | None = "sqlite") -> list[Any]:
    """sqlglot's statements in ``body``; raises ``sqlglot.errors.SqlglotError`` when it does not parse."""
    import sqlglot

    return [s for s in sqlglot.parse(body, read=dialect) if s is not None]


def is_sql(text: str) -> bool:
    """``text`` (or the code fence that is all of it) is one SQL statement that sqlglot parses as SQLite."""
    body = strip_fence(text).strip().rstrip(";").strip()
    if not SQL_START.match(body):
        return False
    try:
        from sqlglot.errors import SqlglotError
    except ImportError:  # without the eval extra, SQL-looking text still counts
        return True
    try:
        return len(parse_sql(body)) == 1
    except SqlglotError:
        return False


def sql_text(text: str) -> str:
    """The SQL an answer holds: the first code fence's body (or the whole answer), without a final ';'."""
    return fenced_body(text).rstrip(";").strip()


def canonical_sql(sql: str, dialect: str = "sqlite") -> str | None:
    """sqlglot's canonical form (normalised identifiers, one line), or None if it does not parse."""
    from sqlglot.errors import SqlglotError

    sql = sql_text(sql)
    if not sql:
        return None
    try:
        expressions = parse_sql(sql, dialect)
    except SqlglotError:
        return None
    if len(expressions) != 1:
        return None
    return expressions[0].sql(dialect=dialect, normalize=True, pretty=False)
