"""The default trace store: one SQLite file in WAL mode.

Safe for many writer threads (one connection per thread) and processes (WAL + busy timeout,
``BEGIN IMMEDIATE`` per batch). Inserts are idempotent on the trace id.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from aad_core.schema import Trace
from aad_core.store.base import TraceFilter, check_metadata_key

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS traces (
    id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    source TEXT NOT NULL,
    task TEXT,
    model TEXT,
    status TEXT NOT NULL,
    run_id TEXT,
    parent_run_id TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    total_tokens INTEGER,
    latency_ms REAL,
    cost REAL,
    redacted INTEGER NOT NULL DEFAULT 0,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS traces_created ON traces (created_at);
CREATE INDEX IF NOT EXISTS traces_task ON traces (task);
"""

_COLUMNS = (
    "id, created_at, source, task, model, status, run_id, parent_run_id, prompt_tokens, "
    "completion_tokens, total_tokens, latency_ms, cost, redacted, data"
)


def _row(t: Trace) -> tuple[Any, ...]:
    u = t.usage
    return (
        t.id, t.created_at.isoformat(), t.source, t.task, t.model, t.status, t.run_id, t.parent_run_id,
        u.prompt_tokens if u else None, u.completion_tokens if u else None, u.total_tokens if u else None,
        t.latency_ms, t.cost, int(t.redacted), t.model_dump_json(exclude_none=True),
    )


class SQLiteTraceStore:
    """Traces in ``path`` (created with its schema if missing)."""

    def __init__(self, path: Path | str, *, timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        conn = self._conn()
        with self._lock:
            conn.executescript(_SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            return conn
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=False)
        try:
            self._set_wal(conn)
        except sqlite3.Error:
            conn.close()
            raise
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
        self._local.conn, self._local.pid = conn, os.getpid()
        with self._lock:
            self._connections.append(conn)
        return conn

    def _set_wal(self, conn: sqlite3.Connection) -> None:
        # Switching to WAL needs an exclusive lock, and SQLite answers "database is locked" at
        # once, without waiting on the busy handler, while another process is creating the same
        # file (several workers starting together); so wait here, up to the store's timeout.
        deadline = time.monotonic() + self.timeout_s
        pause = 0.005
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.2)

    # -- writing -----------------------------------------------------------------------------
    def add(self, traces: Sequence[Trace]) -> int:
        if not traces:
            return 0
        conn = self._conn()
        rows = [_row(t) for t in traces]
        conn.execute("BEGIN IMMEDIATE")
        try:
            before = conn.total_changes
            conn.executemany(f"INSERT OR IGNORE INTO traces ({_COLUMNS}) VALUES ({', '.join('?' * 15)})", rows)
            added = conn.total_changes - before
            conn.execute("COMMIT")
        except BaseException:
            # SQLite may already have rolled back (disk full, I/O error): a second ROLLBACK would
            # raise "cannot rollback - no transaction is active" and hide the real cause.
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise
        return added

    # -- reading -----------------------------------------------------------------------------
    def get(self, trace_id: str) -> Trace | None:
        row = self._conn().execute("SELECT data FROM traces WHERE id = ?", (trace_id,)).fetchone()
        return Trace.model_validate_json(row[0]) if row else None

    def has(self, trace_id: str) -> bool:
        return self._conn().execute("SELECT 1 FROM traces WHERE id = ?", (trace_id,)).fetchone() is not None

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
        """Traces in insertion order (``created_at``, then id), filtered (aad_core.store.base: ``since``,
        ``until``, ``where``, ``min_score``, ``max_score`` too)."""
        if ids is not None:
            id_list = list(ids)
            for start in range(0, len(id_list), 500):
                chunk = id_list[start : start + 500]
                q = f"SELECT id, data FROM traces WHERE id IN ({', '.join('?' * len(chunk))})"
                found = dict(self._conn().execute(q, chunk).fetchall())
                for i in chunk:
                    if i in found:
                        yield Trace.model_validate_json(found[i])
            return
        flt = TraceFilter.of(source=source, task=task, status=status, **filters)
        where, args = [f"{col} = ?" for col, _ in flt.columns()], [v for _, v in flt.columns()]
        for path, value in flt.json_fields():
            where.append("json_extract(data, ?) = ?")
            args += ["$." + ".".join(path), value]
        low, high = flt.text_window()
        if low is not None:
            where.append("created_at >= ?")
            args.append(low)
        if high is not None:
            where.append("created_at < ?")
            args.append(high)
        q = "SELECT data FROM traces"
        if where:
            q += " WHERE " + " AND ".join(where)
        q += " ORDER BY created_at, rowid"
        if limit is not None and not flt.needs_trace:
            q += f" LIMIT {int(limit)}"
        n = 0
        for (data,) in self._conn().execute(q, args):
            if limit is not None and n >= limit:
                return
            trace = Trace.model_validate_json(data)
            if flt.needs_trace and not flt.matches_rest(trace):
                continue
            n += 1
            yield trace

    def ids(self) -> list[str]:
        return [r[0] for r in self._conn().execute("SELECT id FROM traces ORDER BY created_at, rowid")]

    def count(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM traces").fetchone()[0])

    def feedback_items(self) -> list[tuple[str, str]]:
        """``(id, feedback as JSON text)`` of every trace that has feedback, by id."""
        rows = self._conn().execute(
            "SELECT id, json_extract(data, '$.feedback') FROM traces "
            "WHERE instr(data, '\"feedback\"') > 0 AND json_type(data, '$.feedback') = 'object' ORDER BY id")
        return [(str(i), str(fb)) for i, fb in rows]

    def metadata_values(self, keys: Sequence[str]) -> set[tuple[Any, ...]]:
        """The distinct ``(metadata[k] for k in keys)`` tuples over every trace (None where a key is absent)."""
        paths = [f'$.metadata."{check_metadata_key(k)}"' for k in keys]
        cols = ", ".join("json_extract(data, ?)" for _ in paths)
        return {tuple(row) for row in self._conn().execute(f"SELECT DISTINCT {cols} FROM traces", paths)}

    def stats(self) -> dict[str, Any]:
        conn = self._conn()

        def by(col: str) -> dict[str, int]:
            rows = conn.execute(f"SELECT COALESCE({col}, '(none)'), COUNT(*) FROM traces GROUP BY 1 ORDER BY 2 DESC")
            return {str(k): int(v) for k, v in rows}

        total, p, c, t, cost, first, last, red = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens),0), COALESCE(SUM(completion_tokens),0), "
            "COALESCE(SUM(total_tokens),0), SUM(cost), MIN(created_at), MAX(created_at), "
            "COALESCE(SUM(redacted),0) FROM traces"
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
            "first": first,
            "last": last,
        }

    # -- feedback and deletion (aad traces feedback / delete) ---------------------------------
    def set_feedback(self, trace_id: str, feedback: dict[str, Any] | None) -> bool:
        """Replace the feedback of the trace ``trace_id`` (stored in its data); False when it is not stored."""
        conn = self._conn()
        conn.execute("PRAGMA secure_delete = ON")  # the old version of the row is overwritten, not left behind
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT data FROM traces WHERE id = ?", (trace_id,)).fetchone()
            if row is not None:
                trace = Trace.model_validate_json(row[0])
                trace.feedback = feedback
                conn.execute("UPDATE traces SET data = ? WHERE id = ?", (trace.model_dump_json(exclude_none=True), trace_id))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.execute("PRAGMA secure_delete = OFF")
        return row is not None

    def delete(self, ids: Iterable[str]) -> int:
        """Delete the traces ``ids``. Their bytes are overwritten (``secure_delete``) and the WAL is
        checkpointed and truncated, so no copy stays in the database's files."""
        id_list = list(dict.fromkeys(ids))
        if not id_list:
            return 0
        conn = self._conn()
        conn.execute("PRAGMA secure_delete = ON")
        conn.execute("BEGIN IMMEDIATE")
        try:
            before = conn.total_changes
            for start in range(0, len(id_list), 500):
                chunk = id_list[start : start + 500]
                conn.execute(f"DELETE FROM traces WHERE id IN ({', '.join('?' * len(chunk))})", chunk)
            deleted = conn.total_changes - before
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.execute("PRAGMA secure_delete = OFF")
        # Old page images of the deleted rows live on in the WAL until a checkpoint copies the
        # pages back and the WAL is truncated.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return deleted

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self) -> SQLiteTraceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
