"""A trace store in PostgreSQL, shared by many processes and hosts (psycopg 3).

Chosen by a URL: ``[store] url = "postgresql://user:password@host:5432/dbname"`` in ``aad.toml`` (or
``AAD_STORE__URL``). Several workspaces can share one database, each in its own schema:
``postgresql://host/db?aad_schema=agent_a`` (default ``public``; the parameter is aad's, it is not
sent to the server).

* Schema: created by aad on first use and versioned (table ``aad_meta``, key ``schema_version``);
  an older schema is migrated in place, under an advisory lock so that concurrent processes
  starting together create or migrate it once; a newer one (written by a later aad) is refused.
* Writes: one ``INSERT ... SELECT FROM unnest(...) ON CONFLICT (id) DO NOTHING`` per batch, so a
  batch is one round trip and re-inserting an id is a no-op, from any number of processes.
* Reads: pages of 2,000 rows in (``created_at``, insertion) order, so a long iteration holds no
  transaction open.
* Connections: one per thread (and per process after a fork), in autocommit mode.
* Deletion: rows are deleted and the table vacuumed; PostgreSQL's WAL and any backups follow the
  server's own retention.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aad_core.errors import AADError
from aad_core.schema import Trace
from aad_core.store.base import TraceFilter, check_metadata_key

SCHEMA_VERSION = 1
PAGE_SIZE = 2000
URL_SCHEMES = ("postgresql", "postgres")

#: Schema version -> the statements that bring a schema of that version to the next one.
MIGRATIONS: dict[int, list[str]] = {}

_CREATE = [
    "CREATE TABLE IF NOT EXISTS {s}.aad_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS {s}.aad_traces (
        seq BIGSERIAL,
        id TEXT PRIMARY KEY,
        created_at TIMESTAMPTZ NOT NULL,
        source TEXT NOT NULL,
        task TEXT,
        model TEXT,
        status TEXT NOT NULL,
        run_id TEXT,
        parent_run_id TEXT,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        total_tokens INTEGER,
        latency_ms DOUBLE PRECISION,
        cost DOUBLE PRECISION,
        redacted BOOLEAN NOT NULL DEFAULT FALSE,
        data TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS aad_traces_created ON {s}.aad_traces (created_at, seq)",
    "CREATE INDEX IF NOT EXISTS aad_traces_task ON {s}.aad_traces (task)",
]

_COLUMNS = ("id", "created_at", "source", "task", "model", "status", "run_id", "parent_run_id", "prompt_tokens",
            "completion_tokens", "total_tokens", "latency_ms", "cost", "redacted", "data")
_TYPES = ("text", "timestamptz", "text", "text", "text", "text", "text", "text", "int4", "int4", "int4", "float8",
          "float8", "bool", "text")


def is_postgres_url(url: str | None) -> bool:
    return bool(url) and urlsplit(str(url)).scheme.lower() in URL_SCHEMES


def split_url(url: str) -> tuple[str, str]:
    """``(libpq URL without aad's parameters, schema name)``."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in query if k == "aad_schema"), "public") or "public"
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", schema):
        raise AADError(f"The aad_schema parameter of the store URL must be a plain SQL name (letters, digits, _). "
                       f"Got {schema!r} instead.", hint="e.g. postgresql://host/db?aad_schema=my_agent")
    rest = urlencode([(k, v) for k, v in query if k != "aad_schema"])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, rest, parts.fragment)), schema


def redacted_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _row(t: Trace) -> tuple[Any, ...]:
    u = t.usage
    created = t.created_at if t.created_at.tzinfo else t.created_at.replace(tzinfo=timezone.utc)
    return (
        t.id, created, t.source, t.task, t.model, t.status, t.run_id, t.parent_run_id,
        u.prompt_tokens if u else None, u.completion_tokens if u else None, u.total_tokens if u else None,
        t.latency_ms, t.cost, bool(t.redacted), t.model_dump_json(exclude_none=True),
    )


def _iso(value: Any) -> str | None:
    return value.astimezone(timezone.utc).isoformat() if isinstance(value, datetime) else value


class PostgresTraceStore:
    """Traces in a PostgreSQL database (see the module's docstring)."""

    path = None  # no local file (capture's deleted-file check does not apply)

    def __init__(self, url: str, *, timeout_s: float = 60.0) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise AADError(
                "A postgresql:// trace store needs the Python package psycopg (version 3), which is not installed.",
                hint="pip install 'aad[postgres]'   (psycopg[binary])",
            ) from None
        self.url = url
        self.conninfo, self.schema = split_url(url)
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._connections: list[Any] = []
        self._lock = threading.Lock()
        self._s = f'"{self.schema}"'
        self._table = f"{self._s}.aad_traces"
        self._migrate()

    def __repr__(self) -> str:
        return f"PostgresTraceStore({redacted_url(self.url)!r})"

    # -- connections and schema ----------------------------------------------------------------
    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid() and not conn.closed:
            return conn
        import psycopg

        try:
            conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=max(1, int(self.timeout_s)))
        except psycopg.Error as err:
            raise AADError(f"Could not connect to the trace store {redacted_url(self.url)}: {err}".strip(),
                           hint="Check [store] url (or AAD_STORE__URL) and that the server is reachable.") from None
        conn.execute(f"SET statement_timeout = {int(self.timeout_s * 1000)}")
        self._local.conn, self._local.pid = conn, os.getpid()
        with self._lock:
            self._connections.append(conn)
        return conn

    def _migrate(self) -> None:
        conn = self._conn()
        with conn.transaction():
            # One process at a time creates or migrates this schema (others wait, then see it done).
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"aad-schema:{self.schema}",))
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self._s}")
            exists = conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL", (f"{self._s}.aad_meta",)).fetchone()[0]
            version = 0
            if exists:
                row = conn.execute(f"SELECT value FROM {self._s}.aad_meta WHERE key = 'schema_version'").fetchone()
                version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise AADError(
                    f"The trace store {redacted_url(self.url)} (schema {self.schema}) has schema version {version}, "
                    f"written by a newer aad; this aad reads version {SCHEMA_VERSION}.",
                    hint="Upgrade aad (pip install -U aad) on this host.",
                )
            if version == 0:
                for stmt in _CREATE:
                    conn.execute(stmt.format(s=self._s))
            else:
                for v in range(version, SCHEMA_VERSION):
                    for stmt in MIGRATIONS.get(v, []):
                        conn.execute(stmt.format(s=self._s))
            conn.execute(
                f"INSERT INTO {self._s}.aad_meta VALUES ('schema_version', %s) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", (str(SCHEMA_VERSION),))

    def schema_version(self) -> int:
        row = self._conn().execute(f"SELECT value FROM {self._s}.aad_meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    # -- writing -------------------------------------------------------------------------------
    def add(self, traces: Sequence[Trace]) -> int:
        if not traces:
            return 0
        rows = [_row(t) for t in traces]
        columns = list(zip(*rows))
        unnest = ", ".join(f"%s::{ty}[]" for ty in _TYPES)
        q = (f"INSERT INTO {self._table} ({', '.join(_COLUMNS)}) "
             f"SELECT * FROM unnest({unnest}) ON CONFLICT (id) DO NOTHING")
        cur = self._conn().execute(q, [list(c) for c in columns])
        return max(int(cur.rowcount), 0)

    # -- reading -------------------------------------------------------------------------------
    def get(self, trace_id: str) -> Trace | None:
        row = self._conn().execute(f"SELECT data FROM {self._table} WHERE id = %s", (trace_id,)).fetchone()
        return Trace.model_validate_json(row[0]) if row else None

    def has(self, trace_id: str) -> bool:
        return self._conn().execute(f"SELECT 1 FROM {self._table} WHERE id = %s", (trace_id,)).fetchone() is not None

    def iter_traces(
        self,
        *,
        ids: Iterable[str] | None = None,
        source: str | None = None,
        task: str | None = None,
        status: str | None = None,
        limit: int | None = None,
        **filters: Any,
    ) -> Iterator[Trace]:
        """Traces in ``created_at`` (then insertion) order, filtered (aad_core.store.base)."""
        if ids is not None:
            id_list = list(ids)
            for start in range(0, len(id_list), PAGE_SIZE):
                chunk = id_list[start : start + PAGE_SIZE]
                found = dict(self._conn().execute(
                    f"SELECT id, data FROM {self._table} WHERE id = ANY(%s)", (chunk,)).fetchall())
                for i in chunk:
                    if i in found:
                        yield Trace.model_validate_json(found[i])
            return
        flt = TraceFilter.of(source=source, task=task, status=status, **filters)
        where = [f"{col} = %s" for col, _ in flt.columns()]
        args: list[Any] = [v for _, v in flt.columns()]
        for path, value in flt.json_fields():
            where.append("(data::jsonb #>> %s) = %s")
            args += [list(path), value]
        if flt.since is not None:
            where.append("created_at >= %s")
            args.append(flt.since)
        if flt.until is not None:
            where.append("created_at < %s")
            args.append(flt.until)
        n = 0
        after: tuple[Any, int] | None = None
        while True:
            conds = list(where)
            page_args = list(args)
            if after is not None:
                conds.append("(created_at, seq) > (%s, %s)")
                page_args += list(after)
            q = f"SELECT created_at, seq, data FROM {self._table}"
            if conds:
                q += " WHERE " + " AND ".join(conds)
            q += f" ORDER BY created_at, seq LIMIT {PAGE_SIZE}"
            rows = self._conn().execute(q, page_args).fetchall()
            for created, seq, data in rows:
                if limit is not None and n >= limit:
                    return
                trace = Trace.model_validate_json(data)
                if flt.where or flt.min_score is not None or flt.max_score is not None:
                    if not flt.matches_rest(trace):
                        continue
                n += 1
                yield trace
            if len(rows) < PAGE_SIZE:
                return
            after = (rows[-1][0], rows[-1][1])

    def ids(self) -> list[str]:
        return [r[0] for r in self._conn().execute(f"SELECT id FROM {self._table} ORDER BY created_at, seq")]

    def count(self) -> int:
        return int(self._conn().execute(f"SELECT COUNT(*) FROM {self._table}").fetchone()[0])

    def feedback_items(self) -> list[tuple[str, str]]:
        """``(id, feedback as JSON text)`` of every trace that has feedback, by id."""
        rows = self._conn().execute(
            f"SELECT id, (data::jsonb -> 'feedback')::text FROM {self._table} "
            "WHERE strpos(data, '\"feedback\"') > 0 AND jsonb_typeof(data::jsonb -> 'feedback') = 'object' ORDER BY id")
        return [(str(i), str(fb)) for i, fb in rows]

    def metadata_values(self, keys: Sequence[str]) -> set[tuple[Any, ...]]:
        """The distinct ``(metadata[k] for k in keys)`` tuples over every trace (None where a key is absent)."""
        names = [check_metadata_key(k) for k in keys]
        cols = ", ".join("(data::jsonb -> 'metadata') ->> %s" for _ in names)
        return {tuple(row) for row in self._conn().execute(f"SELECT DISTINCT {cols} FROM {self._table}", names)}

    def stats(self) -> dict[str, Any]:
        conn = self._conn()

        def by(col: str) -> dict[str, int]:
            rows = conn.execute(
                f"SELECT COALESCE({col}, '(none)'), COUNT(*) FROM {self._table} GROUP BY 1 ORDER BY 2 DESC")
            return {str(k): int(v) for k, v in rows}

        total, p, c, t, cost, first, last, red = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens),0), COALESCE(SUM(completion_tokens),0), "
            "COALESCE(SUM(total_tokens),0), SUM(cost), MIN(created_at), MAX(created_at), "
            f"COALESCE(SUM(redacted::int),0) FROM {self._table}"
        ).fetchone()
        return {
            "traces": int(total),
            "by_source": by("source"),
            "by_task": by("task"),
            "by_model": by("model"),
            "by_status": by("status"),
            "tokens": {"prompt": int(p), "completion": int(c), "total": int(t)},
            "cost": cost,
            "redacted": int(red),
            "first": _iso(first),
            "last": _iso(last),
        }

    # -- feedback and deletion -----------------------------------------------------------------
    def set_feedback(self, trace_id: str, feedback: dict[str, Any] | None) -> bool:
        conn = self._conn()
        with conn.transaction():
            row = conn.execute(f"SELECT data FROM {self._table} WHERE id = %s FOR UPDATE", (trace_id,)).fetchone()
            if row is None:
                return False
            trace = Trace.model_validate_json(row[0])
            trace.feedback = feedback
            conn.execute(f"UPDATE {self._table} SET data = %s WHERE id = %s",
                         (trace.model_dump_json(exclude_none=True), trace_id))
        return True

    def delete(self, ids: Iterable[str]) -> int:
        id_list = list(dict.fromkeys(ids))
        if not id_list:
            return 0
        conn = self._conn()
        deleted = 0
        with conn.transaction():
            for start in range(0, len(id_list), PAGE_SIZE):
                cur = conn.execute(f"DELETE FROM {self._table} WHERE id = ANY(%s)", (id_list[start : start + PAGE_SIZE],))
                deleted += max(int(cur.rowcount), 0)
        if deleted:
            conn.execute(f"VACUUM {self._table}")  # dead row versions are cleared now, not at the next autovacuum
        return deleted

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self) -> PostgresTraceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
