"""CaptureWriter: batched background writes, hooks, spool on store failure, reload, no loss."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_trace

from aad_core import hookimpl
from aad_core.capture import CaptureWriter
from aad_core.plugins.components import Redactor
from aad_core.config import AADSettings
from aad_core.errors import UnknownComponentError
from aad_core.plugins import get_plugin_manager
from aad_core.store.sqlite import SQLiteTraceStore


def settings(**capture) -> AADSettings:
    return AADSettings(capture={"redact": False, "write_timeout_s": 0.05, "retry_interval_s": 0.2, **capture})


def lock(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, isolation_level=None, timeout=5)
    conn.execute("BEGIN EXCLUSIVE")
    return conn


def unlock(conn: sqlite3.Connection) -> None:
    conn.execute("ROLLBACK")
    conn.close()


class Collector:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    @hookimpl
    def aad_trace_captured(self, traces):  # type: ignore[no-untyped-def]
        self.batches.append([t.id for t in traces])


def test_batched_writes_call_the_hook_per_batch(workspace):
    seen = Collector()
    get_plugin_manager().add_plugin(seen, name="collector")
    w = CaptureWriter(workspace=workspace, config=settings(batch_size=10))
    traces = [make_trace(f"q{i}", "a") for i in range(95)]
    for t in traces:
        w.submit(t)
    w.submit(traces[0])  # the same trace again is stored once
    assert w.flush(10)
    assert w.store.count() == 95
    assert all(len(b) <= 10 for b in seen.batches) and sum(map(len, seen.batches)) == 96
    s = w.stats()
    assert (s["captured"], s["written"], s["spooled"], s["errors"], s["lost"]) == (96, 96, 0, 0, 0)
    w.close()
    w.submit(make_trace("late", "a"))  # after close: spooled, not lost, not raised
    assert w.stats()["spooled"] == 1


def test_submit_never_raises(workspace):
    w = CaptureWriter(workspace=workspace, config=settings())
    w.submit("not a trace")  # type: ignore[arg-type]
    assert w.stats()["errors"] == 1 and w.stats()["captured"] == 0
    w.close()


@pytest.mark.parametrize("policy", ["spool", "block"])
def test_full_queue_never_blocks_longer_than_the_timeout_and_counts_what_it_drops(workspace, policy):
    """A full queue: the caller never redacts or writes (so never waits on the redactor or the
    disk), waits at most block_timeout_s per trace ("block"), and what does not fit is counted
    and logged as lost; everything else is stored."""
    w = CaptureWriter(workspace=workspace, config=settings(queue_size=2, full_policy=policy, block_timeout_s=0.05, linger_s=0,
                                                           write_timeout_s=1.0, retry_interval_s=30))
    held = lock(workspace.db_path)
    try:
        t0 = time.perf_counter()
        for i in range(30):
            w.submit(make_trace(f"q{i}", "a"))
        elapsed = time.perf_counter() - t0
    finally:
        unlock(held)
    assert elapsed < 30 * 0.05 + 1.0  # "block" waits briefly per trace, never indefinitely
    assert w.flush(20)
    s = w.stats()
    assert s["overflowed"] > 0 and s["lost"] == s["overflowed"] == s["lost_by"]["queue-full"]
    assert w.store.count() + s["lost"] == 30 and s["spool_files"] == 0
    w.close()


def test_sixteen_threads_lose_nothing_when_the_queue_has_room(workspace):
    import threading

    w = CaptureWriter(workspace=workspace, config=settings())
    threads = [threading.Thread(target=lambda k=k: [w.submit(make_trace(f"t{k} q{i}", "a")) for i in range(500)])
               for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert w.flush(60)
    s = w.stats()
    assert w.store.count() == 8000 and (s["captured"], s["written"], s["lost"]) == (8000, 8000, 0)
    w.close()


def test_deleted_store_is_recreated_and_nothing_is_lost(workspace):
    w = CaptureWriter(workspace=workspace, config=settings())
    for i in range(5):
        w.submit(make_trace(f"before{i}", "a"))
    assert w.flush(10) and w.store.count() == 5
    for suffix in ("", "-wal", "-shm"):
        Path(str(workspace.db_path) + suffix).unlink(missing_ok=True)
    for i in range(7):
        w.submit(make_trace(f"after{i}", "a"))
    assert w.flush(10)
    assert w.stats()["spooled"] == 7
    time.sleep(0.25)  # past retry_interval_s: the next flush reopens (recreates) the store
    assert w.flush(10)
    assert SQLiteTraceStore(workspace.db_path).count() == 7 and w.stats()["spool_files"] == 0
    w.close()


def test_writer_starts_while_the_store_is_locked(workspace):
    held = lock(workspace.db_path)
    try:
        t0 = time.perf_counter()
        w = CaptureWriter(workspace=str(workspace.root), config=settings())
        w.submit(make_trace("while locked", "a"))
        assert w.flush(10) and time.perf_counter() - t0 < 5
        assert w.stats()["spooled"] == 1
    finally:
        unlock(held)
    assert w.flush(10)
    assert SQLiteTraceStore(workspace.db_path).count() == 1
    w.close()


def test_spool_with_bad_line_is_reloaded_by_a_new_writer(workspace):
    good = make_trace("spooled earlier", "a")
    workspace.spool_dir.mkdir(parents=True, exist_ok=True)
    (workspace.spool_dir / "1-1-abc.jsonl").write_text(good.model_dump_json() + "\n{not json\n", encoding="utf-8")
    w = CaptureWriter(workspace=workspace, config=settings())
    assert w.flush(10)
    assert w.store.get(good.id) is not None and w.stats()["reloaded"] == 1
    assert (workspace.spool_dir / "1-1-abc.bad").read_text(encoding="utf-8").startswith("{not json")
    w.close()


class BrokenRedactor(Redactor):
    def redact(self, traces):  # type: ignore[no-untyped-def]
        raise RuntimeError("redactor crashed")


class BrokenRedactorPlugin:
    @hookimpl
    def aad_register_redactors(self, register):  # type: ignore[no-untyped-def]
        register("broken", BrokenRedactor)


def test_failed_redaction_never_writes_unredacted_traces(workspace):
    get_plugin_manager().add_plugin(BrokenRedactorPlugin(), name="broken-redactor")
    w = CaptureWriter(workspace=workspace, config=settings(redact=True, redactor="broken"))
    w.submit(make_trace("mail me at ada@example.org", "ok"))
    assert not w.flush(10)  # not stored nor spooled: flush says so
    s = w.stats()
    assert w.store.count() == 0 and s["spooled"] == 0 and s["waiting_in_wal"] == 1
    assert not w.spool_dir.exists() or not any(w.spool_dir.iterdir())  # nothing unredacted anywhere
    # A redactor that cannot even redact its warm-up trace is missing, not given a poison trace: the call
    # waits, encrypted, in the write-ahead log for a writer with a working redactor (tests/test_capture_wal.py).
    assert s["dropped"] == 0 and s["lost"] == 0 and list((workspace.data_dir / "wal").glob("*.seg"))
    assert not w.close()


def test_making_a_writer_never_waits_for_a_store_another_process_is_writing_to(workspace):
    workspace.store().close()  # the database exists
    holder = sqlite3.connect(workspace.db_path, timeout=0)
    holder.execute("BEGIN IMMEDIATE")  # another process's write transaction
    try:
        started = time.perf_counter()
        w = CaptureWriter(workspace=workspace, config=settings(write_timeout_s=3.0))
        made_in = time.perf_counter() - started
        w.submit(make_trace("q", "a"))
    finally:
        holder.rollback()
        holder.close()
    assert made_in < 1.5  # not the 3 s the store's first statement may wait for the lock
    assert w.flush(20) and w.store.count() == 1
    w.close()


def test_unknown_redactor_fails_at_construction(workspace):
    with pytest.raises(UnknownComponentError, match="Known redactors"):
        CaptureWriter(workspace=workspace, config=settings(redact=True, redactor="nope"))


def test_store_without_workspace_spools_next_to_it(tmp_path):
    store = SQLiteTraceStore(tmp_path / "x" / "traces.db")
    w = CaptureWriter(store=store, redact=False, config=settings())
    assert w.spool_dir == tmp_path / "x" / "spool"
    w.submit(make_trace("q", "a"))
    w.close()
    assert store.count() == 1  # the caller's store stays open
    store.close()


def test_atexit_flush_writes_everything_on_normal_shutdown(tmp_path):
    code = (
        "import sys; sys.path.insert(0, {tests!r})\n"
        "from conftest import make_trace\n"
        "from aad_core.capture import CaptureWriter\n"
        "w = CaptureWriter(workspace={ws!r}, redact=False)\n"
        "for i in range(500): w.submit(make_trace(f'q{{i}}', 'a'))\n"
        # no flush(), no close(): the interpreter exits right away
    ).format(tests=str(Path(__file__).parent), ws=str(tmp_path / "ws"))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert SQLiteTraceStore(tmp_path / "ws" / ".aad" / "traces.db").count() == 500
