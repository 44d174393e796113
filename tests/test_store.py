"""The SQLite trace store: idempotent inserts, filters, stats, concurrent writers."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from pathlib import Path

from conftest import make_trace

from aad_core.store.sqlite import SQLiteTraceStore


def test_insert_is_idempotent_and_round_trips(tmp_path: Path) -> None:
    store = SQLiteTraceStore(tmp_path / "t.db")
    a, b = make_trace("hi", "hello", task="greet"), make_trace("bye", "goodbye")
    assert store.add([a, b]) == 2
    assert store.add([a, b]) == 0
    assert store.count() == 2
    assert store.get(a.id) == a
    assert [t.id for t in store.iter_traces(task="greet")] == [a.id]
    assert [t.id for t in store.iter_traces(ids=[b.id, "missing", a.id])] == [b.id, a.id]


def test_wal_mode_and_stats(tmp_path: Path) -> None:
    store = SQLiteTraceStore(tmp_path / "t.db")
    store.add([make_trace("q1", "a1", task="x", cost=0.5), make_trace("q2", "a2", task="x", status="error", error="boom")])
    mode = sqlite3.connect(tmp_path / "t.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    stats = store.stats()
    assert stats["traces"] == 2
    assert stats["by_task"] == {"x": 2}
    assert stats["by_status"] == {"ok": 1, "error": 1}
    assert stats["cost"] == 0.5
    assert stats["tokens"]["completion"] == 2


def test_opening_waits_while_another_process_holds_the_write_lock(tmp_path: Path) -> None:
    """Workers that start together: switching a fresh file to WAL must wait, not fail at once."""
    db = tmp_path / "t.db"
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE x (y)")
    other.execute("BEGIN IMMEDIATE")  # what a process creating the schema holds
    release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    release.start()
    store = SQLiteTraceStore(db, timeout_s=10)
    release.join()
    assert store.add([make_trace("q", "a")]) == 1
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_many_threads_write_without_loss(tmp_path: Path) -> None:
    store = SQLiteTraceStore(tmp_path / "t.db")
    traces = [make_trace(f"q{i}", f"a{i}") for i in range(400)]

    def write(chunk):
        for t in chunk:
            store.add([t])
            store.add([t])  # a retry must not duplicate

    threads = [threading.Thread(target=write, args=(traces[i::8],)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert store.count() == 400


def _write_in_process(path: str, start: int) -> None:
    from conftest import make_trace as mk

    store = SQLiteTraceStore(path)
    for i in range(start, start + 100):
        store.add([mk(f"p{i}", "x", id=f"id-{i % 150}")])
    store.close()


def test_several_processes_write_safely(tmp_path: Path) -> None:
    path = str(tmp_path / "t.db")
    SQLiteTraceStore(path).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_in_process, args=(path, s)) for s in (0, 50, 100)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    # ids overlap between processes (id-{i % 150}): exactly 150 distinct traces.
    assert SQLiteTraceStore(path).count() == 150
