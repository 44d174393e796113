"""The capture writer: a bounded queue, one background thread, batched inserts, and a spool.

Capture paths call :meth:`CaptureWriter.submit` from the agent's threads; it only puts the trace
on a queue and returns. The background thread redacts each batch (S2) and writes it in one
transaction. When the store cannot be written (locked, disk full, deleted), the batch goes to a
JSONL file in ``.aad/spool/``; spooled traces are loaded back into the store when it works again,
and by the next writer that starts. Nothing is dropped silently: every trace is counted as
written, spooled, or lost (only when even the spool cannot be written, with an error logged).

The spool folder is :mod:`aad_core.capture.spool`; the workspace, the store and its health are
:mod:`aad_core.capture.target`.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
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


@dataclass
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)


class _Stop:
    pass


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

        self._spool_files = Spool(spool_dir_for(ws, store))

        self._queue: queue.Queue[Trace | _Flush | _Stop] = queue.Queue(maxsize=cfg.queue_size)
        self._lock = threading.Lock()
        self._counts = {"captured": 0, "written": 0, "spooled": 0, "reloaded": 0, "errors": 0, "lost": 0,
                        "overflowed": 0}
        self._logged: set[str] = set()
        self._redactor: Any = None  # built on first use, on the background thread
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
        """Queue ``trace`` for writing. Never raises; never blocks longer than the configured
        ``block_timeout_s`` (queue-full policy "block")."""
        try:
            if not isinstance(trace, Trace):
                raise TypeError(f"CaptureWriter.submit expects an aad_core.schema.Trace. Got {type(trace).__name__} instead.")
            self._count("captured")
            if not self._closed:
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
                self._log_once("queue-full", logging.WARNING, "aad capture queue is full (%d); spooling to %s",
                               cfg.queue_size, self.spool_dir)
                self._count("overflowed")
            self._spool(self._redacted([trace]))
        except Exception as err:  # last line of defence for the agent
            self._error("submit", err)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every trace submitted so far is written or spooled, and retry loading the
        spool into the store. Returns False if ``timeout`` (seconds) ran out first."""
        if not self._thread.is_alive():
            return self._queue.empty()
        marker = _Flush()
        try:
            self._queue.put(marker, timeout=timeout)
        except queue.Full:
            return False
        return marker.done.wait(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush, stop the background thread and close the store this writer opened."""
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True
        if self._thread.is_alive():
            try:
                self._queue.put(_Stop(), timeout=timeout)
            except queue.Full:
                pass
            self._thread.join(timeout)
        if self._target.owned and self._target.store is not None:
            try:
                self._target.store.close()
            except Exception as err:
                self._error("close", err)
        atexit.unregister(self._atexit)

    def stats(self) -> dict[str, int]:
        """Counters: captured, written, spooled, reloaded (from the spool), errors, lost,
        overflowed (spooled by the caller because the queue was full), queued, spool_files
        (waiting in the spool folder)."""
        with self._lock:
            out = dict(self._counts)
        out["queued"] = self._queue.qsize()
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
        batch_size = self.config.capture.batch_size
        linger = self.config.capture.linger_s
        poll = min(self.config.capture.retry_interval_s, 1.0)
        while True:
            try:
                item = self._queue.get(timeout=poll)
            except queue.Empty:
                if self._spool_pending and not self._target.pausing():
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
                self._guard("write", lambda: self._write(batch))
            for m in markers:
                if self._spool_pending:
                    self._guard("reload", lambda: self._drain_spool(force=True))
                if isinstance(m, _Flush):
                    m.done.set()
                else:
                    return

    def _write(self, batch: list[Trace]) -> None:
        batch = self._redacted(batch)
        if self.redact and not all(t.redacted for t in batch):
            self._spool(batch)  # redaction failed: never write unredacted traces to the store
            return
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

    def _redacted(self, traces: list[Trace]) -> list[Trace]:
        """Redacted copies (S2). One trace at a time, yielding the GIL in between, so that a
        busy redactor delays the agent's own threads as little as possible."""
        if not self.redact or all(t.redacted for t in traces):
            return traces
        try:
            if self._redactor is None:
                from aad_core.capture.redaction import get_redactor

                self._redactor = get_redactor(self.config, self.workspace)
            out = []
            for t in traces:
                out.append(t if t.redacted else self._redactor.redact([t])[0])
                time.sleep(0)
            return out
        except Exception as err:
            # Kept (unredacted) in the local spool rather than lost; redaction is retried when
            # the spool is loaded back, and nothing unredacted reaches the store.
            self._error("redact", err)
            return traces

    # -- store failures and the spool --------------------------------------------------------
    def _store_failed(self, err: Exception) -> None:
        self._target.failed()
        self._error("store", err, f"cannot write to the trace store; traces go to {self.spool_dir} until it works")

    def _spool(self, traces: Sequence[Trace]) -> None:
        if not traces:
            return
        try:
            self._spool_files.write(traces)
        except Exception as err:
            self._count("lost", len(traces))
            self._error("spool", err, f"{len(traces)} trace(s) could not be spooled either and are lost")
            return
        self._spool_pending = True
        self._count("spooled", len(traces))

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
                traces = self._redacted(traces)
                if self.redact and not all(t.redacted for t in traces):
                    raise RuntimeError("redaction failed; spooled traces stay in the spool")
                for start in range(0, len(traces), self.config.capture.batch_size):
                    self._target.store.add(traces[start : start + self.config.capture.batch_size])
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
            self._count("reloaded", len(traces))
            self._notify(traces)
        self._spool_pending = False

    # -- bookkeeping -------------------------------------------------------------------------
    def _notify(self, traces: list[Trace]) -> None:
        from aad_core.plugins import get_plugin_manager

        get_plugin_manager().hooks.trace_captured(traces)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

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
            self.close(timeout=10.0)
        except Exception:  # pragma: no cover - interpreter shutdown
            pass
