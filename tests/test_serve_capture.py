"""``aad serve`` as a capture point the student can trust (issue 15): a routing fault never breaks the teacher
path (the teacher answers and its answer is recorded), OpenAI's ``user`` parameter becomes ``Trace.user_id``
(a keyed pseudonym when it is an e-mail address), and the teacher defaults to the ``[teacher]`` section.

No model is loaded (the keyword router and scripted specialists of ``test_router``); the teacher is the
chat-completions stub of ``_chat_stub`` on 127.0.0.1."""

from __future__ import annotations

import logging
import re
import sqlite3
from typing import Any

import pytest

pytest.importorskip("fastapi")
from _chat_stub import chat_stub, completion  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from test_router import Scripted, engine_for, make_router  # noqa: E402
from test_server import TEACHER_COMPLETION, body  # noqa: E402

from aad_core.plugins import Router  # noqa: E402
from aad_core.schema import ChatRequest, Message  # noqa: E402
from aad_core.serving.engine import RoutingEngine  # noqa: E402
from aad_core.serving.server import UpstreamTeacher, configured_teacher, create_app  # noqa: E402
from aad_core.workspace import Workspace  # noqa: E402

SECRET = "/srv/secret/.aad/state/router.json"
EMAIL = "jane.roe@example.com"


class BrokenRouter(Router):
    """A router whose artifact is broken: every decision raises."""

    def __init__(self) -> None:
        self.calls = 0

    def route(self, requests: Any) -> Any:
        self.calls += 1
        raise ValueError(f"corrupt centroids in {SECRET}")


def teacher_replies(seen: list) -> Any:
    def reply(request_body: dict, _handler: Any) -> dict:
        seen.append(request_body)
        return completion("teacher says hi", "big-teacher")

    return reply


def stored(ws: Workspace) -> list:
    with ws.store() as store:
        return list(store.iter_traces())


# -- a routing fault ------------------------------------------------------------------------------------
def test_a_routing_fault_is_answered_by_the_teacher_recorded_and_logged_once(
        workspace: Workspace, caplog: pytest.LogCaptureFixture) -> None:
    engine = engine_for(workspace, Scripted())
    engine._router = engine._given_router = BrokenRouter()
    seen: list = []
    caplog.set_level(logging.DEBUG, logger="aad_core.serving.engine")
    with chat_stub(teacher_replies(seen)) as url:
        app = create_app(workspace, teacher=UpstreamTeacher(url, api_key="sk-t"), engine=engine)
        with TestClient(app) as c:
            answers = [c.post("/v1/chat/completions", json=body(text, user="u-7"))
                       for text in ("plan my trip", "my card has not arrived", "book a table")]
            routed = c.post("/v1/aad/route", json=body("my card has not arrived"))
    for r in answers:
        assert r.status_code == 200, r.text
        route = r.json()["aad_route"]
        assert r.json()["choices"][0]["message"]["content"] == "teacher says hi"
        assert route["target"] == "teacher" and route["reason"] == "routing fault (ValueError): sent to the teacher"
        assert SECRET not in r.text  # the cause stays in the server log
    assert routed.status_code == 200 and routed.json()["target"] == "teacher"
    assert len(seen) == 3 and all(b["messages"][0]["content"] for b in seen)
    traces = [t for t in stored(workspace) if t.source == "serve"]
    assert len(traces) == 3 and all(t.response.content == "teacher says hi" for t in traces)
    assert all(t.metadata["aad_route"]["reason"].startswith("routing fault (ValueError)") for t in traces)
    assert {t.user_id for t in traces} == {"u-7"}
    errors = [r for r in caplog.records if r.name == "aad_core.serving.engine" and r.levelno >= logging.WARNING]
    assert len(errors) == 1 and SECRET in errors[0].getMessage() and errors[0].exc_info  # once, with the cause
    assert sum(SECRET in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG) == 3


def test_a_routing_fault_without_a_teacher_is_still_503_no_teacher(workspace: Workspace) -> None:
    engine = engine_for(workspace, Scripted())
    engine._router = engine._given_router = BrokenRouter()
    with TestClient(create_app(workspace, teacher=None, engine=engine, capture=False)) as c:
        r = c.post("/v1/chat/completions", json=body("plan my trip"))
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_teacher"


def test_a_broken_specialist_backend_and_engines_that_raise_reach_the_teacher(workspace: Workspace) -> None:
    class Unloadable:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("the adapter files are missing")

    engine = engine_for(workspace, Scripted())
    engine._specialists = engine._given_specialists = Unloadable()  # fails before the specialist's guarded call
    answer = engine.answer(ChatRequest(messages=[Message(role="user", content="my card has not arrived")]),
                           teacher_call=lambda _r: TEACHER_COMPLETION)
    assert answer.message.content == "teacher says hi" and "RuntimeError" in answer.decision.reason

    class RaisingEngine(RoutingEngine):  # an engine subclass whose route_call does not guard itself
        def route_call(self, request: ChatRequest, **kw: Any) -> Any:
            raise KeyError("plugin bug")

    raising = RaisingEngine(workspace, router=make_router(workspace), specialists=Scripted(), record=False)
    with TestClient(create_app(workspace, teacher=lambda b, a: TEACHER_COMPLETION, engine=raising,
                               capture=False)) as c:
        r = c.post("/v1/chat/completions", json=body("plan my trip"))
    assert r.status_code == 200 and r.json()["aad_route"]["reason"].startswith("routing fault (KeyError)")
    raising.close()


def test_the_routed_chat_model_survives_a_routing_fault(workspace: Workspace) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    from aad_langchain import RoutedChatModel

    engine = engine_for(workspace, Scripted())
    engine._router = engine._given_router = BrokenRouter()
    llm = RoutedChatModel(teacher=FakeListChatModel(responses=["teacher says hi"]), routing_engine=engine)
    msg = llm.invoke("my card has not arrived")
    assert msg.content == "teacher says hi"
    assert msg.response_metadata["aad_route"]["reason"].startswith("routing fault (ValueError)")


# -- OpenAI's user parameter ----------------------------------------------------------------------------
def test_the_openai_user_and_metadata_ids_reach_the_stored_traces(workspace: Workspace) -> None:
    seen: list = []
    with chat_stub(teacher_replies(seen)) as url:
        app = create_app(workspace, teacher=UpstreamTeacher(url, api_key="sk-t"),
                         engine=engine_for(workspace, Scripted("{broken json")))
        with TestClient(app) as c:
            assert c.post("/v1/chat/completions", json=body("plan my trip", user="u-42")).status_code == 200
            assert c.post("/v1/chat/completions", json=body("book a table", user="u-42", metadata={
                "session_id": "s-9"})).status_code == 200
            assert c.post("/v1/chat/completions", json=body("plan a walk", user="ignored", metadata={
                "user_id": "u-7", "thread_id": "t-1"})).status_code == 200
            escalated = c.post("/v1/chat/completions", json=body("my card has not arrived", user="u-42"))
            assert escalated.json()["aad_route"]["escalated"]
            assert c.post("/v1/chat/completions", json=body("plan nothing")).status_code == 200
    assert seen[0]["user"] == "u-42"  # the parameter still reaches the teacher
    ids = {t.request.last_user_message(): (t.source, t.session_id, t.user_id) for t in stored(workspace)}
    assert ids == {"plan my trip": ("serve", None, "u-42"), "book a table": ("serve", "s-9", "u-42"),
                   "plan a walk": ("serve", "t-1", "u-7"), "my card has not arrived": ("router", None, "u-42"),
                   "plan nothing": ("serve", None, None)}


def test_an_email_user_is_stored_as_a_keyed_pseudonym_per_user(workspace: Workspace,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end with redaction on (the default): an e-mail ``user`` is a pseudonym, one per user, and the
    raw address is nowhere under .aad/."""
    pytest.importorskip("presidio_analyzer")
    monkeypatch.setenv("AAD_REDACTOR__PRESIDIO__SPACY_MODEL", "null")  # pattern recognisers only: fast
    ws = Workspace(workspace.root)
    assert ws.config.capture.redact
    engine = RoutingEngine(ws, router=make_router(ws), specialists=Scripted())
    other = "bob.stone@example.org"
    with chat_stub(teacher_replies([])) as url:
        with TestClient(create_app(ws, teacher=UpstreamTeacher(url, api_key="sk-t"), engine=engine)) as c:
            for text, user in (("plan my trip", EMAIL), ("book a table", other), ("plan a walk", EMAIL)):
                assert c.post("/v1/chat/completions", json=body(text, user=user)).status_code == 200
    engine.close()
    users = {t.request.last_user_message(): t.user_id for t in stored(ws)}
    assert all(re.fullmatch(r"<EMAIL_ADDRESS>-[0-9a-f]{12}", u) for u in users.values()), users
    assert users["plan my trip"] == users["plan a walk"] != users["book a table"]
    conn = sqlite3.connect(ws.db_path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    on_disk = b"".join(p.read_bytes() for p in ws.data_dir.rglob("*") if p.is_file())
    assert EMAIL.encode() not in on_disk and other.encode() not in on_disk


# -- the [teacher] section --------------------------------------------------------------------------------
def test_serve_takes_its_teacher_from_the_teacher_section_and_options_win(
        workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from aad_core.cli import app
    from aad_core.serving import server

    assert configured_teacher(workspace.config.teacher) is None  # a fresh workspace names no teacher
    text = workspace.config_path.read_text(encoding="utf-8")
    assert text.count("[teacher]\n") == 1
    workspace.config_path.write_text(text.replace("[teacher]\n", '[teacher]\nbase_url = "http://127.0.0.1:9/v1"\n'
                                                  'model = "gpt-4o"\napi_key_env = "MY_TEACHER_KEY"\n'), encoding="utf-8")
    ws = Workspace(workspace.root)
    assert ws.config.teacher.base_url == "http://127.0.0.1:9/v1"
    monkeypatch.setenv("MY_TEACHER_KEY", "sk-from-env")
    monkeypatch.setenv("AAD_TEACHER_API_KEY", "sk-aad")
    t = configured_teacher(ws.config.teacher)
    assert (t.base_url, t.model, t.api_key) == ("http://127.0.0.1:9/v1", "gpt-4o", "sk-from-env")
    assert t.timeout_s == ws.config.teacher.timeout_s
    t = configured_teacher(ws.config.teacher, model="gpt-4o-mini", timeout_s=5)  # options win
    assert (t.base_url, t.model, t.api_key, t.timeout_s) == ("http://127.0.0.1:9/v1", "gpt-4o-mini", "sk-from-env", 5)
    t = configured_teacher(ws.config.teacher, url="http://other:1/v1")  # another endpoint: the section is not used
    assert (t.base_url, t.model, t.api_key, t.timeout_s) == ("http://other:1/v1", None, "sk-aad", 120.0)

    served: dict[str, Any] = {}
    monkeypatch.setattr(server, "serve", lambda ws, **kw: served.update(kw))
    result = CliRunner().invoke(app, ["serve", "-w", str(ws.root), "--no-preload", "--teacher-timeout", "7"])
    assert result.exit_code == 0, result.output
    teacher = served["teacher"]
    assert (teacher.base_url, teacher.model, teacher.api_key, teacher.timeout_s) == (
        "http://127.0.0.1:9/v1", "gpt-4o", "sk-from-env", 7)
    assert "Teacher from aad.toml [teacher]: gpt-4o" in result.output and "503" not in result.output
    result = CliRunner().invoke(app, ["serve", "-w", str(ws.root), "--teacher-url", "http://x:2/v1"])
    assert result.exit_code == 0 and served["teacher"].base_url == "http://x:2/v1"
    monkeypatch.delenv("MY_TEACHER_KEY")
    result = CliRunner().invoke(app, ["serve", "-w", str(ws.root), "--api-key", "k"])
    assert served["teacher"].api_key == "" and "$MY_TEACHER_KEY is not" in result.output
    assert "[teacher]" in CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output


def test_an_upstream_teacher_keeps_the_client_model_when_the_section_names_none(workspace: Workspace) -> None:
    t = configured_teacher(type(workspace.config.teacher)(base_url="http://127.0.0.1:9/v1"))
    assert t is not None and t.model is None
    payload, _ = t._prepare({"model": "client-model", "messages": []}, None)
    assert payload["model"] == "client-model" and t.timeout_s == 120.0
