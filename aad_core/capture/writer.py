"""The capture writer: a bounded queue, one background thread, batched inserts, and a spool.

Capture paths call :meth:`CaptureWriter.submit` from the agent's threads; it only appends the
trace to an in-memory inbox and returns (it never redacts, never touches the disk, takes no lock
unless the queue is full with ``full_policy = "block"``, and never waits longer than
``block_timeout_s``). The background thread builds the redactor as soon as the writer starts,
redacts each trace (S2) and writes the batch in one transaction. Only redacted traces ever reach
the disk: the store, and the spool.

* **Spool.** When the store cannot be written (locked, disk full, deleted), the batch goes to a
  JSONL file in ``.aad/spool/``; spooled traces are loaded back into the store when it works
  again, and by the next writer that starts.
* **Isolation.** A trace that cannot be redacted or serialised (a lone surrogate character,
  structures nested too deep for a recursive walk) is repaired (:mod:`aad_core.capture.repair`)
  and redacted again, or dropped alone with its id and the reason logged; the rest of its batch
  is written as usual.
* **Honest counts.** Every trace is counted as written, spooled, held (in memory, redacted, when
  neither the store nor the spool can be written; retried) or lost, with the reason
  (``stats()["lost_by"]``); losses are logged with their cause and running total.
* **Write-ahead log.** A second, light thread appends the submitted traces every
  ``wal_flush_ms`` (50 ms) to an encrypted, fsynced log in ``.aad/wal/``
  (:mod:`aad_core.capture.wal`) before they are redacted, so a process killed hard loses only
  the traces of the last flush interval; the next writer of the workspace redacts and stores the
  rest. A segment is deleted as soon as its traces are stored, spooled or counted lost.
  ``[capture] wal = false``: the queue is in memory only, as before.
* **Short window.** A batch is written at the latest ``max(linger_s, 0.1 s)`` after its first
  trace was redacted.

The spool folder is :mod:`aad_core.capture.spool`; the workspace, the store and its health are
:mod:`aad_core.capture.target`.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aad_core.capture.sampling import should_record
from aad_core.capture.spool import Spool
from aad_core.capture.target import StoreTarget, resolve_workspace, spool_dir_for, wal_dir_for
from aad_core.config import AADSettings
from aad_core.schema import Trace

if TYPE_CHECKING:
    from aad_core.capture.wal import Leftover, WriteAheadLog
    from aad_core.store.base import TraceStore
    from aad_core.workspace import Workspace

log = logging.getLogger(__name__)

#: A redacted batch is written at the latest this long after its first trace was redacted.
WRITE_WINDOW_S = 0.1
#: Seconds between two log lines about the same kind of loss (the running total is in each).
LOSS_LOG_INTERVAL_S = 5.0
#: Most traces in one WAL record (a larger backlog is appended as several records, without a pause).
WAL_RECORD_MAX = 2048
#: Seconds before a redactor that failed to build is tried again (its traces wait in the WAL meanwhile).
REDACTOR_RETRY_S = 30.0


@dataclass
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)


class _Stop:
    pass


@dataclass
class _Batch:
    """Traces handed from the WAL thread to the writer thread; ``seg``: their WAL segment (None:
    not in the WAL, e.g. the disk is full or the trace does not serialise)."""

    traces: list[Trace]
    seg: int | None


class _Tally:
    """A counter that any thread bumps without a lock: ``next()`` on an :func:`itertools.count` is
    atomic under the GIL. Reading it is a ``next()`` too, so the reads are counted (under a lock:
    they are rare) and taken off."""

    def __init__(self) -> None:
        self._count = itertools.count()
        self.bump = self._count.__next__
        self._reads = 0
        self._lock = threading.Lock()

    @property
    def value(self) -> int:
        with self._lock:
            n = next(self._count) - self._reads
            self._reads += 1
            return n


class _Inbox:
    """What the agent's threads submit, in order with flush and stop markers: a deque (``append``
    and ``popleft`` are atomic under the GIL), so :meth:`append` takes no lock. One consumer thread
    takes the items off (the WAL thread, or the writer thread with ``[capture] wal = false``).

    Waking the consumer: while it waits for an empty inbox it says so (``_idle``), and the first
    :meth:`append` after that sets ``_event`` (the only lock an append can take, once per idle
    period); :meth:`put_marker` (flush, close) always sets it, and also cuts short a
    :meth:`pause` (the WAL's group-commit wait).

    ``_lock`` is taken by the consumer for each item it takes off, by :meth:`put_marker` and by
    :meth:`pending` (exact counts for stats, flush and close), never by :meth:`append`."""

    def __init__(self) -> None:
        self._items: deque[_Item] = deque()
        self._event = threading.Event()
        self._idle = False
        self._lock = threading.Lock()
        self._markers_in = 0  # markers appended so far (under _lock)
        self._markers_out = 0  # markers taken off so far (under _lock)
        self.taken = 0  # traces taken off so far (under _lock)

    def append(self, trace: Trace) -> None:
        self._items.append(trace)
        if self._idle:
            self._idle = False  # racy on purpose: a second set() is harmless, a missing one impossible
            self._event.set()

    def put_marker(self, marker: _Flush | _Stop) -> None:
        with self._lock:
            self._markers_in += 1
            self._items.append(marker)
        self._event.set()

    def waiting(self) -> int:
        """Traces in the inbox, without a lock: while items move, too few, never too many (the
        reads are in the order that makes a marker taken off or added meanwhile count against)."""
        out = self._markers_out
        n = len(self._items)
        return n - (self._markers_in - out)

    def pending(self) -> int:
        """Traces in the inbox plus those taken off so far, exactly (but for appends under way)."""
        with self._lock:
            return len(self._items) - (self._markers_in - self._markers_out) + self.taken

    def get_nowait(self) -> _Item:
        with self._lock:
            try:
                item = self._items.popleft()
            except IndexError:
                raise queue.Empty from None
            if isinstance(item, Trace):
                self.taken += 1
            else:
                self._markers_out += 1
        return item

    def get(self, timeout: float | None = None) -> _Item:
        """The next item, waiting up to ``timeout`` seconds (None: no limit); :class:`queue.Empty`
        when none came."""
        try:
            return self.get_nowait()
        except queue.Empty:
            if timeout is not None and timeout <= 0:
                raise
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                # Idle first, then look: an append either sees _idle or is seen by this look.
                self._event.clear()
                self._idle = True
                try:
                    return self.get_nowait()
                except queue.Empty:
                    pass
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise queue.Empty
                self._event.wait(left)
        finally:
            self._idle = False

    def pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less when a flush or stop marker is (or comes) in the inbox."""
        self._event.clear()
        if self._markers_in > self._markers_out:
            return
        self._event.wait(seconds)


_Item = Trace | _Batch | _Flush | _Stop


class _Anchor:
    pass


_ANCHOR = _Anchor()


def _prepare_for_shutdown() -> None:
    """Make a redactor that is still being built when the interpreter exits finish quietly: the
    modules that register exit hooks are imported now (registering one during shutdown raises),
    and ``weakref.finalize`` is hooked to ``atexit`` now (finalizers created during shutdown by a
    late import, torch's for one, otherwise run after module teardown and print
    ``TypeError: 'NoneType' object is not callable``)."""
    import concurrent.futures.thread  # noqa: F401

    weakref.finalize(_ANCHOR, int)


class CaptureWriter:
    """Writes traces to a workspace's trace store in the background.

    Parameters
    ----------
    workspace:
        A :class:`~aad_core.workspace.Workspace` or its folder (created with ``aad.toml`` and
        ``.aad/`` when missing). None: ``store`` if given, else the workspace found from
        ``$AAD_WORKSPACE`` or the current folder.
    store:
        A trace store to write to instead of the workspace's own. The caller keeps ownership
        (``close()`` does not close it).
    redact:
        Remove PII with the configured redactor before anything is written. None = the
        ``[capture] redact`` setting (true by default).
    config:
        Settings; None = the workspace's ``aad.toml`` (or defaults and ``AAD_*`` variables).

    Threads: with ``[capture] wal`` (the default), ``aad-capture-wal`` takes the submitted traces
    off the inbox every ``wal_flush_ms`` and appends them, encrypted, to the write-ahead log, and
    ``aad-capture-writer`` redacts and stores them and recovers what dead writers left in the log;
    without it the writer thread takes them off the inbox itself. The agent's threads share no
    lock with these threads on :meth:`submit` (a deque append, lock-free counters), so a thread
    preempted inside ``submit`` never makes the others wait (no lock convoy).
    """

    def __init__(
        self,
        *,
        workspace: Workspace | str | Path | None = None,
        store: TraceStore | None = None,
        redact: bool | None = None,
        config: AADSettings | None = None,
    ) -> None:
        ws = resolve_workspace(workspace, store)
        self.workspace = ws
        self.config = config or (ws.config if ws is not None else AADSettings())
        cfg = self.config.capture
        self.redact = cfg.redact if redact is None else bool(redact)
        if self.redact:  # an unknown redactor or a bad [redactor.<name>] key is a configuration error: say so now
            from aad_core.plugins.params import component_params

            component_params("redactor", cfg.redactor, self.config, workspace=ws)
            _prepare_for_shutdown()

        self._spool_files = Spool(spool_dir_for(ws, store))
        self.wal_dir = wal_dir_for(ws, store)

        # Submitted traces (no lock on submit); `_used()` (traces submitted and not yet redacted)
        # is held to queue_size, give or take the threads submitting at that very moment.
        self._inbox = _Inbox()
        self._done = 0  # traces redacted or counted lost after leaving the inbox: the writer thread's
        self._room = threading.Condition(threading.Lock())  # full_policy "block" waits on it
        self._blocked = 0  # threads waiting on _room (changed under it)
        # Counted on the agent's threads without a lock (stats() adds them to _counts).
        self._captured = _Tally()
        self._skipped = _Tally()
        self._overflowed = _Tally()
        self._overflow_logged = float("-inf")  # when the last queue-full loss line was logged
        # WAL thread -> writer thread (only with [capture] wal).
        self._handoff: queue.Queue[_Item] = queue.Queue()
        self._wal: WriteAheadLog | None = None  # opened on the WAL thread
        self._wal_ready = threading.Event()
        self._unacked: list[tuple[int, int]] = []  # (segment, traces) processed while traces were held
        self._leftovers: Any = None  # iterator over dead writers' segments, while recovering
        self._leftover: Leftover | None = None
        self._leftover_pos = 0
        self._leftovers_kept: set[Path] = set()  # recovered into memory but not stored (disk full)
        self._lock = threading.Lock()
        self._counts = {"captured": 0, "written": 0, "spooled": 0, "reloaded": 0, "recovered": 0, "errors": 0,
                        "lost": 0, "overflowed": 0, "repaired": 0, "dropped": 0, "wal_skipped": 0,
                        "waiting_in_wal": 0}
        self._lost_by: dict[str, int] = {}
        self._logged: set[str] = set()
        self._last_loss_log: dict[str, float] = {}
        self._redactor: Any = None  # built on the background thread as soon as it starts
        self._redactor_ready = threading.Event()
        self._redactor_failure: tuple[float, BaseException] | None = None  # (when, why) the last build failed
        # Redacted traces that neither the store nor the spool could take (disk full): retried.
        self._held: deque[Trace] = deque()
        self._target = StoreTarget(ws, store, write_timeout_s=cfg.write_timeout_s,
                                   retry_interval_s=cfg.retry_interval_s)
        self._spool_pending = True  # a previous run may have left spooled traces
        self._closed = False
        # The store opens on the writer thread (its first statement can wait out another process's write
        # lock for write_timeout_s): making a writer, or a callback handler, never waits for it.
        self._wal_thread: threading.Thread | None = None
        if cfg.wal:
            self._wal_thread = threading.Thread(target=self._run_wal, name="aad-capture-wal", daemon=True)
            self._wal_thread.start()
        self._thread = threading.Thread(target=self._run, name="aad-capture-writer", daemon=True)
        self._thread.start()
        atexit.register(self._atexit)

    # -- public API --------------------------------------------------------------------------
    def submit(self, trace: Trace) -> None:
        """Queue ``trace`` for writing. Never raises, never redacts or writes on the caller's
        thread, and never blocks longer than ``block_timeout_s`` (queue-full policy "block").
        When the queue is full the trace is counted as lost (``stats()["overflowed"]``) and a
        warning is logged: it is never written unredacted.

        Lock-free under the GIL when the trace is queued and when it is dropped ("spool"), but
        for waking the idle background thread (once per idle period): the bound is a check of
        counters each written by one thread, then a deque append, so it may be overshot by at
        most the number of threads submitting at that same moment."""
        try:
            if not isinstance(trace, Trace):
                raise TypeError(f"CaptureWriter.submit expects an aad_core.schema.Trace. Got {type(trace).__name__} instead.")
            cfg = self.config.capture
            if not should_record(trace, cfg):  # [capture] enabled (AAD_CAPTURE=0), sample_rate
                self._skipped.bump()
                return
            self._captured.bump()
            if self._closed:
                self._late(trace)
                return
            # No lock here: a check and an append (two threads may both pass the check for the
            # last free place: the bound is overshot by at most the threads submitting at once).
            if self._used(exact=False) < cfg.queue_size:
                self._inbox.append(trace)
                if self._closed:  # close() ran between the check above and the append: take it back if
                    self._take_back(trace)  # no background thread will (else they store it as usual)
                return
            if cfg.full_policy == "block" and self._wait_for_room(trace, cfg.block_timeout_s, cfg.queue_size):
                return
            self._overflow(cfg.queue_size)
        except Exception as err:  # last line of defence for the agent
            self._error("submit", err)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every trace submitted so far is redacted and stored or spooled, and retry
        loading the spool into the store. Returns False (and logs what is left) when ``timeout``
        (seconds) ran out first or when traces are still held in memory because neither the
        store nor the spool could be written."""
        if not self._thread.is_alive() or (self._wal_thread is not None and not self._wal_thread.is_alive()):
            return self._used() == 0 and not self._held and not self._counts["waiting_in_wal"]
        marker = _Flush()
        self._inbox.put_marker(marker)
        if not marker.done.wait(timeout):
            self._log_once("flush-timeout", logging.WARNING, "aad capture: flush() timed out with %d trace(s) queued",
                           self._used())
            return False
        if self._counts["waiting_in_wal"]:
            self._log_once("waiting-in-wal", logging.WARNING, "aad capture: %d trace(s) wait in the write-ahead log for "
                           "a writer that can redact and store them", self._counts["waiting_in_wal"])
        return not self._held and not self._counts["waiting_in_wal"]

    def close(self, timeout: float | None = None) -> bool:
        """Flush, stop the background thread and close the store this writer opened. Returns
        True when every trace submitted was stored or spooled; otherwise (and whenever traces
        were lost or are left in the spool) a warning says how many and why."""
        if self._closed:
            return not self._held and self._used() == 0 and not self._counts["waiting_in_wal"]
        self.flush(timeout)
        self._closed = True
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._thread.is_alive():
            self._inbox.put_marker(_Stop())  # through the WAL thread, if any, to the writer thread
            for thread in (self._wal_thread, self._thread):
                if thread is not None:
                    thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        queued = self._used() if self._thread.is_alive() else 0
        if not self._thread.is_alive():
            # Whatever is still queued (the thread stopped early) cannot be redacted any more.
            for q in (self._inbox, self._handoff):
                while True:
                    try:
                        item = q.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(item, _Flush):
                        item.done.set()
                    elif isinstance(item, (Trace, _Batch)):
                        n = 1 if isinstance(item, Trace) else len(item.traces)
                        self._lose(n, "closed", "the writer stopped before it could redact them")
                        self._release(n)
                        if isinstance(item, _Batch) and item.seg is not None:
                            self._unacked.append((item.seg, n))
            if self._held:
                self._lose(len(self._held), "disk", "neither the store nor the spool could be written before close()")
                self._held.clear()
            self._settle([])
            if self._leftover is not None:  # recovery was cut short: a later writer finishes it
                self._leftover.release()
                self._leftover = None
            if self._wal is not None and (self._wal_thread is None or not self._wal_thread.is_alive()):
                self._wal.close()
        if self._target.owned and self._target.store is not None:
            try:
                self._target.store.close()
            except Exception as err:
                self._error("close", err)
        atexit.unregister(self._atexit)
        s = self.stats()
        if s["lost"] or s["spool_files"] or queued or s["waiting_in_wal"]:
            log.warning("aad capture closed: %d captured, %d written, %d lost %s, %d spool file(s) left in %s%s%s",
                        s["captured"], s["written"] + s["reloaded"], s["lost"], s["lost_by"] or "", s["spool_files"],
                        self.spool_dir, f", {queued} still queued (timeout)" if queued else "",
                        f", {s['waiting_in_wal']} waiting in the write-ahead log for a writer that can redact them"
                        if s["waiting_in_wal"] else "")
        return not queued and not s["held"] and not s["waiting_in_wal"]

    def stats(self) -> dict[str, Any]:
        """Counters: captured, written, spooled, reloaded (from the spool), recovered (from the
        write-ahead log of a writer that died: stored or spooled), errors, lost (with
        ``lost_by``: reason -> count), overflowed (lost because the queue was full), repaired
        (poison traces stored after a repair), dropped (poison traces that could not be
        repaired: lost), wal_skipped (cut or damaged records and lines in recovered WAL
        segments), queued (submitted, not yet redacted), held (redacted, in memory, waiting for
        a writable disk), spool_files (waiting in the spool folder), wal_segments (segment files
        in the WAL folder, of every writer of the workspace), waiting_in_wal (traces this writer could not
        process, e.g. without a redactor: the next writer recovers them from the WAL)."""
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
            lost_by = dict(self._lost_by)
        out["captured"] = self._captured.value
        overflowed = self._overflowed.value
        out["overflowed"] = overflowed
        out["lost"] += overflowed
        if overflowed:
            lost_by["queue-full"] = lost_by.get("queue-full", 0) + overflowed
        out["lost_by"] = lost_by
        skipped = self._skipped.value
        if skipped:
            out["skipped"] = skipped
        out["queued"] = self._used()
        out["held"] = len(self._held)
        out["spool_files"] = self._spool_files.count()
        out["wal_segments"] = self._wal.segments() if self._wal is not None else 0
        return out

    @property
    def store(self) -> Any:
        """The trace store (opened on first use when the writer owns it; None while it cannot be opened)."""
        if self._target.store is None and self._target.owned:
            try:
                self._target.ensure()
            except Exception:  # the writer thread reports it, and spools meanwhile
                pass
        return self._target.store

    @property
    def spool_dir(self) -> Path:
        return self._spool_files.folder

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- background thread -------------------------------------------------------------------
    def _run(self) -> None:
        if self._target.owned:
            try:
                self._target.ensure()
            except Exception as err:  # e.g. locked right now: spool until it opens
                self._store_failed(err)
        if self.redact:  # warm the redaction engine up now, off the agent's threads
            self._guard("redact", self._ensure_redactor)
        self._start_recovery()
        source: _Inbox | queue.Queue[_Item] = self._handoff if self._wal_thread is not None else self._inbox
        batch_size = self.config.capture.batch_size
        linger = self.config.capture.linger_s
        poll = min(self.config.capture.retry_interval_s, 1.0)
        carry: _Batch | None = None  # the rest of a WAL batch larger than batch_size
        while True:
            if carry is not None:
                item, carry = carry, None
            else:
                try:
                    item = source.get(timeout=0.0 if self._leftovers is not None else poll)
                except queue.Empty:
                    if self._leftovers is not None:  # nothing new: recover more of what dead writers left
                        self._guard("recover", lambda: self._recover(batch_size))
                    elif not self._target.pausing():
                        if self._held:
                            self._guard("write", self._retry_held)
                            self._settle([])
                        if self._spool_pending:
                            self._guard("reload", self._drain_spool)
                    continue
            batch: list[Trace] = []
            acks: list[tuple[int, int]] = []
            markers: list[_Flush | _Stop] = []
            # Fill the batch for up to `linger` seconds: fewer, larger transactions, and the
            # agent's threads are interrupted less often.
            deadline = time.monotonic() + linger
            while True:
                if isinstance(item, Trace):
                    batch.append(item)
                elif isinstance(item, _Batch):
                    room = batch_size - len(batch)
                    batch.extend(item.traces[:room])
                    if item.seg is not None:
                        acks.append((item.seg, min(room, len(item.traces))))
                    if len(item.traces) > room:
                        carry = _Batch(item.traces[room:], item.seg)
                        break
                else:
                    markers.append(item)
                    break
                if len(batch) >= batch_size:
                    break
                try:
                    item = source.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
            if batch:
                ok = self._guard("write", lambda: self._process(batch))
                self._release(len(batch))
                if ok:
                    self._settle(acks)
                else:  # the WAL keeps them (never acknowledged): the next writer of the workspace recovers them
                    logged = sum(n for _, n in acks)
                    self._count("waiting_in_wal", logged)
                    self._lose_unlogged(len(batch) - logged)
                if self._leftovers is not None:  # recovery goes on under load too
                    self._guard("recover", lambda: self._recover(batch_size))
            for m in markers:
                if self._held:
                    self._guard("write", self._retry_held)
                    self._settle([])
                if self._spool_pending:
                    self._guard("reload", lambda: self._drain_spool(force=True))
                self._guard("recover", self._recover_all)
                if isinstance(m, _Flush):
                    m.done.set()
                else:
                    return

    def _run_wal(self) -> None:
        """The WAL thread: every ``wal_flush_ms``, take what was submitted off the inbox, append
        it to the write-ahead log (encrypted, fsynced) and hand it to the writer thread, in order
        with flush and stop markers (which end the group-commit wait at once). Serialising and
        encrypting take about 4 µs per small trace (0.4 ms per hundred); the agent's threads never
        wait for this thread (no lock is shared with them), only for the GIL."""
        try:
            from aad_core.capture.wal import WriteAheadLog

            self._wal = WriteAheadLog(self.wal_dir, plain=not self.redact)
        except Exception as err:
            self._error("wal", err, f"cannot open the write-ahead log in {self.wal_dir}; traces stay in memory "
                        "only until they are stored")
        finally:
            self._wal_ready.set()
        interval = self.config.capture.wal_flush_ms / 1000.0
        inbox = self._inbox
        last = float("-inf")
        backlog = False
        while True:
            try:
                item = inbox.get(timeout=1.0)
            except queue.Empty:
                continue
            if isinstance(item, Trace) and not backlog:  # group commit: one fsync per interval at most
                wait = last + interval - time.monotonic()
                if wait > 0:
                    inbox.pause(wait)  # flush() and close() cut it short
            last = time.monotonic()
            items: list[_Item] = [item]
            while len(items) < WAL_RECORD_MAX:
                try:
                    items.append(inbox.get_nowait())
                except queue.Empty:
                    break
            backlog = len(items) >= WAL_RECORD_MAX
            run: list[Trace] = []
            for k, it in enumerate(items):
                if isinstance(it, Trace):
                    run.append(it)
                    continue
                self._log_batch(run)
                run = []
                self._handoff.put(it)
                if isinstance(it, _Stop):
                    for rest in items[k + 1 :]:  # submitted while close() ran: close() counts them
                        self._handoff.put(rest)
                    return
            self._log_batch(run)

    def _log_batch(self, traces: list[Trace]) -> None:
        """Append ``traces`` to the WAL as one record and hand them to the writer thread. A trace
        that does not serialise, or a batch the WAL cannot take (disk full), goes on unlogged."""
        if not traces:
            return
        wal = self._wal
        if wal is None:
            self._handoff.put(_Batch(traces, None))
            return
        lines: list[bytes] = []
        logged: list[Trace] = []
        unlogged: list[Trace] = []
        for t in traces:
            try:
                lines.append(t.model_dump_json(exclude_none=True).encode("utf-8"))
                logged.append(t)
            except Exception:  # a poison trace: the writer thread repairs or drops it
                unlogged.append(t)
        seg: int | None = None
        if logged:
            try:
                seg = wal.append(lines)
            except Exception as err:
                self._error("wal", err, f"cannot append to the write-ahead log in {self.wal_dir}; "
                            "these traces are in memory only until they are stored")
            self._handoff.put(_Batch(logged, seg))
        if unlogged:
            self._handoff.put(_Batch(unlogged, None))

    def _settle(self, acks: list[tuple[int, int]]) -> None:
        """Acknowledge processed WAL batches: their traces are stored, spooled or counted lost.
        While traces are held in memory (disk full), acknowledgements wait: the WAL may be the
        only copy of the held traces on disk."""
        self._unacked.extend(acks)
        if self._held or not self._unacked or self._wal is None:
            return
        done, self._unacked = self._unacked, []
        for seg, n in done:
            self._guard("wal", lambda: self._wal.ack(seg, n))  # type: ignore[union-attr]

    # -- recovery of dead writers' WAL segments ----------------------------------------------
    def _start_recovery(self) -> None:
        """Open the WAL for recovery: the one the WAL thread opened, or (``wal = false``) one
        just for the segments an earlier run may have left."""
        if self._wal_thread is not None:
            self._wal_ready.wait(60)
        elif self.wal_dir.is_dir() and any(self.wal_dir.glob("*.seg")):
            try:
                from aad_core.capture.wal import WriteAheadLog

                self._wal = WriteAheadLog(self.wal_dir, plain=not self.redact)
            except Exception as err:
                self._error("wal", err, f"cannot open the write-ahead log in {self.wal_dir} to recover it")
        if self._wal is not None:
            self._leftovers = self._wal.leftovers(skip=self._leftovers_kept)

    def _recover_all(self) -> None:
        """Recover every segment of a dead writer now (a flush: look for new ones too)."""
        if self._wal is None:
            return
        if self._leftovers is None:
            self._leftovers = self._wal.leftovers(skip=self._leftovers_kept)
        self._recover(None)

    def _recover(self, limit: int | None) -> None:
        """Redact and store up to ``limit`` traces (None: all) from dead writers' segments; a
        segment is deleted once all of its traces are stored or spooled."""
        if self.redact and not self._redactor_ready.is_set():
            self._leftovers = None  # no redactor (it failed to build): the segments wait for a later writer
            return
        done = 0
        while limit is None or done < limit:
            left = self._leftover
            if left is None:
                left = next(self._leftovers, None) if self._leftovers is not None else None
                if left is None:
                    self._leftovers = None
                    return
                if not self.redact and not left.plain:
                    # a redacting writer's raw traces: never stored unredacted; they wait for one that redacts
                    self._log_once(f"wal-redact:{left.path.name}", logging.WARNING,
                                   "aad capture: %d trace(s) in %s were written by a writer that redacts; this one does "
                                   "not, so they wait for one that does (CaptureWriter(redact=True), the default where "
                                   "[capture] redact = true)", len(left.traces), left.path)
                    self._leftovers_kept.add(left.path)
                    left.release()
                    continue
                self._leftover, self._leftover_pos = left, 0
                self._report_leftover(left)
            chunk = left.traces[self._leftover_pos : self._leftover_pos + self.config.capture.batch_size]
            if chunk:
                try:
                    self._process(self._not_stored(chunk), counter="recovered")
                except Exception:  # unexpected: leave the segment to a later writer, go on with the next
                    self._leftover = None
                    self._leftovers_kept.add(left.path)
                    left.release()
                    raise
                self._leftover_pos += len(chunk)
                done += len(chunk)
            if self._leftover_pos >= len(left.traces):
                self._leftover = None
                if self._held or left.keep:  # not all on disk yet (disk full), or unreadable for now
                    self._leftovers_kept.add(left.path)
                    left.release()
                else:
                    left.remove()

    def _lose_unlogged(self, n: int) -> None:
        """Count the traces of a failed batch that have no WAL copy (``[capture] wal = false``)."""
        if n > 0:
            cause = (f"no redactor ({type(self._redactor_failure[1]).__name__}: {self._redactor_failure[1]})"
                     if self._redactor_failure is not None else "the batch failed before it was stored")
            self._lose(n, "unprocessed", f"{cause}, and these traces have no write-ahead-log copy")

    def _not_stored(self, traces: list[Trace]) -> list[Trace]:
        """``traces`` less those already in the store (the dead writer stored them before it
        died): they need no second redaction. Storing one again would be harmless (the id is the
        key), only slow."""
        has = getattr(self._target.store, "has", None)
        if has is None:
            return traces
        try:
            return [t for t in traces if not has(t.id)]
        except Exception:  # the store fails: _process spools them
            return traces

    def _report_leftover(self, left: Leftover) -> None:
        if left.problem is not None:
            self._count("errors")
            self._log_once("wal-problem", logging.ERROR, "aad capture: write-ahead log segment %s cannot be read: "
                           "%s; %s", left.path, left.problem, "kept" if left.keep else "deleted")
        if left.skipped:
            self._count("wal_skipped", left.skipped)
            self._log_once("wal-skipped", logging.WARNING, "aad capture: %d cut or damaged record(s) skipped in "
                           "write-ahead log segment %s (a process killed while writing it)", left.skipped, left.path)
        if left.traces:
            log.info("aad capture: recovering %d trace(s) from %s, left by a writer that stopped before storing them",
                     len(left.traces), left.path)

    def _process(self, batch: list[Trace], counter: str = "written") -> None:
        """Redact and write ``batch``, in parts of at most ``WRITE_WINDOW_S`` of redaction;
        ``counter``: what the stored traces are counted as."""
        window = max(WRITE_WINDOW_S, self.config.capture.linger_s)
        ready: list[Trace] = []
        started = time.monotonic()
        for trace in batch:
            clean = self._clean(trace)
            if clean is not None:
                ready.append(clean)
            if ready and time.monotonic() - started >= window:
                self._write(ready, counter)
                ready, started = [], time.monotonic()
        if ready:
            self._write(ready, counter)

    def _write(self, batch: list[Trace], counter: str = "written") -> None:
        """Write redacted, serialisable traces to the store (to the spool when it fails)."""
        if not self._target.ok and self._target.pausing():
            self._spool(batch)  # do not wait on a store that just failed, for every batch
            return
        try:
            self._target.check()
            self._target.store.add(batch)
        except Exception as err:
            self._store_failed(err)
            self._spool(batch)
            return
        self._target.ok = True
        self._count(counter, len(batch))
        self._notify(batch)
        if self._spool_pending:
            self._drain_spool(force=True)

    # -- redaction and poison traces ---------------------------------------------------------
    def _ensure_redactor(self) -> Any:
        """The redactor, built on first use; a failed build raises again, at once, for
        :data:`REDACTOR_RETRY_S` (not once per trace), then is tried again."""
        if self._redactor is None:
            failed = self._redactor_failure
            if failed is not None and time.monotonic() - failed[0] < REDACTOR_RETRY_S:
                # without the last raise's traceback: each raise would add its frames (and the
                # unredacted traces in their locals) to the one exception kept here
                raise failed[1].with_traceback(None)
            from aad_core.capture.redaction import get_redactor

            try:
                redactor = get_redactor(self.config, self.workspace)
                # A redactor that builds its engine lazily (presidio) builds it now, on this thread.
                redactor.redact([Trace.model_validate({"request": {"messages": [{"role": "user",
                                                                                  "content": "warm-up"}]}})])
            except Exception as err:
                self._redactor_failure = (time.monotonic(), err)
                raise
            self._redactor_failure = None
            self._redactor = redactor
            self._redactor_ready.set()
        return self._redactor

    def _redact_one(self, trace: Trace) -> Trace:
        if not self.redact or trace.redacted:
            return trace
        (out,) = self._ensure_redactor().redact([trace])
        if not out.redacted:
            raise ValueError("the redactor returned a trace not marked redacted")
        return out

    def _clean(self, trace: Trace) -> Trace | None:
        """``trace`` redacted and known to serialise; a poison trace repaired, or None (dropped,
        counted and logged with its id and reason). Never an unredacted trace. Without a redactor (it
        failed to build) this raises: the trace is not poison, and its batch waits in the WAL."""
        if self.redact and not trace.redacted:
            self._ensure_redactor()
        try:
            out = self._redact_one(trace)
            out.model_dump_json(exclude_none=True)
            return out
        except Exception as err:
            first = err
        try:
            from aad_core.capture.repair import repair

            fixed, notes = repair(trace)
            if not notes:
                raise first
            out = self._redact_one(fixed)
            out.model_dump_json(exclude_none=True)
        except Exception as err:
            self._count("dropped")
            self._lose(1, "poison", f"trace {trace.id} could not be redacted or serialised "
                       f"({type(first).__name__}: {str(first)[:200]}; after repair: {type(err).__name__}: "
                       f"{str(err)[:200]}); it was dropped, not written")
            return None
        self._count("repaired")
        self._log_once("repaired", logging.WARNING, "aad capture: trace %s could not be redacted or serialised as it "
                       "was (%s: %s); stored after a repair: %s", trace.id, type(first).__name__, str(first)[:200],
                       "; ".join(notes))
        return out

    def _take_back(self, trace: Trace) -> None:
        """A trace appended while :meth:`close` ran: if it is still in the inbox, it is handled as one
        submitted after close (:meth:`_late`); if the background thread took it, that thread stores it."""
        try:
            self._inbox._items.remove(trace)  # atomic under the GIL; ValueError: already taken off
        except ValueError:
            return
        self._late(trace)

    def _late(self, trace: Trace) -> None:
        """A trace submitted after close(): spooled (redacted) when the redactor is ready, else lost."""
        if self.redact and not trace.redacted and not self._redactor_ready.is_set():
            self._lose(1, "after-close", "submitted after close(), before the redactor was ready")
            return
        clean = self._clean(trace)
        if clean is not None:
            self._spool([clean])

    # -- store failures and the spool --------------------------------------------------------
    def _store_failed(self, err: Exception) -> None:
        self._target.failed()
        self._error("store", err, f"cannot write to the trace store; traces go to {self.spool_dir} until it works")

    def _spool(self, traces: Sequence[Trace]) -> None:
        """Spool redacted ``traces``; when even that fails (disk full), hold them in memory for a
        retry, up to ``queue_size`` traces; beyond that they are lost (counted, logged)."""
        if not traces:
            return
        try:
            self._spool_files.write(traces)
        except Exception as err:
            room = max(0, self.config.capture.queue_size - len(self._held))
            self._held.extend(traces[:room])
            self._error("spool", err, f"cannot write the spool either; {min(room, len(traces))} trace(s) held in "
                        f"memory for a retry ({len(self._held)} in all)")
            if len(traces) > room:
                self._lose(len(traces) - room, "disk", f"neither the store nor the spool can be written "
                           f"({type(err).__name__}: {err}) and {len(self._held)} traces are already held in memory")
            return
        self._spool_pending = True
        self._count("spooled", len(traces))

    def _retry_held(self) -> None:
        """Try the traces held in memory again (the store first, then the spool)."""
        held = list(self._held)
        self._held.clear()
        for start in range(0, len(held), self.config.capture.batch_size):
            self._write(held[start : start + self.config.capture.batch_size])

    def _drain_spool(self, force: bool = False) -> None:
        """Load spooled files back into the store (oldest first)."""
        if not force and self._target.pausing():
            return
        if not self._spool_files.exists():
            self._spool_pending = False
            return
        for claim in self._spool_files.claims():
            traces, bad = claim.read()
            try:
                self._target.check()
                # Spool files of older versions may hold unredacted traces: redact them now.
                cleaned = [c for c in (self._clean(t) for t in traces) if c is not None]
                for start in range(0, len(cleaned), self.config.capture.batch_size):
                    self._target.store.add(cleaned[start : start + self.config.capture.batch_size])
            except Exception as err:
                claim.give_back()
                self._store_failed(err)
                return
            self._target.ok = True
            if bad:
                self._count("errors")
                self._log_once("spool-bad", logging.ERROR, "aad: %d unreadable line(s) in spool file %s; kept in %s",
                               len(bad), claim.path, claim.bad_path)
                claim.keep_bad(bad)
            claim.remove()
            self._count("reloaded", len(cleaned))
            self._notify(cleaned)
        self._spool_pending = False

    # -- bookkeeping -------------------------------------------------------------------------
    def _used(self, exact: bool = True) -> int:
        """Traces submitted and not yet redacted (nor counted lost): in the inbox, or taken off it
        and not yet through the writer thread. ``exact``: under the inbox's lock (never taken by
        submit); the traces the writer finishes meanwhile may still be counted, never the
        reverse. Else (submit's check) without any lock, read in the order that can only count
        too few (traces taken off or finished while it reads are missed), never too many: a
        trace is never dropped while there is room; the bound may be overshot by one trace per
        thread submitting at that moment."""
        inbox = self._inbox
        if exact:
            done = self._done
            return max(0, inbox.pending() - done)
        taken = inbox.taken  # first: a trace taken off after this is then in neither term
        waiting = inbox.waiting()
        return max(0, waiting + taken - self._done)

    def _release(self, n: int) -> None:
        """``n`` traces left the queue (redacted, or counted lost): room for as many more. Called
        by the writer thread (or by close() once it stopped)."""
        if n <= 0:
            return
        self._done += n
        if self._blocked:  # read without the lock: a thread that starts waiting after this sees _done
            with self._room:
                self._room.notify_all()

    def _wait_for_room(self, trace: Trace, timeout: float, size: int) -> bool:
        """``full_policy = "block"``: queue ``trace`` as soon as there is room, waiting at most
        ``timeout`` seconds; False if there was none. (The slow path: it takes a lock.)"""
        if timeout <= 0:
            return False
        deadline = time.monotonic() + timeout
        with self._room:
            self._blocked += 1
            try:
                while self._used() >= size:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._room.wait(left)
                self._inbox.append(trace)  # under the lock: waiting threads never overshoot the bound
                return True
            finally:
                self._blocked -= 1

    def _overflow(self, size: int) -> None:
        """A trace lost because the queue is full: counted without a lock and logged with the
        running total, at most one line every LOSS_LOG_INTERVAL_S (a racy check of the time: two
        threads may both log; the count is always exact)."""
        self._overflowed.bump()
        now = time.monotonic()
        if now - self._overflow_logged >= LOSS_LOG_INTERVAL_S:
            self._overflow_logged = now
            level = logging.ERROR
        elif log.isEnabledFor(logging.DEBUG):
            level = logging.DEBUG
        else:
            return
        log.log(level, "aad capture: %d trace(s) lost (%s): %s; %d lost for this reason so far", 1, "queue-full",
                f"the capture queue is full ({size} traces waiting for redaction); raise [capture] queue_size "
                "for longer bursts", self._overflowed.value + self._lost_by.get("queue-full", 0))

    def _notify(self, traces: list[Trace]) -> None:
        from aad_core.plugins import get_plugin_manager

        get_plugin_manager().hooks.trace_captured(traces)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _lose(self, n: int, reason: str, cause: str) -> None:
        """Count ``n`` lost traces and log the cause with the running total (at most one line per
        reason every few seconds; the total is also in the warning of :meth:`close`)."""
        now = time.monotonic()
        with self._lock:
            self._counts["lost"] += n
            self._lost_by[reason] = self._lost_by.get(reason, 0) + n
            total = self._lost_by[reason]
            due = now - self._last_loss_log.get(reason, -LOSS_LOG_INTERVAL_S) >= LOSS_LOG_INTERVAL_S
            if due:
                self._last_loss_log[reason] = now
        log.log(logging.ERROR if due else logging.DEBUG, "aad capture: %d trace(s) lost (%s): %s; %d lost for this "
                "reason so far", n, reason, cause, total)

    def _guard(self, what: str, fn: Any) -> bool:
        try:
            fn()
        except Exception as err:
            self._error(what, err)
            return False
        return True

    def _error(self, kind: str, err: BaseException, message: str | None = None) -> None:
        self._count("errors")
        self._log_once(kind, logging.ERROR, "aad capture (%s): %s: %s: %s", kind, message or "error",
                       type(err).__name__, err)

    def _log_once(self, key: str, level: int, msg: str, *args: Any) -> None:
        with self._lock:
            first = key not in self._logged
            self._logged.add(key)
        log.log(level if first else logging.DEBUG, msg, *args)

    def _atexit(self) -> None:
        try:
            self.close(timeout=60.0)
        except Exception:  # pragma: no cover - interpreter shutdown
            pass
