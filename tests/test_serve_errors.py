"""``aad serve`` as an OpenAI-compatible citizen (issue 15): every error in OpenAI's error object with the
right status, no internal URL or upstream body in what clients read, an optional bearer key and the rule for
which key reaches the teacher, teacher calls that never starve ``/health``, real prompt token counts.

No model is loaded (the keyword router and scripted specialists of ``test_router``); servers and the fake
teacher listen on 127.0.0.1 only; the fuzz is seeded and bounded."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
import httpx  # noqa: E402
from _chat_stub import chat_stub, running_app  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from test_router import Scripted, engine_for  # noqa: E402
from test_server import TEACHER_COMPLETION, body  # noqa: E402

from aad_core.schema import ChatRequest  # noqa: E402
from aad_core.serving.server import TEACHER_KEY_ENV, UpstreamTeacher, create_app  # noqa: E402
from aad_core.workspace import Workspace  # noqa: E402

INTERNAL_URL = "http://teacher.internal.example:9999/v1"
SECRET_BODY = "upstream-secret-stack-trace"


def assert_openai_error(r: httpx.Response, status: int | None = None) -> dict[str, Any]:
    """``r`` is OpenAI's error object (JSON, all four fields) with ``status`` (default: any 4xx)."""
    assert r.headers.get("content-type", "").startswith("application/json"), (r.status_code, r.text[:200])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    assert r.status_code == status if status is not None else 400 <= r.status_code < 500, (r.status_code, err)
    return err


def mock_teacher(handler: Any, *, url: str = INTERNAL_URL, api_key: str | None = "sk-teacher") -> UpstreamTeacher:
    return UpstreamTeacher(url, model="big-teacher", api_key=api_key, transport=httpx.MockTransport(handler))


running = running_app  # aad serve's app on 127.0.0.1 (tests/_chat_stub.py)


# -- statuses and shapes -----------------------------------------------------------------------------
def test_bad_requests_get_openai_errors_with_the_parameter(workspace: Workspace) -> None:
    app = create_app(workspace, teacher=None, engine=engine_for(workspace, Scripted()), max_body_bytes=4096)
    with TestClient(app) as c:
        for extra, param in [({"stop": 5}, "stop"), ({"max_tokens": "abc"}, "max_tokens"), ({"n": 2}, "n"),
                             ({"temperature": 3}, "temperature"), ({"stream": "yes"}, "stream"),
                             ({"max_completion_tokens": 0}, "max_completion_tokens"), ({"top_p": "x"}, "top_p"),
                             ({"tools": [{"type": "function"}]}, "tools[0]")]:
            err = assert_openai_error(c.post("/v1/chat/completions", json=body("plan my trip", **extra)), 400)
            assert err["param"] == param and err["type"] == "invalid_request_error", err
            assert param.split("[")[0] in err["message"]
        wizard = {"messages": [{"role": "wizard", "content": "x"}]}
        err = assert_openai_error(c.post("/v1/chat/completions", json=wizard), 400)
        assert err["param"] == "messages[0].role" and "user" in err["message"]
        assert assert_openai_error(c.post("/v1/chat/completions", json={}), 400)["code"] == "missing_required_parameter"
        for raw in (b"{", b"[1, 2]", b"", b"\xff\xfe", b'{"temperature": NaN}'):
            err = assert_openai_error(c.post("/v1/chat/completions", content=raw), 400)
            assert err["code"] in ("invalid_json", "invalid_type")
        assert "line 1 column 2" in c.post("/v1/chat/completions", content=b"{").json()["error"]["message"]
        big = c.post("/v1/chat/completions", json=body("x" * 5000))
        assert assert_openai_error(big, 413)["code"] == "request_too_large"
        assert "4,096" in big.json()["error"]["message"]
        assert assert_openai_error(c.post("/v1/aad/route", content=b"nope"), 400)["code"] == "invalid_json"
        assert assert_openai_error(c.get("/v1/nowhere"), 404)["code"] == "not_found"
        assert assert_openai_error(c.get("/v1/chat/completions"), 405)["code"] == "method_not_allowed"
        assert c.get("/health").json()["status"] == "ok"


def test_teacher_failures_are_502_or_504_and_never_leak_the_url_or_body(
        workspace: Workspace, caplog: pytest.LogCaptureFixture) -> None:
    def answer_with(response: httpx.Response | Exception) -> UpstreamTeacher:
        def handler(_request: httpx.Request) -> httpx.Response:
            if isinstance(response, Exception):
                raise response
            return response

        return mock_teacher(handler)

    def boom(_body: dict, _authorization: str | None) -> dict:
        raise RuntimeError(f"{SECRET_BODY} from {INTERNAL_URL}")

    def slow(_body: dict, _authorization: str | None) -> dict:
        raise TimeoutError(INTERNAL_URL)

    cases: list[tuple[Any, int]] = [
        (answer_with(httpx.Response(500, text=f"{SECRET_BODY} at {INTERNAL_URL}")), 502),
        (answer_with(httpx.Response(401, json={"error": {"message": SECRET_BODY}})), 502),
        (answer_with(httpx.Response(200, text=f"<html>{SECRET_BODY}</html>")), 502),
        (answer_with(httpx.Response(200, json={"object": "error", "detail": SECRET_BODY})), 502),
        (answer_with(httpx.Response(200, json={"choices": [], "note": SECRET_BODY})), 502),
        (answer_with(httpx.Response(200, json={"choices": [{"message": SECRET_BODY}]})), 502),
        (answer_with(httpx.Response(200, json=[SECRET_BODY])), 502),
        (answer_with(httpx.ConnectError(f"connection refused by {INTERNAL_URL}")), 502),
        (answer_with(httpx.ReadTimeout(f"read timed out from {INTERNAL_URL}")), 504),
        (boom, 502),
        (slow, 504),
    ]
    caplog.set_level(logging.WARNING, logger="aad_core.serving.server")
    for teacher, status in cases:
        app = create_app(workspace, teacher=teacher, engine=engine_for(workspace, Scripted()), capture=False)
        with TestClient(app) as c:
            r = c.post("/v1/chat/completions", json=body("plan my trip"))
            err = assert_openai_error(r, status)
            assert err["type"] == "upstream_error" and (err["code"] == "teacher_timeout") == (status == 504), err
            for secret in (SECRET_BODY, "internal.example", "9999"):
                assert secret not in r.text, (status, r.text)
            assert c.get("/health").status_code == 200
    logged = "\n".join(rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING)
    assert SECRET_BODY in logged and "teacher.internal.example:9999" in logged  # the operator still sees why

    # a teacher answering a completion through a plain function still works
    app = create_app(workspace, teacher=lambda _b, _a: TEACHER_COMPLETION, engine=engine_for(workspace, Scripted()),
                     capture=False)
    with TestClient(app) as c:
        assert c.post("/v1/chat/completions", json=body("plan my trip")).json()["id"] == "chatcmpl-upstream"


def test_an_unexpected_error_is_a_json_500(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = engine_for(workspace, Scripted())

    def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("/srv/secret/path exploded")

    monkeypatch.setattr(engine, "route_call", broken)  # a routing fault alone goes to the teacher (test_serve_capture)
    monkeypatch.setattr(engine, "fault_call", broken)  # ... but the way to the teacher is broken too
    with TestClient(create_app(workspace, teacher=None, engine=engine)) as c:
        r = c.post("/v1/chat/completions", json=body("plan my trip"))
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "secret" not in r.text
        assert c.get("/health").status_code == 200


# -- keys ------------------------------------------------------------------------------------------------
def test_the_serve_key_guards_v1_and_is_never_forwarded_to_the_teacher(
        workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TEACHER_KEY_ENV, raising=False)
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json=TEACHER_COMPLETION)

    def app(api_key: str | None, teacher_key: str | None) -> TestClient:
        return TestClient(create_app(workspace, teacher=mock_teacher(handler, api_key=teacher_key), api_key=api_key,
                                     engine=engine_for(workspace, Scripted()), capture=False))

    with app("s3cret-key", None) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"},
                        {"Authorization": "Basic s3cret-key"}, {"Authorization": "Bearer s3cret-key-and-more"}):
            r = c.post("/v1/chat/completions", json=body("plan my trip"), headers=headers)
            assert assert_openai_error(r, 401)["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
        assert_openai_error(c.get("/v1/models"), 401)
        assert_openai_error(c.post("/v1/aad/route", json=body("plan my trip")), 401)
        assert c.get("/health").status_code == 200  # open: for load balancers
        ok = c.post("/v1/chat/completions", json=body("plan my trip"), headers={"Authorization": "Bearer s3cret-key"})
        assert ok.status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "bearer s3cret-key"}).status_code == 200
    assert seen == [None]  # aad's key is not the teacher's: not sent upstream

    seen.clear()
    with app(None, None) as c:  # no serve key, no teacher key: the client's key goes upstream
        c.post("/v1/chat/completions", json=body("plan my trip"), headers={"Authorization": "Bearer client-key"})
    with app(None, "sk-teacher") as c:  # the server's teacher key wins
        c.post("/v1/chat/completions", json=body("plan my trip"), headers={"Authorization": "Bearer client-key"})
    with app("s3cret-key", "sk-teacher") as c:
        c.post("/v1/chat/completions", json=body("plan my trip"), headers={"Authorization": "Bearer s3cret-key"})
    assert seen == ["Bearer client-key", "Bearer sk-teacher", "Bearer sk-teacher"]


# -- usage -----------------------------------------------------------------------------------------------
class CountingScripted(Scripted):
    """A scripted specialist backend whose tokenizer counts 42 prompt tokens."""

    def prompt_tokens(self, name: str, request: ChatRequest) -> int:
        return 42


def test_specialist_answers_report_their_prompt_tokens(workspace: Workspace, tmp_path: Path) -> None:
    from aad_core.specialists import SpecialistRegistry

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}", encoding="utf-8")
    registry = SpecialistRegistry(workspace)
    spec = registry.save(cluster_id=0, label="cards", name="cards", adapter_dir=adapter, base_model="tiny")
    registry.set_promoted(spec.name, spec.version, True, "test")

    with TestClient(create_app(workspace, teacher=None, engine=engine_for(workspace, CountingScripted()))) as c:
        routed = c.post("/v1/chat/completions", json=body("my card has not arrived")).json()
        named = c.post("/v1/chat/completions", json={**body("my card has not arrived"), "model": "cards"}).json()
    assert routed["aad_route"]["target"] == "specialist" and named["model"] == "cards"
    for data in (routed, named):
        assert data["usage"] == {"prompt_tokens": 42, "completion_tokens": 5, "total_tokens": 47}

    with TestClient(create_app(workspace, teacher=None, engine=engine_for(workspace, Scripted()))) as c:
        estimated = c.post("/v1/chat/completions", json=body("my card has not arrived")).json()["usage"]
    # no tokenizer to ask: 23 characters / 4, rounded up, + 4 for the one message's template tokens
    assert estimated == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


# -- fuzz --------------------------------------------------------------------------------------------------
VALID = body("plan my trip")
#: (field, value) pairs each of which makes an otherwise valid body invalid.
INVALID: list[tuple[str, Any]] = [
    ("messages", []), ("messages", "hi"), ("messages", 5), ("messages", {"role": "user"}), ("messages", [5]),
    ("messages", [[[[[]]]]]), ("messages", [{}]), ("messages", [{"role": 5, "content": "x"}]),
    ("messages", [{"role": "wizard", "content": "x"}]), ("messages", [{"role": "user", "content": 5}]),
    ("messages", [{"role": "user", "content": [5]}]), ("messages", [{"role": "user", "content": [{"type": 3}]}]),
    ("messages", [{"role": "user", "content": {"a": [[{}]]}}]), ("messages", [{"role": "user"}]),
    ("messages", [{"role": "user", "content": "x", "name": 7}]), ("messages", None),
    ("messages", [{"role": "assistant", "content": None, "tool_calls": "call it"}]),
    ("messages", [{"role": "assistant", "tool_calls": [{"function": "x"}]}]),
    ("messages", [{"role": "tool", "content": "x", "tool_call_id": 5}]),
    ("model", 5), ("model", ["a"]), ("model", {"a": 1}), ("model", True),
    ("max_tokens", "abc"), ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", 1.5), ("max_tokens", True),
    ("max_tokens", [1]), ("max_tokens", "10"), ("max_completion_tokens", "x"), ("max_completion_tokens", -5),
    ("temperature", "hot"), ("temperature", -0.1), ("temperature", 2.5), ("temperature", True), ("temperature", [1]),
    ("temperature", {}), ("top_p", 1.5), ("top_p", -1), ("top_p", "x"), ("presence_penalty", 3),
    ("frequency_penalty", "x"), ("stop", 5), ("stop", [5]), ("stop", [None]), ("stop", {"a": 1}), ("stop", True),
    ("stop", ["a", "b", "c", "d", "e"]), ("stream", "yes"), ("stream", 1), ("stream", []), ("stream", {}),
    ("n", 2), ("n", 0), ("n", "1"), ("n", 1.0), ("n", True), ("tools", "x"), ("tools", [5]),
    ("tools", [{"type": "function"}]), ("tools", [{"type": "function", "function": {"name": 5}}]), ("tools", {"a": 1}),
    ("tool_choice", 5), ("tool_choice", []), ("tool_choice", "maybe"), ("response_format", "json"),
    ("response_format", {"type": 5}), ("response_format", 5), ("logprobs", "yes"), ("top_logprobs", -1),
    ("top_logprobs", 21), ("top_logprobs", "x"), ("stream_options", "x"), ("seed", "x"), ("seed", 1.5), ("user", 5),
    ("metadata", "x"), ("logit_bias", [1]), ("parallel_tool_calls", "no"),
]
RAW: list[bytes] = [
    b"", b"   ", b"{", b"}", b"not json", b"[]", b"5", b'"text"', b"null", b"true", b"\xff\xfe\xfa",
    b'{"messages": "\xff\xfe"}', b"[" * 30_000, b'{"a":' * 10_000, b"[" * 100_000,
    b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
    b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": Infinity}',
    b'{"messages": [{"role": "user", "content": "\\ud800 lone surrogate"}]}',
    b'{"max_tokens": ' + b"9" * 5000 + b"}", b'{"messages": [{"role": "user", "content": "x"}]',
    b"\xef\xbb\xbf[1]", b'{"messages": [{"role": "user", "content": "x"}], "stop": 5}\x00',
]


def _junk(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value, nested up to 4 levels."""
    pick = rng.randrange(7 if depth < 4 else 4)
    if pick == 0:
        return rng.choice([None, True, False, 0, -1, 2**63, 1e308, -0.0])
    if pick == 1:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(12)))
    if pick == 2:
        return rng.random() * 1e6
    if pick == 3:
        return ""
    if pick in (4, 5):
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{i}": _junk(rng, depth + 1) for i in range(rng.randrange(4))}


def fuzz_cases(n: int, seed: int = 15) -> Iterator[bytes]:
    rng = random.Random(seed)
    for _ in range(n):
        roll = rng.random()
        if roll < 0.2:
            yield rng.choice(RAW)
        elif roll < 0.3:
            yield rng.randbytes(rng.randrange(1, 300))
        else:
            case = json.loads(json.dumps(VALID))
            for key in rng.sample(["metadata", "aad_extra", "logit_bias", "x_junk"], rng.randrange(3)):
                case[key] = {"junk": _junk(rng)} if key in ("metadata", "logit_bias") else _junk(rng)
            for key, value in rng.sample(INVALID, rng.randrange(1, 4)):
                case[key] = value
            if roll > 0.85:  # a huge string: under the limit (400 for the bad field) or over it (413)
                case["x_huge"] = "y" * rng.choice([1_000, 30_000, 100_000])
            yield json.dumps(case).encode()


def test_fuzzed_malformed_requests_get_4xx_openai_errors_and_the_server_keeps_answering(workspace: Workspace) -> None:
    app = create_app(workspace, teacher=None, engine=engine_for(workspace, Scripted()), capture=False,
                     max_body_bytes=64 * 1024)
    statuses: dict[int, int] = {}
    # Connection: close: on loopback a kept-alive connection waits ~40 ms per request (delayed ACKs)
    with running(app) as url, httpx.Client(base_url=url, timeout=10, headers={"Connection": "close"}) as c:
        for i, raw in enumerate(fuzz_cases(200)):
            kind = "text/plain" if i % 7 == 0 else "application/json"
            r = c.post("/v1/chat/completions", content=raw, headers={"Content-Type": kind})
            assert_openai_error(r)  # a 4xx JSON error: never plain text, a 5xx or a reset connection
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if i % 50 == 0:
                assert c.get("/health").json()["status"] == "ok"
        assert c.get("/health").json()["status"] == "ok"
        ok = c.post("/v1/aad/route", json=body("my card has not arrived"))
        assert ok.status_code == 200 and ok.json()["target"] == "specialist"
    assert set(statuses) == {400, 413}, statuses


# -- slow teachers -------------------------------------------------------------------------------------------
class SlowTeacher:
    """A teacher's replies (for :func:`chat_stub`) that take ``delay_s`` each, counting the calls in flight."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s, self.in_flight, self.max_in_flight, self.lock = delay_s, 0, 0, threading.Lock()

    def __call__(self, _body: dict[str, Any], _request: Any) -> dict[str, Any]:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay_s)
            return TEACHER_COMPLETION
        finally:
            with self.lock:
                self.in_flight -= 1


def test_health_answers_promptly_while_slow_teacher_calls_are_in_flight(workspace: Workspace) -> None:
    n_calls, concurrency = 40, 20
    teacher = SlowTeacher(delay_s=2.0)
    results: list[int] = []
    with chat_stub(teacher) as teacher_url:
        upstream = UpstreamTeacher(teacher_url, api_key="sk-test", timeout_s=15)
        app = create_app(workspace, teacher=upstream, engine=engine_for(workspace, Scripted()), capture=False,
                         teacher_concurrency=concurrency)
        # One client for all callers, built before they start: 40 clients built in this process, on the
        # server's GIL, cost a second or more of CPU on a loaded machine and slow the first probes.
        with running(app) as url, httpx.Client(base_url=url, timeout=30,
                                               limits=httpx.Limits(max_connections=n_calls)) as callers_client:
            def client_call() -> None:
                results.append(callers_client.post("/v1/chat/completions", json=body("plan my trip")).status_code)

            callers = [threading.Thread(target=client_call) for _ in range(n_calls)]
            for t in callers:
                t.start()
            probes: list[tuple[float, int]] = []
            deadline = time.monotonic() + 20
            with httpx.Client(base_url=url, timeout=5, headers={"Connection": "close"}) as c:
                while any(t.is_alive() for t in callers) and time.monotonic() < deadline:
                    started = time.perf_counter()
                    assert c.get("/health").status_code == 200
                    probes.append((time.perf_counter() - started, teacher.in_flight))
                    time.sleep(0.1)
            for t in callers:
                t.join(timeout=20)
    busy = [latency for latency, in_flight in probes if in_flight >= concurrency // 2]
    assert len(busy) >= 5, probes  # /health was asked while the teacher was busy ...
    assert max(busy) < 1.0, probes  # ... and answered within a second each time
    assert results == [200] * n_calls
    assert teacher.max_in_flight == concurrency  # bounded: the rest waited without holding a thread
