"""Issue 15, capture reliability: poison traces are isolated, only redacted data reaches the disk,
disk-full is counted honestly and leaves no partial files, exit without close() loses nothing and
prints nothing. The heavy cases (kill -9, a real size-limited disk, 16 threads over the queue) are
in benchmarks/reliability.py."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_trace

from aad_core import hookimpl
from aad_core.capture import CaptureWriter
from aad_core.capture.repair import MAX_DEPTH, repair
from aad_core.capture.spool import Spool
from aad_core.config import AADSettings
from aad_core.plugins import get_plugin_manager
from aad_core.plugins.components import Redactor
from aad_core.schema import ChatRequest, FunctionCall, Message, ToolCall, Trace
from aad_core.store.sqlite import SQLiteTraceStore

EMAIL = "jane.roe@example.com"


def settings(**capture) -> AADSettings:
    return AADSettings(capture={"redact": False, "write_timeout_s": 0.05, "retry_interval_s": 0.2, **capture})


def deep_dict(depth: int) -> dict:
    out: dict = {}
    cur = out
    for _ in range(depth):
        cur["a"] = {}
        cur = cur["a"]
    return out


def on_disk(ws) -> bytes:  # type: ignore[no-untyped-def]
    if ws.db_path.exists():
        conn = sqlite3.connect(ws.db_path)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
    return b"".join(p.read_bytes() for p in ws.data_dir.rglob("*") if p.is_file())


class UpperRedactor(Redactor):
    """A stand-in redactor: replaces the test e-mail, raises on 'POISON', recurses like a real one."""

    def redact(self, traces):  # type: ignore[no-untyped-def]
        out = []
        for t in traces:
            text = t.model_dump_json()  # fails for lone surrogates and too-deep structures, like a real walk
            if "POISON" in text:
                raise RuntimeError("cannot redact this one")
            out.append(Trace.model_validate_json(text.replace(EMAIL, "<EMAIL_ADDRESS_1>")).model_copy(update={"redacted": True}))
        return out


class UpperPlugin:
    @hookimpl
    def aad_register_redactors(self, register):  # type: ignore[no-untyped-def]
        register("upper", UpperRedactor)


@pytest.fixture
def upper():
    get_plugin_manager().add_plugin(UpperPlugin(), name="upper-redactor")


def test_repair_replaces_surrogates_and_cuts_deep_nesting_without_recursing():
    deep_args = '{"a": ' + "[" * 5000 + "]" * 5000 + "}"
    t = Trace(request=ChatRequest(messages=[Message(role="user", content="bad \ud800 char", refusal="x\udc00")]),
              response=Message(role="assistant", tool_calls=[ToolCall(function=FunctionCall(name="f", arguments=deep_args))]),
              metadata={"deep": deep_dict(5000)})
    fixed, notes = repair(t)
    assert len(notes) == 3 and fixed.metadata["aad_repaired"] == notes
    fixed.model_dump_json()  # serialisable now
    assert fixed.request.messages[0].content == "bad \ufffd char" and fixed.request.messages[0].refusal == "x\ufffd"
    assert isinstance(fixed.response.tool_calls[0].function.parsed_arguments(), str)  # still valid JSON
    assert t.request.messages[0].content == "bad \ud800 char"  # the input is untouched
    assert repair(make_trace("fine", "ok"))[1] == [] and MAX_DEPTH >= 32


def test_one_poison_trace_is_isolated_and_nothing_raw_reaches_the_disk(workspace, upper):
    """A batch of 256 with a lone surrogate, a too-deep structure and an unredactable trace: the
    first two are repaired and stored, the third dropped (counted, with its id); the other 253 are
    stored redacted; nothing raw in the store or the spool."""
    w = CaptureWriter(workspace=workspace, config=settings(redact=True, redactor="upper", batch_size=256, linger_s=1.0))
    traces = [make_trace(f"q{i} mail {EMAIL}", "ok") for i in range(253)]
    traces.insert(10, make_trace(f"lone \ud800 surrogate {EMAIL}", "ok"))
    traces.insert(100, make_trace(f"deep {EMAIL}", "ok", metadata={"deep": deep_dict(3000)}))
    poison = make_trace(f"POISON {EMAIL}", "ok")
    traces.insert(200, poison)
    for t in traces:
        w.submit(t)
    assert w.flush(30)
    s = w.stats()
    assert w.store.count() == 255 and not w.store.has(poison.id)
    assert (s["written"], s["repaired"], s["dropped"], s["lost"], s["spooled"]) == (255, 2, 1, 1, 0)
    assert s["lost_by"] == {"poison": 1}
    w.close()
    assert EMAIL.encode() not in on_disk(workspace)
    assert all(t.redacted for t in SQLiteTraceStore(workspace.db_path).iter_traces())


def test_the_presidio_redactor_handles_deep_tool_call_arguments(workspace):
    pytest.importorskip("presidio_analyzer")
    deep_args = '{"to": "' + EMAIL + '", "x": ' + "[" * 3000 + "]" * 3000 + "}"
    t = make_trace(f"write to {EMAIL}", "ok")
    t.response = Message(role="assistant", tool_calls=[ToolCall(function=FunctionCall(name="f", arguments=deep_args))])
    w = CaptureWriter(workspace=workspace, config=settings(redact=True))
    w.submit(t)
    w.submit(make_trace(f"and \udc80 to {EMAIL}", "ok"))
    assert w.flush(120)
    assert w.store.count() == 2 and w.stats()["lost"] == 0
    w.close()
    assert EMAIL.encode() not in on_disk(workspace)


class DiskFull:
    """The store and the spool both fail with ENOSPC until ``free()``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = True
        real_add, real_fsync = SQLiteTraceStore.add, os.fsync

        def add(store, traces):  # type: ignore[no-untyped-def]
            if self.full:
                raise sqlite3.OperationalError("database or disk is full")
            return real_add(store, traces)

        def fsync(fd):  # type: ignore[no-untyped-def]
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_fsync(fd)

        monkeypatch.setattr(SQLiteTraceStore, "add", add)
        monkeypatch.setattr(os, "fsync", fsync)

    def free(self) -> None:
        self.full = False


def test_disk_full_holds_redacted_traces_then_writes_them_and_leaves_no_part_files(workspace, monkeypatch, caplog):
    disk = DiskFull(monkeypatch)
    w = CaptureWriter(workspace=workspace, config=settings(queue_size=100, retry_interval_s=0.1))
    for i in range(60):
        w.submit(make_trace(f"q{i}", "a"))
    assert not w.flush(10)  # honest: traces are only in memory
    s = w.stats()
    assert (s["held"], s["lost"], s["written"], s["spooled"]) == (60, 0, 0, 0)
    assert not list(workspace.spool_dir.glob("*.part")) and not list(workspace.spool_dir.glob("*.jsonl"))
    assert "No space left on device" in caplog.text
    disk.free()
    import time

    time.sleep(0.3)
    assert w.flush(10)
    assert w.store.count() == 60 and w.stats()["held"] == 0 and w.stats()["lost"] == 0
    w.close()


def test_disk_full_beyond_the_memory_bound_counts_every_lost_trace(workspace, monkeypatch, caplog):
    DiskFull(monkeypatch)
    w = CaptureWriter(workspace=workspace, config=settings(queue_size=50, batch_size=10, retry_interval_s=30))
    for i in range(120):
        w.submit(make_trace(f"q{i}", "a"))
        if i % 10 == 9:
            w.flush(10)  # paced: the queue never overflows, only the disk is the problem
    s = w.stats()
    assert s["held"] == 50 and s["lost"] == 70 and s["lost_by"] == {"disk": 70}
    w.close(timeout=5)
    s = w.stats()
    assert s["lost"] == 120 and s["written"] == 0  # what was held is lost at close, and said so
    assert "120 lost" in caplog.text and "No space left on device" in caplog.text
    assert not list(workspace.spool_dir.glob("*.part"))


def test_sqlite_reports_the_real_error_when_sqlite_rolled_back_itself(tmp_path):
    """Disk full during COMMIT: SQLite rolls back on its own; the error is the cause, not
    'cannot rollback - no transaction is active'."""
    store = SQLiteTraceStore(tmp_path / "t.db")
    conn = store._conn()
    conn.execute("PRAGMA max_page_count = 12")  # a database that cannot grow: SQLITE_FULL
    with pytest.raises(sqlite3.OperationalError, match="full"):
        store.add([make_trace("x" * 2000 + str(i), "a") for i in range(200)])
    assert not conn.in_transaction
    store.close()


def test_a_part_file_of_a_dead_writer_is_recovered_and_an_empty_one_removed(workspace):
    good = make_trace("written before the crash", "a", metadata={}).model_copy(update={"redacted": True})
    workspace.spool_dir.mkdir(parents=True, exist_ok=True)
    dead = 2**22 + 12345  # above the default pid_max: no such process
    (workspace.spool_dir / f"1-{dead}-aaaa.part").write_bytes(good.model_dump_json().encode() + b'\n{"id": "cut')
    (workspace.spool_dir / f"2-{dead}-bbbb.part").write_bytes(b"")
    w = CaptureWriter(workspace=workspace, config=settings())
    assert w.flush(10)
    assert w.store.has(good.id) and w.stats()["reloaded"] == 1
    assert not list(workspace.spool_dir.glob("*.part"))
    assert list(workspace.spool_dir.glob("*.bad"))  # the cut line, kept aside
    w.close()


def test_spool_write_failure_leaves_no_part_file(tmp_path, monkeypatch):
    def boom(fd):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    spool = Spool(tmp_path / "spool")
    with pytest.raises(OSError):
        spool.write([make_trace("q", "a")])
    assert list((tmp_path / "spool").iterdir()) == []


def test_submit_does_not_wait_for_the_redactor_to_be_built(workspace, upper, monkeypatch):
    import threading
    import time

    gate = threading.Event()
    real = UpperRedactor.redact

    def slow(self, traces):  # type: ignore[no-untyped-def]
        gate.wait(10)  # the engine takes long to build
        return real(self, traces)

    monkeypatch.setattr(UpperRedactor, "redact", slow)
    w = CaptureWriter(workspace=workspace, config=settings(redact=True, redactor="upper", queue_size=5,
                                                           full_policy="block", block_timeout_s=0.05))
    worst = 0.0
    for i in range(20):
        t0 = time.perf_counter()
        w.submit(make_trace(f"q{i} {EMAIL}", "a"))
        worst = max(worst, time.perf_counter() - t0)
    assert worst < 0.05 + 0.2
    gate.set()
    assert w.flush(20)
    s = w.stats()
    assert w.store.count() + s["lost"] == 20 and s["overflowed"] == s["lost"] > 0
    w.close()
    assert EMAIL.encode() not in on_disk(workspace)


def test_exit_without_close_keeps_everything_and_prints_no_traceback(tmp_path):
    pytest.importorskip("presidio_analyzer")
    code = (
        "import sys; sys.path.insert(0, {tests!r})\n"
        "from conftest import make_trace\n"
        "from aad_core.capture import CaptureWriter\n"
        "w = CaptureWriter(workspace={ws!r})\n"  # redaction on: the engine is still being built at exit
        "for i in range(200): w.submit(make_trace(f'q{{i}} mail a{{i}}@example.org', 'a'))\n"
    ).format(tests=str(Path(__file__).parent), ws=str(tmp_path / "ws"))
    env = {**os.environ, "TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS": ""}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    store = SQLiteTraceStore(tmp_path / "ws" / ".aad" / "traces.db")
    assert store.count() == 200 and all(t.redacted for t in store.iter_traces())
    assert b"@example.org" not in b"".join(p.read_bytes() for p in (tmp_path / "ws" / ".aad").rglob("*") if p.is_file())
