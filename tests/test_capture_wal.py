"""Issue 15, durability: the capture writer's write-ahead log (aad_core.capture.wal).

A process killed with kill -9 loses at most the traces of its last WAL flush; the next writer of
the workspace redacts and stores the rest. The WAL never holds a raw value in readable form, a cut
last record is skipped, concurrent writers leave each other's live segments alone, and
``wal = false`` keeps the in-memory-only behaviour."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest
from conftest import make_trace

from aad_core import hookimpl
from aad_core.capture import CaptureWriter
from aad_core.capture.wal import HEADER_BYTES, WriteAheadLog
from aad_core.config import AADSettings
from aad_core.plugins import get_plugin_manager
from aad_core.plugins.components import Redactor
from aad_core.schema import Trace
from aad_core.store.sqlite import SQLiteTraceStore

TESTS = Path(__file__).parent
GATE = threading.Event()  # the in-process "stall" redactor waits for it


def settings(**capture: object) -> AADSettings:
    return AADSettings(capture={"redact": False, "write_timeout_s": 0.5, "retry_interval_s": 0.2, **capture})


def email(i: int) -> str:
    return f"walter.{i}@example.org"


def trace(i: int) -> Trace:
    return make_trace(f"q{i} mail me at {email(i)}", "ok", id=f"t-{i}")


def files_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file()) if folder.exists() else b""


def segments(ws) -> list[Path]:  # type: ignore[no-untyped-def]
    return sorted((ws.data_dir / "wal").glob("*.seg"))


class MailRedactor(Redactor):
    """Replaces this file's e-mail addresses, like a real redactor would."""

    def redact(self, traces):  # type: ignore[no-untyped-def]
        import re

        return [Trace.model_validate_json(re.sub(r"walter\.\d+@example\.org", "<EMAIL_ADDRESS_1>", t.model_dump_json()))
                .model_copy(update={"redacted": True}) for t in traces]


class StallRedactor(MailRedactor):
    """A redactor whose engine takes as long as GATE stays closed to build."""

    def redact(self, traces):  # type: ignore[no-untyped-def]
        GATE.wait(30)
        return super().redact(traces)


class Plugin:
    @hookimpl
    def aad_register_redactors(self, register):  # type: ignore[no-untyped-def]
        register("mail", MailRedactor)
        register("stall", StallRedactor)


@pytest.fixture
def redactors():
    get_plugin_manager().add_plugin(Plugin(), name="wal-test-redactors")
    GATE.clear()
    yield
    GATE.set()  # never leave a writer thread waiting


_CHILD = r"""
import sys, threading, time
sys.path.insert(0, {tests!r})
from conftest import make_trace
from aad_core import hookimpl
from aad_core.capture import CaptureWriter
from aad_core.config import AADSettings
from aad_core.plugins import get_plugin_manager
from aad_core.plugins.components import Redactor

class Stall(Redactor):  # redaction never finishes: every trace stays in the queue / the WAL
    def redact(self, traces):
        threading.Event().wait()

class P:
    @hookimpl
    def aad_register_redactors(self, register):
        register("stall", Stall)

get_plugin_manager().add_plugin(P(), name="stall")
w = CaptureWriter(workspace={ws!r}, config=AADSettings(capture={{"redact": True, "redactor": "stall"}}))
for i in range({n}):
    w.submit(make_trace(f"q{{i}} mail me at walter.{{i}}@example.org", "ok", id=f"t-{{i}}"))
time.sleep(0.4)  # several WAL flush intervals
print("logged", flush=True)
i = {n}
while True:  # the agent goes on until it is killed
    w.submit(make_trace(f"q{{i}} mail me at walter.{{i}}@example.org", "ok", id=f"t-{{i}}"))
    i += 1
    if i % 50 == 0:
        print(i, time.monotonic(), flush=True)
    time.sleep(0.0005)
"""


def test_kill9_loses_only_the_last_batch_and_the_next_writer_recovers_the_rest(tmp_path, redactors):
    n = 300
    ws_root = tmp_path / "ws"
    env = {**os.environ, "TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS": ""}
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(tests=str(TESTS), ws=str(ws_root), n=n)],
                             stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    progress: list[tuple[int, float]] = []
    try:
        assert child.stdout.readline().strip() == "logged"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # kill it while it submits
            fields = child.stdout.readline().split()
            progress.append((int(fields[0]), float(fields[1])))
            if progress[-1][0] >= n + 1000:
                break
        killed_at = time.monotonic()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    wal_dir = ws_root / ".aad" / "wal"
    raw = files_bytes(wal_dir)
    assert len(raw) > HEADER_BYTES and b"walter" not in raw and b"example.org" not in raw  # encrypted
    key = wal_dir / "key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600

    w = CaptureWriter(workspace=ws_root, config=settings(redact=True, redactor="mail"))
    assert w.flush(20)
    s = w.stats()
    w.close()
    store = SQLiteTraceStore(ws_root / ".aad" / "traces.db")
    got = sorted(int(t.id[2:]) for t in store.iter_traces())
    assert all(t.redacted for t in store.iter_traces())
    store.close()
    # The WAL keeps submission order and loses only its tail: ids 0..k-1, every one submitted
    # before the wait, and everything submitted more than half a second before the kill.
    assert got == list(range(len(got))) and len(got) >= n and s["recovered"] == len(got) and s["lost"] == 0
    safe = max((c for c, t in progress if t <= killed_at - 0.5), default=n)
    assert len(got) >= safe
    assert not list(wal_dir.glob("*.seg")) and not list(wal_dir.glob("*.tmp"))  # recovered, then deleted
    assert b"walter" not in files_bytes(ws_root / ".aad")  # stored redacted; nothing raw anywhere


def test_a_cut_or_damaged_record_is_skipped_and_recovery_goes_on(workspace, caplog):
    wal_dir = workspace.data_dir / "wal"
    wal = WriteAheadLog(wal_dir, plain=True)  # dead writers that did not redact, like this test's
    first = [trace(i) for i in range(3)]
    seg = wal.append([t.model_dump_json(exclude_none=True).encode() for t in first])
    wal.append([trace(i).model_dump_json(exclude_none=True).encode() for i in range(3, 5)])
    wal.close()  # as if killed: nothing acknowledged, the segment stays
    (path,) = segments(workspace)
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # the kill came while the last record was written
    other = WriteAheadLog(wal_dir, plain=True)  # a second dead writer: a damaged record between two good ones
    other.append([trace(10).model_dump_json().encode()])
    other.append([trace(11).model_dump_json().encode()])
    other.append([trace(12).model_dump_json().encode()])
    other.close()
    damaged = [p for p in segments(workspace) if p != path][0]
    blob = bytearray(damaged.read_bytes())
    second = HEADER_BYTES + 4 + 12 + int.from_bytes(blob[HEADER_BYTES : HEADER_BYTES + 4], "big")
    blob[second + 40] ^= 0xFF  # inside the second record's ciphertext
    damaged.write_bytes(bytes(blob))
    (wal_dir / f"{time.time_ns()}-{2**22 + 7}-deadbeef.seg").write_bytes(b"")  # killed before its header
    assert seg == 0

    w = CaptureWriter(workspace=workspace, config=settings())
    assert w.flush(10)
    s = w.stats()
    w.close()
    assert {t.id for t in SQLiteTraceStore(workspace.db_path).iter_traces()} == {"t-0", "t-1", "t-2", "t-10", "t-12"}
    assert s["recovered"] == 5 and s["wal_skipped"] == 2 and s["lost"] == 0
    assert "cut or damaged record" in caplog.text
    assert sorted(p.name for p in wal_dir.iterdir()) == ["key"]  # no empty or leftover file


def test_two_live_writers_leave_each_others_segments_alone(workspace, redactors):
    a = CaptureWriter(workspace=workspace, config=settings(redact=True, redactor="stall"))
    b = None
    try:
        for i in range(50):
            a.submit(trace(i))
        deadline = time.monotonic() + 5
        while not any(p.stat().st_size > HEADER_BYTES for p in segments(workspace)) and time.monotonic() < deadline:
            time.sleep(0.02)
        (live,) = segments(workspace)
        assert b"walter" not in files_bytes(workspace.data_dir)  # a live segment is encrypted too
        b = CaptureWriter(workspace=workspace, config=settings(redact=True, redactor="mail"))
        b.submit(trace(100))
        assert b.flush(10)
        assert b.stats()["recovered"] == 0 and live.exists()
        assert {t.id for t in b.store.iter_traces()} == {"t-100"}
        GATE.set()
        assert a.flush(10)
        assert a.stats()["written"] == 50 and a.stats()["recovered"] == 0
    finally:
        GATE.set()
        a.close(10)
        if b is not None:
            b.close(10)
    assert SQLiteTraceStore(workspace.db_path).count() == 51
    assert not segments(workspace)


def test_wal_false_keeps_traces_in_memory_only_and_still_recovers_an_old_log(workspace):
    old = WriteAheadLog(workspace.data_dir / "wal", plain=True)  # left by an earlier run with the WAL on
    old.append([trace(1).model_dump_json().encode()])
    old.close()
    w = CaptureWriter(workspace=workspace, config=settings(wal=False))
    assert w._wal_thread is None
    w.submit(trace(2))
    assert w.flush(10)
    s = w.stats()
    w.close()
    assert (s["written"], s["recovered"]) == (1, 1)
    assert {t.id for t in SQLiteTraceStore(workspace.db_path).iter_traces()} == {"t-1", "t-2"}
    assert sorted(p.name for p in (workspace.data_dir / "wal").iterdir()) == ["key"]


def test_recovery_skips_traces_the_dead_writer_had_stored_and_storing_twice_is_harmless(workspace):
    store = SQLiteTraceStore(workspace.db_path)
    store.add([trace(1).model_copy(update={"redacted": True})])
    store.close()
    dead = WriteAheadLog(workspace.data_dir / "wal", plain=True)
    dead.append([trace(i).model_dump_json().encode() for i in (1, 2, 3)])
    dead.close()
    w = CaptureWriter(workspace=workspace, config=settings())
    assert w.flush(10)
    assert w.stats()["recovered"] == 2 and w.store.count() == 3
    w.store.add([trace(2)])  # the store's id is the idempotency key
    assert w.store.count() == 3
    w.close()
    assert not segments(workspace)


@pytest.mark.parametrize("workspace_redacts", [True, False])
def test_a_writer_that_does_not_redact_leaves_a_redacting_writers_log_to_one_that_redacts(workspace, redactors,
                                                                                          workspace_redacts, caplog):
    dead = WriteAheadLog(workspace.data_dir / "wal")  # a redacting writer killed before it stored these
    dead.append([trace(i).model_dump_json().encode() for i in (1, 2)])
    dead.close()
    # whatever the workspace's [capture] redact says: the segment says its writer redacted
    plain = CaptureWriter(workspace=workspace, config=settings(redact=workspace_redacts, redactor="mail"),
                          redact=False)
    assert plain.flush(10)
    assert plain.stats()["recovered"] == 0 and plain.store.count() == 0 and segments(workspace)
    assert "2 trace(s)" in caplog.text and "wait for one that does" in caplog.text
    plain.close()
    w = CaptureWriter(workspace=workspace, config=settings(redact=True, redactor="mail"))
    assert w.flush(10)
    assert w.stats()["recovered"] == 2 and all(t.redacted for t in w.store.iter_traces())
    w.close()
    assert not segments(workspace) and b"walter" not in files_bytes(workspace.data_dir)


class BrokenRedactor(Redactor):
    """A redactor whose engine cannot be built (e.g. its spaCy model is not installed)."""

    def redact(self, traces):  # type: ignore[no-untyped-def]
        raise RuntimeError("spaCy model 'en_core_web_lg' is not installed")


def test_a_redactor_that_cannot_be_built_loses_no_trace_they_wait_in_the_log(workspace, redactors):
    class Broken:
        @hookimpl
        def aad_register_redactors(self, register):  # type: ignore[no-untyped-def]
            register("broken", BrokenRedactor)

    get_plugin_manager().add_plugin(Broken(), name="wal-test-broken-redactor")
    w = CaptureWriter(workspace=workspace, config=settings(redact=True, redactor="broken"))
    for i in range(3):
        w.submit(trace(i))
    assert not w.flush(5)
    s = w.stats()
    assert not w.close() and not w.flush(1)  # closed: still not stored
    assert (s["written"], s["dropped"], s["lost"], s["waiting_in_wal"]) == (0, 0, 0, 3)  # not poison: no redactor
    assert segments(workspace) and w._redactor_failure is not None
    depths = []  # the kept exception is raised again for each trace: its traceback must not grow with them
    for _ in range(5):
        with pytest.raises(Exception, match="en_core_web_lg"):
            w._ensure_redactor()
        depths.append(len(traceback.extract_tb(w._redactor_failure[1].__traceback__)))
    assert depths[-1] == depths[0], depths
    fixed = CaptureWriter(workspace=workspace, config=settings(redact=True, redactor="mail"))
    assert fixed.flush(10)
    assert fixed.stats()["recovered"] == 3 and fixed.store.count() == 3
    fixed.close()
    assert b"walter" not in files_bytes(workspace.data_dir)


def test_submit_stays_fast_and_a_closed_writer_leaves_only_the_key(workspace, redactors):
    w = CaptureWriter(workspace=workspace, config=settings(redact=True, redactor="stall"))
    traces = [trace(i) for i in range(2000)]
    lat = []
    for t in traces:
        t0 = time.perf_counter()
        w.submit(t)
        lat.append(time.perf_counter() - t0)
    lat.sort()
    assert lat[len(lat) // 2] < 0.0005  # well under a millisecond (a few microseconds unloaded)
    GATE.set()
    assert w.flush(30) and w.store.count() == 2000
    w.close()
    wal_dir = workspace.data_dir / "wal"
    assert sorted(p.name for p in wal_dir.iterdir()) == ["key"]
    assert stat.S_IMODE(wal_dir.stat().st_mode) == 0o700


def test_the_wal_failing_never_loses_a_trace(workspace, monkeypatch, caplog):
    def boom(self, payloads):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(WriteAheadLog, "append", boom)
    w = CaptureWriter(workspace=workspace, config=settings())
    for i in range(20):
        w.submit(trace(i))
    assert w.flush(10) and w.store.count() == 20 and w.stats()["lost"] == 0
    w.close()
    assert "cannot append to the write-ahead log" in caplog.text
    assert not segments(workspace)
