"""The trace-store protocol every backend implements."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from aad_core.schema import Trace


@runtime_checkable
class TraceStore(Protocol):
    def add(self, traces: Sequence[Trace]) -> int:
        """Insert traces; ids already stored are skipped. Returns the number newly stored."""

    def get(self, trace_id: str) -> Trace | None: ...

    def iter_traces(
        self,
        *,
        ids: Iterable[str] | None = None,
        source: str | None = None,
        task: str | None = None,
        status: str | None = None,
        limit: int | None = None,
    ) -> Iterator[Trace]: ...

    def count(self) -> int: ...

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...
