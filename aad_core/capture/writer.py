"""The capture writer: a bounded queue, one background thread, batched inserts, and a spool.

Capture paths call :meth:`CaptureWriter.submit` from the agent's threads; it only puts the trace
on a queue and returns. The background thread redacts each batch (S2) and writes it in one
transaction. When the store cannot be written (locked, disk full, deleted), the batch goes to a
JSONL file in ``.aad/spool/``; spooled traces are loaded back into the store when it works again,
and by the next writer that starts. Nothing is dropped silently: every trace is counted as
written, spooled, or lost (only when even the spool cannot be written, with an error logged).
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aad_core.config import AADSettings
from aad_core.schema import Trace

if TYPE_CHECKING:
    from aad_core.store.base import TraceStore
    from aad_core.workspace import Workspace

log = logging.getLogger(__name__)

_SPOOL_SUFFIX = ".jsonl"
_CLAIM_SUFFIX = ".loading"


@dataclass
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)


class _Stop:
    pass


class _StoreGone(RuntimeError):
    pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


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
        from aad_core.workspace import Workspace

        if workspace is not None and not isinstance(workspace, (Workspace, str, Path)):
            raise ValueError(
                "The 'workspace' parameter of CaptureWriter must be a Workspace, a folder path or None. "
                f"Got {workspace!r} instead."
            )
        ws: Workspace | None
        if isinstance(workspace, (str, Path)):
            from aad_core.config import CONFIG_FILE

            root = Path(workspace)
            ws = Workspace(root) if (root / CONFIG_FILE).exists() else Workspace.init(root)
        elif workspace is None and store is None:
            ws = Workspace.find()
        else:
            ws = workspace
        self.workspace = ws
        self.config = config or (ws.config if ws is not None else AADSettings())
        cfg = self.config.capture
        self.redact = cfg.redact if redact is None else bool(redact)
        if self.redact:  # an unknown redactor name is a configuration error: say so now, not later
            from aad_core.plugins import get_registry

            get_registry().get("redactor", cfg.redactor)

        if ws is not None:
            self.spool_dir = ws.spool_dir
        elif getattr(store, "path", None) is not None:
            self.spool_dir = Path(store.path).parent / "spool"  # type: ignore[union-attr]
        else:
            self.spool_dir = Path.cwd() / ".aad" / "spool"

        self._queue: queue.Queue[Trace | _Flush | _Stop] = queue.Queue(maxsize=cfg.queue_size)
        self._lock = threading.Lock()
        self._counts = {"captured": 0, "written": 0, "spooled": 0, "reloaded": 0, "errors": 0, "lost": 0,
                        "overflowed": 0}
        self._logged: set[str] = set()
        self._redactor: Any = None  # built on first use, on the background thread
        self._store_ok = True
        self._next_retry = 0.0
        self._spool_pending = True  # a previous run may have left spooled traces
        self._closed = False
        self._owns_store = store is None
        self._store: Any = store
        if store is None:
            try:
                self._store = self._open_store()
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
        if self._owns_store and self._store is not None:
            try:
                self._store.close()
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
        try:
            out["spool_files"] = sum(1 for _ in self.spool_dir.glob("*" + _SPOOL_SUFFIX))
        except OSError:
            out["spool_files"] = 0
        return out

    @property
    def store(self) -> Any:
        return self._store

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
                if self._spool_pending and time.monotonic() >= self._next_retry:
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
        if not self._store_ok and time.monotonic() < self._next_retry:
            self._spool(batch)  # do not wait on a store that just failed, for every batch
            return
        try:
            self._check_store()
            self._store.add(batch)
        except Exception as err:
            self._store_failed(err)
            self._spool(batch)
            return
        self._store_ok = True
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

                self._redactor = get_redactor(self.config)
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

    # -- store health ------------------------------------------------------------------------
    def _open_store(self) -> Any:
        from aad_core.store.sqlite import SQLiteTraceStore

        assert self.workspace is not None
        return SQLiteTraceStore(self.workspace.db_path, timeout_s=self.config.capture.write_timeout_s)

    def _check_store(self) -> None:
        if self._store is None:
            self._store = self._open_store()
            return
        path = getattr(self._store, "path", None)
        if path is None or Path(path).exists():
            return
        # The database file was deleted under us: an open SQLite connection would keep writing to
        # the unlinked file. Spool first; on the retry a writer that owns its store recreates it.
        if self._owns_store and self.workspace is not None and not self._store_ok:
            self._store.close()
            self._store = self._open_store()
            return
        raise _StoreGone(f"the trace store {path} was deleted")

    def _store_failed(self, err: Exception) -> None:
        self._store_ok = False
        self._next_retry = time.monotonic() + self.config.capture.retry_interval_s
        self._error("store", err, f"cannot write to the trace store; traces go to {self.spool_dir} until it works")

    # -- spool -------------------------------------------------------------------------------
    def _spool(self, traces: Sequence[Trace]) -> None:
        if not traces:
            return
        name = f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            part = self.spool_dir / (name + ".part")
            with part.open("w", encoding="utf-8") as fh:
                for t in traces:
                    fh.write(t.model_dump_json(exclude_none=True) + "\n")
            part.replace(self.spool_dir / (name + _SPOOL_SUFFIX))  # complete files only
        except Exception as err:
            self._count("lost", len(traces))
            self._error("spool", err, f"{len(traces)} trace(s) could not be spooled either and are lost")
            return
        self._spool_pending = True
        self._count("spooled", len(traces))

    def _drain_spool(self, force: bool = False) -> None:
        """Load spooled files back into the store (oldest first). Each file is claimed by an
        atomic rename, so concurrent writers never load the same file twice."""
        if not force and time.monotonic() < self._next_retry:
            return
        if not self.spool_dir.is_dir():
            self._spool_pending = False
            return
        self._release_stale_claims()
        for path in sorted(self.spool_dir.glob("*" + _SPOOL_SUFFIX)):
            claim = path.with_name(f"{path.name}.{os.getpid()}{_CLAIM_SUFFIX}")
            try:
                path.replace(claim)
            except FileNotFoundError:
                continue  # another writer took it
            traces, bad = self._read_spool(claim)
            try:
                self._check_store()
                traces = self._redacted(traces)
                if self.redact and not all(t.redacted for t in traces):
                    raise RuntimeError("redaction failed; spooled traces stay in the spool")
                for start in range(0, len(traces), self.config.capture.batch_size):
                    self._store.add(traces[start : start + self.config.capture.batch_size])
            except Exception as err:
                claim.replace(path)
                self._store_failed(err)
                return
            self._store_ok = True
            if bad:
                self._count("errors")
                self._log_once("spool-bad", logging.ERROR, "aad: %d unreadable line(s) in spool file %s; kept in %s",
                               len(bad), path, path.with_suffix(".bad"))
                path.with_suffix(".bad").write_text("".join(bad), encoding="utf-8")
            claim.unlink()
            self._count("reloaded", len(traces))
            self._notify(traces)
        self._spool_pending = False

    def _read_spool(self, path: Path) -> tuple[list[Trace], list[str]]:
        traces: list[Trace] = []
        bad: list[str] = []
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    traces.append(Trace.model_validate_json(line))
                except ValueError:
                    bad.append(line if line.endswith("\n") else line + "\n")
        return traces, bad

    def _release_stale_claims(self) -> None:
        """Give back files claimed by a process that died while loading them."""
        for claim in self.spool_dir.glob("*" + _CLAIM_SUFFIX):
            pid_text = claim.name[: -len(_CLAIM_SUFFIX)].rsplit(".", 1)[-1]
            if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
                try:
                    claim.replace(claim.with_name(claim.name[: -len(_CLAIM_SUFFIX)].rsplit(".", 1)[0]))
                except OSError:
                    pass

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
