"""Where a capture writer's traces go: the workspace named by its arguments, its spool and
write-ahead log folders, and the trace store with its health (opened lazily, a deleted database file noticed, a pause
after each failure before the store is tried again)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aad_core.store.base import TraceStore
    from aad_core.workspace import Workspace


class StoreGone(RuntimeError):
    pass


def resolve_workspace(workspace: Workspace | str | Path | None, store: TraceStore | None) -> Workspace | None:
    """The writer's workspace: the one given, the folder given (created with ``aad.toml`` and
    ``.aad/`` when missing), or, without a store, the one found from ``$AAD_WORKSPACE`` or the
    current folder."""
    from aad_core.workspace import Workspace

    if workspace is not None and not isinstance(workspace, (Workspace, str, Path)):
        raise ValueError(
            "The 'workspace' parameter of CaptureWriter must be a Workspace, a folder path or None. "
            f"Got {workspace!r} instead."
        )
    if isinstance(workspace, (str, Path)) or (workspace is None and store is None):
        # One rule for workspace=, --workspace and $AAD_WORKSPACE (Workspace.find): recording creates a named folder.
        return Workspace.find(workspace, create=True)
    return workspace


def spool_dir_for(workspace: Workspace | None, store: TraceStore | None) -> Path:
    """The workspace's spool; without one, a ``spool`` folder beside the store's file, else ``./.aad/spool``."""
    if workspace is not None:
        return workspace.spool_dir
    if getattr(store, "path", None) is not None:
        return Path(store.path).parent / "spool"  # type: ignore[union-attr]
    return Path.cwd() / ".aad" / "spool"


def wal_dir_for(workspace: Workspace | None, store: TraceStore | None) -> Path:
    """The write-ahead log's folder: ``wal`` beside the spool folder (``.aad/wal``)."""
    return spool_dir_for(workspace, store).parent / "wal"


class StoreTarget:
    """The trace store a writer writes to. ``store`` None: the workspace's SQLite store, opened
    (and reopened) by this object, which then also owns it."""

    def __init__(self, workspace: Workspace | None, store: TraceStore | None, *, write_timeout_s: float,
                 retry_interval_s: float) -> None:
        self.workspace = workspace
        self.store: Any = store
        self.owned = store is None
        self.ok = True
        self.next_retry = 0.0
        self._write_timeout_s = write_timeout_s
        self._retry_interval_s = retry_interval_s
        self._opening = threading.Lock()

    def open(self) -> Any:
        assert self.workspace is not None
        return self.workspace.store(timeout_s=self._write_timeout_s)  # [store] url: SQLite or PostgreSQL

    def ensure(self) -> Any:
        """The store, opened now if it is not yet (once, whichever thread asks first)."""
        with self._opening:
            if self.store is None:
                self.store = self.open()
        return self.store

    def check(self) -> None:
        """Open the store if it is not open; raise :class:`StoreGone` when its file was deleted."""
        if self.store is None:
            self.ensure()
            return
        path = getattr(self.store, "path", None)
        if path is None or Path(path).exists():
            return
        # The database file was deleted under us: an open SQLite connection would keep writing to
        # the unlinked file. Spool first; on the retry a writer that owns its store recreates it.
        if self.owned and self.workspace is not None and not self.ok:
            self.store.close()
            self.store = self.open()
            return
        raise StoreGone(f"the trace store {path} was deleted")

    def failed(self) -> None:
        """Record a failure: the store is not tried again for ``retry_interval_s``."""
        self.ok = False
        self.next_retry = time.monotonic() + self._retry_interval_s

    def pausing(self) -> bool:
        """Whether the pause after the last failure is still running."""
        return time.monotonic() < self.next_retry
