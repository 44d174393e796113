"""The trace API (issue 18): capture switch and sampling, ``aad traces list/export`` filters,
feedback (API, handler, CLI), deletion (store, spool, embedding cache, derived files, specialists),
and a workspace whose ``[store] url`` is a real PostgreSQL server."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aad_core.capture.sampling import sample_point, sampled
from aad_core.capture.writer import CaptureWriter
from aad_core.cli import app
from aad_core.config import load_config
from aad_core.errors import AADError, ConfigError
from aad_core.traces import delete_traces, record_feedback
from aad_core.workspace import Workspace
from conftest import make_trace

runner = CliRunner()
T0 = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)


def run(*args: str):
    return runner.invoke(app, list(args))


def _seed(ws: Workspace, n: int = 6) -> list:
    traces = [make_trace(f"where is my card number {i}, it has not arrived yet", f"card_arrival {i}",
                         task="intent" if i % 2 else "sql", created_at=T0 + timedelta(days=i),
                         metadata={"user": "alice" if i < 3 else "bob", "tenant": 7}) for i in range(n)]
    with ws.store() as store:
        store.add(traces)
    return traces


# -- capture switch and sampling -----------------------------------------------------------------

def test_sampling_is_deterministic_per_trace_id_and_nested() -> None:
    ids = [f"run-{i}" for i in range(4000)]
    kept = [i for i in ids if sampled(i, 0.25)]
    assert 900 < len(kept) < 1100
    assert kept == [i for i in ids if sampled(i, 0.25)]  # same answer every time, in every process
    assert set(i for i in ids if sampled(i, 0.1)) <= set(kept)  # a lower rate keeps a subset
    assert sampled("x", 1.0) and not sampled("x", 0.0)
    assert 0 <= sample_point("abc") < 1


def test_capture_off_and_sample_rate_in_the_writer(workspace: Workspace, monkeypatch) -> None:
    monkeypatch.setenv("AAD_CAPTURE", "0")
    cfg = load_config(workspace.config_path)
    assert cfg.capture.enabled is False
    with CaptureWriter(workspace=workspace, redact=False, config=cfg) as writer:
        writer.submit(make_trace("hello", "hi"))
    assert writer.stats()["skipped"] == 1 and writer.stats()["written"] == 0
    monkeypatch.delenv("AAD_CAPTURE")
    monkeypatch.setenv("AAD_CAPTURE__SAMPLE_RATE", "0.5")
    cfg = load_config(workspace.config_path)
    traces = [make_trace(f"q{i}", "a", id=f"id-{i}") for i in range(200)]
    with CaptureWriter(workspace=workspace, redact=False, config=cfg) as writer:
        for t in traces:
            writer.submit(t)
    with workspace.store() as store:
        assert sorted(store.ids()) == sorted(t.id for t in traces if sampled(t.id, 0.5))
    assert writer.stats()["written"] + writer.stats()["skipped"] == 200


def test_the_capture_switch_reads_common_words_and_refuses_others(monkeypatch) -> None:
    for word, on in (("off", False), ("FALSE", False), ("1", True), ("yes", True)):
        monkeypatch.setenv("AAD_CAPTURE", word)
        assert load_config(None).capture.enabled is on
    monkeypatch.setenv("AAD_CAPTURE__REDACT", "false")
    monkeypatch.setenv("AAD_CAPTURE", "0")
    cfg = load_config(None)
    assert (cfg.capture.enabled, cfg.capture.redact) == (False, False)  # the section's own variables still apply
    monkeypatch.setenv("AAD_CAPTURE", "maybe")
    with pytest.raises(ConfigError, match="AAD_CAPTURE='maybe'"):
        load_config(None)


# -- list / export filters -----------------------------------------------------------------------

def test_list_and_export_filters(workspace: Workspace, tmp_path: Path) -> None:
    traces = _seed(workspace)
    w = ["-w", str(workspace.root)]
    res = run("traces", "list", "--json", "--task", "intent", "--where", "user=bob", *w)
    assert res.exit_code == 0, res.output
    assert [t["id"] for t in json.loads(res.stdout)] == [traces[3].id, traces[5].id]
    res = run("traces", "list", "--json", "--since", "2026-05-02", "--until", "2026-05-04", "--where", "tenant=7", *w)
    assert [t["id"] for t in json.loads(res.stdout)] == [traces[1].id, traces[2].id]
    res = run("traces", "list", *w)
    assert res.exit_code == 0 and "6 trace(s)" in res.stdout and traces[0].id in res.stdout
    out = tmp_path / "out.jsonl"
    res = run("traces", "export", str(out), "--source", "test", "--where", "user=alice", *w)
    assert res.exit_code == 0, res.output
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [t.id for t in traces[:3]]
    res = run("traces", "list", "--since", "last week", *w)
    assert res.exit_code == 1 and "ISO 8601" in res.output
    res = run("traces", "list", "--where", "nokey", *w)
    assert res.exit_code == 1 and "KEY=VALUE" in res.output


# -- feedback ------------------------------------------------------------------------------------

def test_feedback_from_the_cli_the_api_and_the_langchain_handler(workspace: Workspace) -> None:
    traces = _seed(workspace, 3)
    w = ["-w", str(workspace.root)]
    res = run("traces", "feedback", traces[0].id, "1", "--comment", "right", *w)
    assert res.exit_code == 0, res.output
    record_feedback(workspace, traces[1].id, -1, comment="wrong intent", name="grader")
    res = run("traces", "list", "--json", "--min-score", "0.5", *w)
    assert [t["id"] for t in json.loads(res.stdout)] == [traces[0].id]
    with workspace.store() as store:
        fb = store.get(traces[1].id).feedback
    assert fb["score"] == -1 and fb["comment"] == "wrong intent" and fb["name"] == "grader"
    res = run("traces", "feedback", "no-such-id", "1", *w)
    assert res.exit_code == 1 and "No recorded trace has the id 'no-such-id'" in res.output

    pytest.importorskip("langchain_core")
    from uuid import uuid4

    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    from aad_langchain import AADCallbackHandler

    handler = AADCallbackHandler(workspace=workspace, redact=False)
    run_id = uuid4()
    FakeListChatModel(responses=["card_arrival"]).invoke("where is my card?", config={"callbacks": [handler],
                                                                                        "run_id": run_id})
    feedback = handler.feedback(run_id, 1, comment="thumbs up")  # right after the call: the queue is flushed first
    handler.close()
    assert feedback["score"] == 1.0
    with workspace.store() as store:
        assert store.get(str(run_id)).feedback["comment"] == "thumbs up"
    with pytest.raises(AADError, match="No recorded trace"):
        record_feedback(workspace, "nope", 1)


# -- delete --------------------------------------------------------------------------------------

def _all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_delete_leaves_no_copy_under_dot_aad(workspace: Workspace) -> None:
    from _fake_embedder import register_fake_embedder

    from aad_core.models.embedding import EmbeddingCache, _text_key, embed_texts, get_embedder

    register_fake_embedder()
    workspace.config_path.write_text(workspace.config_path.read_text().replace('embedder = "minilm"', 'embedder = "fake"'))
    workspace.__dict__.pop("config", None)
    traces = _seed(workspace)
    secret = make_trace("SECRET-7731 my card 4111 1111 1111 1111 was stolen", "SECRET-ANSWER-card_theft",
                        task="intent", metadata={"user": "carol"})
    spooled = make_trace("SPOOLED-SECRET-552 please close my account now", "SPOOLED-ANSWER-close", metadata={"user": "carol"})
    with workspace.store() as store:
        store.add([secret])
        store.set_feedback(secret.id, {"score": 1.0, "comment": "SECRET-COMMENT"})
    (workspace.spool_dir / "batch-1.jsonl").write_text(spooled.model_dump_json() + "\n" + traces[0].model_dump_json() + "\n")
    embedder = get_embedder(workspace.config)
    texts = ["SECRET-7731 my card 4111 1111 1111 1111 was stolen", "kept text"]
    embed_texts(texts, embedder, cache_dir=workspace.cache_dir)
    workspace.write_state("selection.json", {"clusters": {"0": {"selected": [secret.id, traces[1].id]}}})
    workspace.write_state("notes.json", {"example": "SECRET-7731 my card 4111 1111 1111 1111 was stolen"})
    workspace.report_path.write_text("<p>SECRET-ANSWER-card_theft</p>")

    res = run("traces", "delete", "--where", "user=carol", "--json", "-w", str(workspace.root))
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["deleted"] == 1 and report["spooled"] == 1 and report["cached_vectors"] >= 1
    assert sorted(report["removed_files"]) == [".aad/report.html", ".aad/state/notes.json"]
    assert report["files_with_ids"] == [".aad/state/selection.json"]
    data = _all_bytes(workspace.root / ".aad")
    for needle in (b"SECRET-7731", b"SECRET-ANSWER", b"SECRET-COMMENT", b"SPOOLED-SECRET", secret.id.encode(),
                   spooled.id.encode()):
        if needle == secret.id.encode():
            data = data.replace(json.dumps(secret.id).encode(), b"")  # only selection.json names it (reported)
        assert needle not in data, needle
    with workspace.store() as store:
        assert store.count() == 6
    assert traces[0].id.encode() in (workspace.spool_dir / "batch-1.jsonl").read_bytes()  # others stay spooled
    cache = EmbeddingCache(workspace.cache_dir)
    try:
        assert len(cache.get([_text_key("kept text", embedder.model_id)])) == 1
        assert cache.get([_text_key(texts[0], embedder.model_id)]) == {}
    finally:
        cache.close()


def test_delete_names_the_specialists_trained_on_the_calls(workspace: Workspace) -> None:
    from aad_core.artifacts import ClusterState
    from aad_core.schema import Cluster, Specialist
    from aad_core.specialists import SpecialistRegistry

    traces = _seed(workspace, 4)
    ClusterState(clusters=[Cluster(id=0, label="cards", size=4, variance=0.1, mean_similarity=0.9, routine=True)],
                 assignments={t.id: 0 for t in traces}, split={traces[0].id: "train", traces[1].id: "heldout",
                                                                traces[2].id: "train", traces[3].id: "train"},
                 dropped={}).save(workspace)
    registry = SpecialistRegistry(workspace)
    spec_dir = registry.root / "cards" / "1"
    spec_dir.mkdir(parents=True)
    spec = Specialist(name="cards", version=1, cluster_id=0, base_model="m", path=str(spec_dir), promoted=True)
    (spec_dir / "manifest.json").write_text(spec.model_dump_json())
    assert [s.name for s in registry.list()] == ["cards"]
    result = delete_traces(workspace, [traces[0].id, traces[1].id])
    assert result.deleted == 2
    assert [(s["name"], s["traces"]) for s in result.specialists] == [("cards", 1)]  # the held-out one: not trained on
    # ... unless the specialist was fitted on that held-out call (a classifier's calibration part)
    fitted = spec.model_copy(update={"metrics": {"heldout_trained_on": [traces[3].id]}})
    (spec_dir / "manifest.json").write_text(fitted.model_dump_json())
    ClusterState(clusters=[Cluster(id=0, label="cards", size=2, variance=0.1, mean_similarity=0.9, routine=True)],
                 assignments={t.id: 0 for t in traces[2:]}, split={traces[2].id: "train", traces[3].id: "heldout"},
                 dropped={}).save(workspace)
    assert [(s["name"], s["traces"]) for s in delete_traces(workspace, [traces[3].id]).specialists] == [("cards", 1)]
    res = run("traces", "delete", "-w", str(workspace.root))
    assert res.exit_code == 1 and "Say which traces to delete" in res.output
    res = run("traces", "delete", "--task", "sql", "--dry-run", "-w", str(workspace.root))
    assert res.exit_code == 0 and "1 trace(s) would be deleted" in res.stdout


# -- PostgreSQL as the workspace's store ---------------------------------------------------------

def test_a_workspace_on_postgresql_captures_lists_and_clusters(tmp_path: Path, postgres_url: str, monkeypatch) -> None:
    from _fake_embedder import register_fake_embedder

    from aad_core.pipeline.cluster import run_cluster

    monkeypatch.setenv("AAD_STORE__URL", postgres_url)
    ws = Workspace.init(tmp_path / "pg-ws")
    register_fake_embedder()
    ws.config_path.write_text(ws.config_path.read_text().replace('embedder = "minilm"', 'embedder = "fake"'))
    ws.__dict__.pop("config", None)
    assert type(ws.store()).__name__ == "PostgresTraceStore"
    with CaptureWriter(workspace=ws, redact=False) as writer:
        for i in range(40):
            writer.submit(make_trace(f"card question {i} where is it", f"card_arrival {i}", task="cards",
                                     system="Classify banking intents."))
            writer.submit(make_trace(f"sql question {i} list the users", "SELECT * FROM users", task="sql",
                                     system="Write SQL for the schema."))
    assert writer.stats()["written"] == 80
    assert not ws.db_path.exists() or ws.db_path.stat().st_size < 50_000  # nothing went to SQLite
    res = run("traces", "stats", "--json", "-w", str(ws.root))
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["by_task"] == {"cards": 40, "sql": 40}
    state = run_cluster(ws, k=2, show_progress=False)
    assert 40 <= len(state.assignments) <= 80  # near-duplicates are dropped
    res = run("traces", "delete", "--task", "sql", "--json", "-w", str(ws.root))
    assert res.exit_code == 0 and json.loads(res.stdout)["deleted"] == 40
