"""Trace stores. The default is one SQLite file per workspace (:class:`SQLiteTraceStore`); a
``postgresql://`` URL in ``[store] url`` selects :class:`~aad_core.store.postgres.PostgresTraceStore`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aad_core.errors import ConfigError
from aad_core.store.base import TraceFilter, TraceStore

__all__ = ["TraceStore", "TraceFilter", "open_store", "store_kind"]


def store_kind(url: str | None) -> str:
    """``"sqlite"`` or ``"postgresql"`` for a ``[store] url`` (None = the workspace's SQLite file)."""
    from aad_core.store.postgres import is_postgres_url

    if url is None or not str(url).strip():
        return "sqlite"
    if is_postgres_url(url):
        return "postgresql"
    if str(url).startswith("sqlite:///"):
        return "sqlite"
    raise ConfigError(
        f"[store] url = {url!r}: not a store URL aad knows.",
        hint="Use 'postgresql://user:password@host:5432/db', 'sqlite:///path/to/traces.db', or leave it unset "
        "for the workspace's own .aad/traces.db.",
    )


def open_store(url: str | None, *, default_path: Path | str, timeout_s: float = 60.0) -> Any:
    """The trace store of ``url`` (``[store] url``); None: SQLite at ``default_path``."""
    kind = store_kind(url)
    if kind == "postgresql":
        from aad_core.store.postgres import PostgresTraceStore

        return PostgresTraceStore(str(url), timeout_s=timeout_s)
    from aad_core.store.sqlite import SQLiteTraceStore

    path = Path(str(url)[len("sqlite:///"):]) if url and str(url).strip() else Path(default_path)
    if url and not path.is_absolute():
        path = Path(default_path).parent.parent / path  # relative to the workspace folder
    return SQLiteTraceStore(path, timeout_s=timeout_s)
