"""The trace-store contract, run on both backends: SQLite and a real PostgreSQL server (pgserver).
Filters, feedback, deletion, idempotent inserts, order, stats, schema versions, and many writer
processes at once."""

from __future__ import annotations

import json
import multiprocessing
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from aad_core.errors import AADError
from aad_core.store import open_store, store_kind
from aad_core.store.base import TraceFilter, merged_feedback, parse_where
from conftest import make_trace

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)


def _traces(n: int = 12):
    out = []
    for i in range(n):
        out.append(make_trace(
            f"question {i}", f"answer {i}", task="intent" if i % 2 else "sql",
            created_at=T0 + timedelta(hours=i), metadata={"user": "alice" if i % 3 else "bob", "n": i, "vip": i == 4},
            tags=["beta"] if i < 3 else [],
        ))
    if n > 7:
        out[5].source = "langchain"
        out[7].status = "error"
    return out


def test_add_is_idempotent_and_ordered(store) -> None:
    traces = _traces()
    assert store.add(traces[::-1]) == 12
    assert store.add(traces[:4]) == 0
    assert store.count() == 12
    assert [t.id for t in store.iter_traces()] == [t.id for t in traces]  # created_at order
    assert [t.id for t in store.iter_traces(limit=3)] == [t.id for t in traces[:3]]
    assert store.get(traces[3].id) == traces[3] and store.get("nope") is None
    assert [t.id for t in store.iter_traces(ids=[traces[2].id, "nope", traces[1].id])] == [traces[2].id, traces[1].id]


def test_feedback_items_and_metadata_values(store) -> None:
    """What the distill fingerprint (wrong-answer feedback) and the report (attributions) read in one query."""
    traces = _traces()
    traces[1].feedback = {"correct": False}
    traces[2].metadata["attribution"] = "banking77 (CC-BY-4.0)"
    traces[3].request.messages[1].content = 'a user who writes "feedback" in quotes'
    store.add(traces)
    assert store.set_feedback(traces[0].id, merged_feedback(None, 0, comment="wrong"))
    items = dict(store.feedback_items())
    assert sorted(items) == sorted([traces[0].id, traces[1].id])
    assert json.loads(items[traces[0].id])["score"] == 0.0 and json.loads(items[traces[1].id]) == {"correct": False}
    values = store.metadata_values(["attribution", "user"])
    assert {(a, str(u)) for a, u in values} == {(None, "alice"), (None, "bob"), ("banking77 (CC-BY-4.0)", "alice")}
    with pytest.raises(ValueError, match="metadata key"):
        store.metadata_values(["x') OR 1=1 --"])


def test_filters(store) -> None:
    traces = _traces()
    store.add(traces)

    def ids(**kw):
        return [t.id for t in store.iter_traces(**kw)]

    assert ids(task="intent") == [t.id for t in traces if t.task == "intent"]
    assert ids(source="langchain") == [traces[5].id]
    assert ids(status="error") == [traces[7].id]
    assert ids(since=T0 + timedelta(hours=10)) == [traces[10].id, traces[11].id]
    assert ids(since="2026-05-01T13:00:00+00:00", until="2026-05-01T15:00:00Z") == [traces[1].id, traces[2].id]
    assert ids(since="2026-05-01T15:00:00+02:00", until="2026-05-01") == []  # 13:00 UTC onwards, before midnight
    assert ids(until="2026-05-01T14:00:00+02:00") == []  # 12:00 UTC: until is exclusive
    assert ids(until="2026-05-01T14:00:01+02:00") == [traces[0].id]
    assert ids(where={"user": "bob"}) == [t.id for i, t in enumerate(traces) if i % 3 == 0]
    assert ids(where={"n": "4"}) == ids(where={"n": 4}) == ids(where={"vip": "true"}) == [traces[4].id]
    assert ids(where={"tag": "beta", "user": "alice"}) == [traces[1].id, traces[2].id]
    assert ids(where={"model": "teacher-model"}, task="sql", limit=2) == [traces[0].id, traces[2].id]
    assert ids(where={"missing": "x"}) == []
    with pytest.raises(ValueError, match="ISO 8601"):
        ids(since="yesterday")
    with pytest.raises(TypeError, match="Unknown trace filter"):
        ids(colour="red")
    assert parse_where(["a=1", "b=x=y"]) == {"a": "1", "b": "x=y"}


def test_feedback_is_stored_and_filters(store) -> None:
    traces = _traces(4)
    store.add(traces)
    fb = merged_feedback(None, 1, comment="right intent")
    assert store.set_feedback(traces[1].id, fb) is True
    assert store.set_feedback("nope", fb) is False
    fb2 = merged_feedback(store.get(traces[2].id).feedback, 0.2, name="grader")
    store.set_feedback(traces[2].id, merged_feedback(fb2, -1, comment="wrong"))
    got = store.get(traces[2].id).feedback
    assert got["score"] == -1 and got["comment"] == "wrong" and set(got["scores"]) == {"grader", "user"}
    assert store.get(traces[1].id).feedback["comment"] == "right intent"
    assert [t.id for t in store.iter_traces(min_score=0.5)] == [traces[1].id]
    assert [t.id for t in store.iter_traces(max_score=0)] == [traces[2].id]
    assert len(list(store.iter_traces(min_score=-5))) == 2  # no feedback: never matches a score bound
    with pytest.raises(ValueError, match="must be a number"):
        merged_feedback(None, "good")  # type: ignore[arg-type]


def test_delete_and_stats(store) -> None:
    traces = _traces()
    store.add(traces)
    assert store.delete([traces[0].id, traces[1].id, "nope"]) == 2
    assert store.delete([]) == 0
    assert store.count() == 10 and store.get(traces[0].id) is None
    stats = store.stats()
    assert stats["traces"] == 10 and stats["by_task"] == {"sql": 5, "intent": 5}
    assert stats["by_source"] == {"test": 9, "langchain": 1}
    assert datetime.fromisoformat(stats["first"]) == traces[2].created_at
    assert store.add([traces[0]]) == 1  # a deleted id can be recorded again


def test_store_urls(tmp_path: Path) -> None:
    assert store_kind(None) == "sqlite" and store_kind("postgresql://h/db") == "postgresql"
    assert store_kind("postgres://h/db") == "postgresql" and store_kind("sqlite:///x.db") == "sqlite"
    with pytest.raises(AADError, match="not a store URL"):
        store_kind("mysql://h/db")
    st = open_store("sqlite:///other/traces.db", default_path=tmp_path / ".aad" / "traces.db")
    st.close()
    assert (tmp_path / "other" / "traces.db").exists()  # relative to the workspace folder


def test_a_newer_postgres_schema_is_refused_and_creation_is_versioned(postgres_url: str) -> None:
    from aad_core.store.postgres import SCHEMA_VERSION, PostgresTraceStore, redacted_url, split_url

    st = PostgresTraceStore(postgres_url)
    assert st.schema_version() == SCHEMA_VERSION
    st._conn().execute(f"UPDATE {st._s}.aad_meta SET value = '99' WHERE key = 'schema_version'")
    st.close()
    with pytest.raises(AADError, match="schema version 99, written by a newer aad"):
        PostgresTraceStore(postgres_url)
    assert split_url("postgresql://u:p@h/db?sslmode=require&aad_schema=a1") == ("postgresql://u:p@h/db?sslmode=require", "a1")
    assert redacted_url("postgresql://u:secret@h/db") == "postgresql://u:***@h/db"
    with pytest.raises(AADError, match="plain SQL name"):
        split_url("postgresql://h/db?aad_schema=a;drop")


def test_an_unreachable_postgres_server_is_named_without_its_password() -> None:
    from aad_core.store.postgres import PostgresTraceStore

    with pytest.raises(AADError) as err:
        PostgresTraceStore("postgresql://aad:hunter2@127.0.0.1:1/db", timeout_s=2)
    assert "127.0.0.1" in err.value.message and "hunter2" not in err.value.message


def _writer_process(url: str, db: str, proc: int, threads: int, calls: int) -> None:
    import threading

    from aad_core.capture.writer import CaptureWriter
    from aad_core.config import AADSettings
    from aad_core.store import open_store

    store = open_store(url or None, default_path=db)
    cfg = AADSettings()
    cfg.capture.redact = False
    writer = CaptureWriter(store=store, config=cfg)

    def work(t: int) -> None:
        for i in range(calls):
            writer.submit(make_trace(f"p{proc} t{t} call {i}", "ok", id=f"{proc}-{t}-{i}"))

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    writer.close()
    store.close()
    assert writer.stats()["written"] == threads * calls, writer.stats()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_many_writer_processes_store_every_call_once(backend: str, tmp_path: Path, request) -> None:
    """4 processes x 8 threads x 125 calls (the issue's 500 per thread runs in benchmarks/store_scale.py)."""
    url = request.getfixturevalue("postgres_url") if backend == "postgresql" else ""
    db = str(tmp_path / "traces.db")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer_process, args=(url, db, p, 8, 125)) for p in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    with open_store(url or None, default_path=db) as st:
        assert st.count() == 4 * 8 * 125
        assert len(set(st.ids())) == 4000


def test_trace_filter_matches_like_the_stores() -> None:
    traces = _traces()
    flt = TraceFilter.of(task="intent", where={"user": "alice"}, since=T0 + timedelta(hours=2))
    assert [t.id for t in traces if flt.matches(t)] == [traces[i].id for i in (5, 7, 11)]
    assert TraceFilter.of().empty and json.dumps(sorted(TraceFilter.of(task="x").__dict__))
