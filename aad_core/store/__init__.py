"""Trace stores. The default is one SQLite file per workspace (:class:`SQLiteTraceStore`)."""

from aad_core.store.base import TraceStore

__all__ = ["TraceStore"]
