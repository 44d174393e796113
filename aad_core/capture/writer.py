"""The capture writer: a bounded queue, one background thread, batched inserts, and a spool.

Capture paths call :meth:`CaptureWriter.submit` from the agent's threads; it only puts the trace
on a queue and returns (it never redacts, never touches the disk, and never waits longer than
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
* **Short window.** A batch is written at the latest ``max(linger_s, 0.1 s)`` after its first
  trace was redacted, so a process killed hard loses the traces still queued in memory, not
  those already redacted.

The spool folder is :mod:`aad_core.capture.spool`; the workspace, the store and its health are
:mod:`aad_core.capture.target`.
"""

from __future__ import annotations

import atexit
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

from aad_core.capture.spool import Spool
from aad_core.capture.target import StoreTarget, resolve_workspace, spool_dir_for
from aad_core.config import AADSettings
from aad_core.schema import Trace

if TYPE_CHECKING:
    from aad_core.store.base import TraceStore
    from aad_core.workspace import Workspace

log = logging.getLogger(__name__)

#: A redacted batch is written at the latest this long after its first trace was redacted.
WRITE_WINDOW_S = 0.1
#: Seconds between two log lines about the same kind of loss (the running total is in each).
LOSS_LOG_INTERVAL_S = 5.0


@dataclass
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)


class _Stop:
    pass


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

        self._queue: queue.Queue[Trace | _Flush | _Stop] = queue.Queue(maxsize=cfg.queue_size)
        self._lock = threading.Lock()
        self._counts = {"captured": 0, "written": 0, "spooled": 0, "reloaded": 0, "errors": 0, "lost": 0,
                        "overflowed": 0, "repaired": 0, "dropped": 0}
        self._lost_by: dict[str, int] = {}
        self._logged: set[str] = set()
        self._last_loss_log: dict[str, float] = {}
        self._redactor: Any = None  # built on the background thread as soon as it starts
        self._redactor_ready = threading.Event()
        # Redacted traces that neither the store nor the spool could take (disk full): retried.
        self._held: deque[Trace] = deque()
        self._target = StoreTarget(ws, store, write_timeout_s=cfg.write_timeout_s,
                                   retry_interval_s=cfg.retry_interval_s)
        self._spool_pending = True  # a previous run may have left spooled traces
        self._closed = False
        if self._target.owned:
            try:
                self._target.store = self._target.open()
            except Exception as err:  # e.g. locked right now: spool until it opens
                self._store_failed(err)
        self._thread = threading.Thread(target=self._run, name="aad-capture-writer", daemon=True)
        self._thread.start()
        atexit.register(self._atexit)

    # -- public API --------------------------------------------------------------------------
    def submit(self, trace: Trace) -> None:
        """Queue ``trace`` for writing. Never raises, never redacts or writes on the caller's
        thread, and never blocks longer than ``block_timeout_s`` (queue-full policy "block").
        When the queue is full the trace is counted as lost (``stats()["overflowed"]``) and a
        warning is logged: it is never written unredacted."""
        try:
            if not isinstance(trace, Trace):
                raise TypeError(f"CaptureWriter.submit expects an aad_core.schema.Trace. Got {type(trace).__name__} instead.")
            from aad_core.capture.sampling import should_record

            if not should_record(trace, self.config.capture):  # [capture] enabled (AAD_CAPTURE=0), sample_rate
                with self._lock:
                    self._counts["skipped"] = self._counts.get("skipped", 0) + 1
                return
            self._count("captured")
            if self._closed:
                self._late(trace)
                return
            try:
                self._queue.put_nowait(trace)
                return
            except queue.Full:
                pass
            cfg = self.config.capture
            if cfg.full_policy == "block" and cfg.block_timeout_s > 0:
                try:
                    self._queue.put(trace, timeout=cfg.block_timeout_s)
                    return
                except queue.Full:
                    pass
            self._count("overflowed")
            self._lose(1, "queue-full", f"the capture queue is full ({cfg.queue_size} traces waiting for redaction); "
                       "raise [capture] queue_size for longer bursts")
        except Exception as err:  # last line of defence for the agent
            self._error("submit", err)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every trace submitted so far is redacted and stored or spooled, and retry
        loading the spool into the store. Returns False (and logs what is left) when ``timeout``
        (seconds) ran out first or when traces are still held in memory because neither the
        store nor the spool could be written."""
        if not self._thread.is_alive():
            return self._queue.empty() and not self._held
        marker = _Flush()
        try:
            self._queue.put(marker, timeout=timeout)
        except queue.Full:
            self._log_once("flush-timeout", logging.WARNING, "aad capture: flush() timed out with %d trace(s) queued",
                           self._queue.qsize())
            return False
        if not marker.done.wait(timeout):
            self._log_once("flush-timeout", logging.WARNING, "aad capture: flush() timed out with %d trace(s) queued",
                           self._queue.qsize())
            return False
        return not self._held

    def close(self, timeout: float | None = None) -> bool:
        """Flush, stop the background thread and close the store this writer opened. Returns
        True when every trace submitted was stored or spooled; otherwise (and whenever traces
        were lost or are left in the spool) a warning says how many and why."""
        if self._closed:
            return not self._held and self._queue.empty()
        self.flush(timeout)
        self._closed = True
        if self._thread.is_alive():
            try:
                self._queue.put(_Stop(), timeout=timeout)
            except queue.Full:
                pass
            self._thread.join(timeout)
        queued = self._queue.qsize() if self._thread.is_alive() else 0
        if not self._thread.is_alive():
            # Whatever is still queued (the thread stopped early) cannot be redacted any more.
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Flush):
                    item.done.set()
                elif isinstance(item, Trace):
                    self._lose(1, "closed", "the writer stopped before it could redact them")
            if self._held:
                self._lose(len(self._held), "disk", "neither the store nor the spool could be written before close()")
                self._held.clear()
        if self._target.owned and self._target.store is not None:
            try:
                self._target.store.close()
            except Exception as err:
                self._error("close", err)
        atexit.unregister(self._atexit)
        s = self.stats()
        if s["lost"] or s["spool_files"] or queued:
            log.warning("aad capture closed: %d captured, %d written, %d lost %s, %d spool file(s) left in %s%s",
                        s["captured"], s["written"] + s["reloaded"], s["lost"], s["lost_by"] or "", s["spool_files"],
                        self.spool_dir, f", {queued} still queued (timeout)" if queued else "")
        return not queued and not s["held"]

    def stats(self) -> dict[str, Any]:
        """Counters: captured, written, spooled, reloaded (from the spool), errors, lost (with
        ``lost_by``: reason -> count), overflowed (lost because the queue was full), repaired
        (poison traces stored after a repair), dropped (poison traces that could not be
        repaired: lost), queued, held (redacted, in memory, waiting for a writable disk),
        spool_files (waiting in the spool folder)."""
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
            out["lost_by"] = dict(self._lost_by)
        out["queued"] = self._queue.qsize()
        out["held"] = len(self._held)
        out["spool_files"] = self._spool_files.count()
        return out

    @property
    def store(self) -> Any:
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
        if self.redact:  # warm the redaction engine up now, off the agent's threads
            self._guard("redact", self._ensure_redactor)
        batch_size = self.config.capture.batch_size
        linger = self.config.capture.linger_s
        poll = min(self.config.capture.retry_interval_s, 1.0)
        while True:
            try:
                item = self._queue.get(timeout=poll)
            except queue.Empty:
                if not self._target.pausing():
                    if self._held:
                        self._guard("write", self._retry_held)
                    if self._spool_pending:
                        self._guard("reload", self._drain_spool)
                continue
            batch: list[Trace] = []
            markers: list[_Flush | _Stop] = []
            # Fill the batch for up to `linger` seconds: fewer, larger transactions, and the
            # agent's threads are interrupted less often.
            deadline = time.monotonic() + linger
            while True:
                if isinstance(item, Trace):
                    batch.append(item)
                else:
                    markers.append(item)
                    break
                if len(batch) >= batch_size:
                    break
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
            if batch:
                self._guard("write", lambda: self._process(batch))
            for m in markers:
                if self._held:
                    self._guard("write", self._retry_held)
                if self._spool_pending:
                    self._guard("reload", lambda: self._drain_spool(force=True))
                if isinstance(m, _Flush):
                    m.done.set()
                else:
                    return

    def _process(self, batch: list[Trace]) -> None:
        """Redact and write ``batch``, in parts of at most ``WRITE_WINDOW_S`` of redaction."""
        window = max(WRITE_WINDOW_S, self.config.capture.linger_s)
        ready: list[Trace] = []
        started = time.monotonic()
        for trace in batch:
            clean = self._clean(trace)
            if clean is not None:
                ready.append(clean)
            if ready and time.monotonic() - started >= window:
                self._write(ready)
                ready, started = [], time.monotonic()
        if ready:
            self._write(ready)

    def _write(self, batch: list[Trace]) -> None:
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
        self._count("written", len(batch))
        self._notify(batch)
        if self._spool_pending:
            self._drain_spool(force=True)

    # -- redaction and poison traces ---------------------------------------------------------
    def _ensure_redactor(self) -> Any:
        if self._redactor is None:
            from aad_core.capture.redaction import get_redactor

            redactor = get_redactor(self.config, self.workspace)
            # A redactor that builds its engine lazily (presidio) builds it now, on this thread.
            redactor.redact([Trace.model_validate({"request": {"messages": [{"role": "user", "content": "warm-up"}]}})])
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
        counted and logged with its id and reason). Never an unredacted trace."""
        try:
            out = self._redact_one(trace)
            out.model_dump_json(exclude_none=True)
            pass
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

    def _guard(self, what: str, fn: Any) -> None:
        try:
            fn()
        except Exception as err:
            self._error(what, err)

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
