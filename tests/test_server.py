"""``aad serve``: the OpenAI-compatible endpoint, through FastAPI's TestClient (no socket)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from test_router import Scripted, engine_for, escalations  # noqa: E402

from aad_core.serving.server import UpstreamTeacher, create_app  # noqa: E402
from aad_core.workspace import Workspace  # noqa: E402

TEACHER_COMPLETION = {
    "id": "chatcmpl-upstream", "object": "chat.completion", "created": 1, "model": "big-teacher",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "teacher says hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
}


def body(text: str, **extra) -> dict:  # noqa: ANN003
    return {"model": "aad-routed", "messages": [{"role": "user", "content": text}], **extra}


def upstream(seen: list) -> UpstreamTeacher:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("authorization"), json.loads(request.content)))
        return httpx.Response(200, json=TEACHER_COMPLETION)

    return UpstreamTeacher("http://teacher.test/v1", model="big-teacher", api_key="sk-test",
                           transport=httpx.MockTransport(handler))


def client(ws: Workspace, backend: Scripted, seen: list | None = None, teacher: bool = True) -> TestClient:
    app = create_app(ws, teacher=upstream(seen if seen is not None else []) if teacher else None,
                     engine=engine_for(ws, backend))
    return TestClient(app)


def test_specialist_answer_is_an_openai_completion_with_the_decision(workspace: Workspace) -> None:
    seen: list = []
    with client(workspace, Scripted('{"intent": "card_arrival"}'), seen) as c:
        r = c.post("/v1/chat/completions", json=body("my card has not arrived"))
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "chat.completion" and data["model"] == "cards"
    assert json.loads(data["choices"][0]["message"]["content"]) == {"intent": "card_arrival"}
    assert data["choices"][0]["finish_reason"] == "stop" and data["usage"]["completion_tokens"] == 5
    assert data["aad_route"]["target"] == "specialist" and data["aad_route"]["cluster_id"] == 0
    assert seen == []  # the teacher was not called


def test_teacher_is_called_upstream_and_escalations_recorded(workspace: Workspace) -> None:
    seen: list = []
    with client(workspace, Scripted("{broken"), seen) as c:
        other = c.post("/v1/chat/completions", json=body("plan my trip", temperature=0.2))
        escalated = c.post("/v1/chat/completions", json=body("my card has not arrived"))
    assert other.json()["choices"][0]["message"]["content"] == "teacher says hi"
    assert other.json()["id"] == "chatcmpl-upstream" and other.json()["aad_route"]["target"] == "teacher"
    url, auth, sent = seen[0]
    assert url == "http://teacher.test/v1/chat/completions" and auth == "Bearer sk-test"
    assert sent["model"] == "big-teacher" and sent["temperature"] == 0.2 and sent["stream"] is False
    assert escalated.json()["choices"][0]["message"]["content"] == "teacher says hi"
    assert escalated.json()["aad_route"]["escalated"]
    (trace,) = escalations(workspace)
    assert trace.model == "big-teacher" and trace.usage.total_tokens == 15 and trace.latency_ms >= 0
    assert trace.metadata["aad_escalation"]["specialist_output"] == "{broken"


#: What api.openai.com and vLLM send today: token details (null in vLLM), a refusal and annotations.
OPENAI_USAGE = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "accepted_prediction_tokens": 0}}
VLLM_USAGE = {"prompt_tokens": 9, "total_tokens": 11, "completion_tokens": 2, "prompt_tokens_details": None}


@pytest.mark.parametrize("usage", [OPENAI_USAGE, VLLM_USAGE], ids=["openai", "vllm"])
def test_real_openai_and_vllm_completions_are_read_whatever_else_their_usage_carries(workspace: Workspace,
                                                                                      usage: dict) -> None:
    reply = {**TEACHER_COMPLETION, "service_tier": "default", "system_fingerprint": "fp_x", "usage": usage,
             "choices": [{"index": 0, "logprobs": None, "finish_reason": "stop",
                          "message": {"role": "assistant", "content": "teacher says hi", "refusal": None,
                                      "annotations": []}}]}
    teacher = UpstreamTeacher("http://teacher.test/v1", model="big-teacher", api_key="sk-test",
                              transport=httpx.MockTransport(lambda request: httpx.Response(200, json=reply)))
    with TestClient(create_app(workspace, teacher=teacher, engine=engine_for(workspace, Scripted("{broken")))) as c:
        other = c.post("/v1/chat/completions", json=body("plan my trip"))
        escalated = c.post("/v1/chat/completions", json=body("my card has not arrived"))
    for r in (other, escalated):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "teacher says hi"
    assert escalated.json()["aad_route"]["escalated"]
    (trace,) = escalations(workspace)
    assert trace.usage.total_tokens == 11 and trace.usage.prompt_tokens == 9


def test_a_trace_that_cannot_be_recorded_never_costs_the_user_the_teachers_answer(
        workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    reply = {**TEACHER_COMPLETION, "model": 7}  # a teacher that names its model with a number
    teacher = UpstreamTeacher("http://teacher.test/v1", model="big-teacher", api_key="sk-test",
                              transport=httpx.MockTransport(lambda request: httpx.Response(200, json=reply)))
    engine = engine_for(workspace, Scripted("{broken"))
    with TestClient(create_app(workspace, teacher=teacher, engine=engine)) as c:
        escalated = c.post("/v1/chat/completions", json=body("my card has not arrived"))
        assert escalated.status_code == 200 and escalated.json()["choices"][0]["message"]["content"] == "teacher says hi"
        engine.flush()
        (trace,) = escalations(workspace)
        assert trace.model == "7"

        def broken(_params):  # noqa: ANN001, ANN202
            raise RuntimeError("identity lookup failed")

        monkeypatch.setattr("aad_core.serving.engine.request_identity", broken)
        for text in ("plan my trip", "my card has not arrived"):  # the router's teacher answer, an escalation
            r = c.post("/v1/chat/completions", json=body(text))
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "teacher says hi"


def test_stream_tools_and_errors(workspace: Workspace) -> None:
    tools = [{"type": "function", "function": {"name": "lookup_card", "parameters": {"type": "object"}}}]
    backend = Scripted('<tool_call>{"name": "lookup_card", "arguments": {"card_id": 7}}</tool_call>')
    app = create_app(workspace, teacher=None, engine=engine_for(workspace, backend, output_kind="tool_calls"))
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json=body("my card has not arrived", tools=tools))
        call = r.json()["choices"][0]["message"]["tool_calls"][0]
        assert call["function"] == {"name": "lookup_card", "arguments": json.dumps({"card_id": 7})}
        assert r.json()["choices"][0]["finish_reason"] == "tool_calls"

        s = c.post("/v1/chat/completions", json=body("my card has not arrived", tools=tools, stream=True))
        events = [line[6:] for line in s.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        first, last = json.loads(events[0]), json.loads(events[1])
        assert first["object"] == "chat.completion.chunk"
        assert first["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "lookup_card"
        assert last["aad_route"]["target"] == "specialist" and last["choices"][0]["finish_reason"] == "tool_calls"

        no_teacher = c.post("/v1/chat/completions", json=body("plan my trip"))
        assert no_teacher.status_code == 503 and "--teacher-url" in no_teacher.json()["error"]["message"]
        assert c.post("/v1/chat/completions", json={"messages": []}).status_code == 400
        decision = c.post("/v1/aad/route", json=body("my card has not arrived")).json()
        assert decision["target"] == "specialist" and decision["specialist"] == "cards"
        assert c.get("/health").json()["status"] == "ok"


def test_cli_route_and_serve_are_registered() -> None:
    from typer.testing import CliRunner

    from aad_core.cli import app

    runner = CliRunner()
    assert "OpenAI-compatible" in runner.invoke(app, ["serve", "--help"]).output
    out = runner.invoke(app, ["route", "--help"]).output
    assert "--calibrate" in out and "--show" in out


def test_every_teacher_answer_the_server_proxies_is_captured_once(workspace: Workspace) -> None:
    """The server sees every teacher call: teacher-routed answers are stored (source 'serve'),
    escalations once (source 'router'), specialist answers never."""
    with client(workspace, Scripted('{"intent": "card_arrival"}')) as c:
        for text in ("plan my trip", "book a table for two", "my card has not arrived"):
            c.post("/v1/chat/completions", json=body(text))
    with workspace.store() as store:
        stored = list(store.iter_traces())
    served = [t for t in stored if t.source == "serve"]
    assert sorted(t.request.last_user_message() for t in served) == ["book a table for two", "plan my trip"]
    assert all(t.response.content == "teacher says hi" and t.model == "big-teacher" for t in served)
    assert all(t.metadata["aad_route"]["reason"] for t in served) and escalations(workspace) == []
    assert not any("card_arrival" in (t.response.content or "") for t in stored)  # no specialist answer

    app = create_app(workspace, teacher=upstream([]), engine=engine_for(workspace, Scripted("x")), capture=False)
    with TestClient(app) as c:
        c.post("/v1/chat/completions", json=body("plan a second trip"))
    with workspace.store() as store:
        assert sum(t.source == "serve" for t in store.iter_traces()) == 2  # capture=False stores nothing new
