"""The trace-store protocol every backend implements, and the filters they share.

Two backends ship with aad: :class:`~aad_core.store.sqlite.SQLiteTraceStore` (the default, one file
per workspace) and :class:`~aad_core.store.postgres.PostgresTraceStore` (many processes and hosts,
``[store] url = "postgresql://..."``). :func:`aad_core.store.open_store` picks one from a URL.

Filters (:meth:`TraceStore.iter_traces`, ``aad traces list/export/delete``):

* ``source``, ``task``, ``status``: equal to the value;
* ``since`` / ``until``: ``created_at >= since`` and ``created_at < until`` (a datetime, or an ISO
  8601 text such as ``2026-05-01`` or ``2026-05-01T12:00:00+02:00``; no zone = UTC);
* ``where``: ``{key: value}`` on the trace's ``metadata`` (values compared as text: ``true``,
  ``3``, ``"a"`` -> ``a``); the keys ``model`` and ``tag`` match the trace's model and one of its
  tags;
* ``min_score`` / ``max_score``: the trace's feedback score (``Trace.feedback["score"]``) within
  bounds; a trace with no feedback never matches a score bound;
* ``session_id`` / ``user_id``: equal to ``Trace.session_id`` / ``Trace.user_id`` as stored, i.e.
  redacted (an e-mail address used as a user id is stored as a placeholder such as ``<EMAIL_ADDRESS_1>``);
* ``root_run_id``: the traces of one pipeline run (``metadata["aad_root_run_id"]``, written by the
  LangChain and LlamaIndex handlers).

The last three are tested in SQL by JSON extraction from the stored trace (no column of their own, so
no schema migration), exactly, on both backends.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any, Protocol, runtime_checkable

from aad_core.schema import ROOT_RUN_METADATA_KEY, Trace

#: The fields of :class:`TraceFilter`, as keyword arguments of ``iter_traces``.
FILTER_KEYS = ("source", "task", "status", "since", "until", "where", "min_score", "max_score", "session_id", "user_id",
               "root_run_id")
#: The filters on string fields of the stored JSON (not columns) -> the field's path in it.
JSON_FILTERS: dict[str, tuple[str, ...]] = {
    "session_id": ("session_id",), "user_id": ("user_id",), "root_run_id": ("metadata", ROOT_RUN_METADATA_KEY)}


def as_utc(value: datetime | date | str | None, *, name: str = "since") -> datetime | None:
    """``value`` as an aware UTC datetime (naive values and dates are taken as UTC)."""
    if value is None or isinstance(value, datetime):
        dt = value
    elif isinstance(value, date):
        dt = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        text = value.strip()
        try:
            dt = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
        except ValueError:
            raise ValueError(
                f"The '{name}' filter must be an ISO 8601 date or time such as 2026-05-01 or "
                f"2026-05-01T12:00:00+00:00. Got {value!r} instead."
            ) from None
    else:
        raise ValueError(f"The '{name}' filter must be a datetime, a date or an ISO 8601 text. Got {value!r} instead.")
    if dt is None:
        return None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def iso_utc(value: datetime) -> str:
    """The text form stored in the ``created_at`` columns: UTC, microseconds always written (sortable)."""
    return as_utc(value).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")  # type: ignore[union-attr]


def as_text(value: Any) -> str:
    """How a metadata value compares with a ``key=value`` filter: strings as they are, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def parse_where(items: Iterable[str]) -> dict[str, str]:
    """``["user=alice", "env=prod"]`` -> ``{"user": "alice", "env": "prod"}`` (``--where`` options)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"A --where filter is written KEY=VALUE (a metadata key). Got {item!r} instead.")
        out[key.strip()] = value
    return out


def check_metadata_key(key: str) -> str:
    """``key`` when it is a plain metadata key (letters, digits, ``_``, ``-``), usable inside a JSON path."""
    import re

    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", key):
        raise ValueError(f"A metadata key of letters, digits, '_' or '-' is needed here. Got {key!r} instead.")
    return key


def _json_field(trace: Trace, path: tuple[str, ...]) -> Any:
    value: Any = getattr(trace, path[0], None)
    for key in path[1:]:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _id_filter(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"The '{name}' filter must be a non-empty string (the id as stored). Got {value!r} instead.")
    return value.strip()


def feedback_score(trace: Trace) -> float | None:
    fb = trace.feedback or {}
    score = fb.get("score")
    return float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else None


@dataclass(frozen=True)
class TraceFilter:
    """A conjunction of the filters above; every field None/empty = all traces."""

    source: str | None = None
    task: str | None = None
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    where: Mapping[str, Any] = field(default_factory=dict)
    min_score: float | None = None
    max_score: float | None = None
    session_id: str | None = None
    user_id: str | None = None
    root_run_id: str | None = None

    @classmethod
    def of(cls, **kwargs: Any) -> TraceFilter:
        unknown = set(kwargs) - set(FILTER_KEYS)
        if unknown:
            raise TypeError(f"Unknown trace filter(s) {sorted(unknown)}; the filters are {', '.join(FILTER_KEYS)}.")
        return cls(
            source=kwargs.get("source"), task=kwargs.get("task"), status=kwargs.get("status"),
            since=as_utc(kwargs.get("since"), name="since"), until=as_utc(kwargs.get("until"), name="until"),
            where=dict(kwargs.get("where") or {}),
            min_score=kwargs.get("min_score"), max_score=kwargs.get("max_score"),
            session_id=_id_filter(kwargs.get("session_id"), "session_id"),
            user_id=_id_filter(kwargs.get("user_id"), "user_id"),
            root_run_id=_id_filter(kwargs.get("root_run_id"), "root_run_id"),
        )

    @property
    def empty(self) -> bool:
        return self == TraceFilter()

    def columns(self) -> list[tuple[str, Any]]:
        """The equality conditions every backend evaluates in SQL: ``(column, value)``. Backends narrow
        the time range in SQL too (:meth:`text_window` for text columns) and leave the exact test to
        :meth:`matches_rest`."""
        return [(col, getattr(self, col)) for col in ("source", "task", "status") if getattr(self, col) is not None]

    def json_fields(self) -> list[tuple[tuple[str, ...], str]]:
        """The equality conditions on string fields of the stored JSON (:data:`JSON_FILTERS`): ``(path,
        value)``. Backends evaluate them exactly in SQL, so they do not make :attr:`needs_trace` true."""
        return [(path, getattr(self, key)) for key, path in JSON_FILTERS.items() if getattr(self, key) is not None]

    def text_window(self) -> tuple[str | None, str | None]:
        """A ``created_at`` text range (ISO 8601 as stored) that holds every match: a day wider on each
        side than the filter, since a stored time may carry any UTC offset and may omit microseconds."""
        from datetime import timedelta

        day = timedelta(days=1)
        return (iso_utc(self.since - day) if self.since is not None else None,
                iso_utc(self.until + day) if self.until is not None else None)

    @property
    def needs_trace(self) -> bool:
        """Whether conditions remain that are checked on the decoded trace (time, metadata, feedback)."""
        return (bool(self.where) or self.min_score is not None or self.max_score is not None
                or self.since is not None or self.until is not None)

    def matches_rest(self, trace: Trace) -> bool:
        """The conditions not in :meth:`columns`: session and user ids, time range, metadata, model, tag and
        feedback score."""
        if any(_json_field(trace, path) != value for path, value in self.json_fields()):
            return False
        created = as_utc(trace.created_at)
        if self.since is not None and created < self.since:  # type: ignore[operator]
            return False
        if self.until is not None and created >= self.until:  # type: ignore[operator]
            return False
        for key, want in self.where.items():
            want_text = as_text(want)
            if key == "model":
                if trace.model != want_text:
                    return False
            elif key == "tag":
                if want_text not in trace.tags:
                    return False
            elif key not in trace.metadata or as_text(trace.metadata[key]) != want_text:
                return False
        if self.min_score is not None or self.max_score is not None:
            score = feedback_score(trace)
            if score is None:
                return False
            if self.min_score is not None and score < self.min_score:
                return False
            if self.max_score is not None and score > self.max_score:
                return False
        return True

    def matches(self, trace: Trace) -> bool:
        """The whole filter on one trace (spool files, tests)."""
        if any(getattr(trace, col) != value for col, value in self.columns()):
            return False
        return self.matches_rest(trace)


def merged_feedback(previous: Mapping[str, Any] | None, score: float, *, comment: str | None = None,
                    name: str = "user", by: str | None = None, at: datetime | None = None) -> dict[str, Any]:
    """``Trace.feedback`` after one more score: the latest one on top (``score``, ``comment``, ``name``,
    ``by``, ``at``) and every named score kept under ``scores[name]`` (the last one of each name)."""
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise ValueError(f"The 'score' parameter must be a number (e.g. 1, 0, -1 or 0.8). Got {score!r} instead.")
    stamp = (at or datetime.now(timezone.utc)).isoformat()
    entry = {"score": float(score), "comment": comment, "by": by, "at": stamp}
    scores = dict((previous or {}).get("scores") or {})
    scores[name] = {k: v for k, v in entry.items() if v is not None}
    return {**{k: v for k, v in entry.items() if v is not None}, "name": name, "scores": scores}


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
        **filters: Any,
    ) -> Iterator[Trace]:
        """Traces in ``created_at`` order, filtered (``since``, ``until``, ``where``, ``min_score``,
        ``max_score``: see the module's docstring)."""

    def count(self) -> int: ...

    def stats(self) -> dict[str, Any]: ...

    def set_feedback(self, trace_id: str, feedback: dict[str, Any] | None) -> bool:
        """Replace the trace's ``feedback``; False when no trace has that id."""

    def delete(self, ids: Iterable[str]) -> int:
        """Remove the traces (their data overwritten, not only unlinked); returns how many were stored."""

    def close(self) -> None: ...
