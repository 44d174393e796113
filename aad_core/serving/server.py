"""``aad serve``: an OpenAI-compatible ``/v1/chat/completions`` that routes between the
workspace's specialists and an upstream OpenAI-compatible teacher, so agents in any language can
use aad by changing their base URL.

Every response is a normal chat completion plus an ``aad_route`` object (the routing decision).
A request whose ``model`` is a promoted specialist's name is answered by that specialist directly, as
vLLM answers a LoRA adapter's name (no routing, no checks, no teacher); with ``logprobs: true`` its
``choices[0].logprobs`` holds ``aad_mean_logprob`` (the mean token log-prob of the answer, the
confidence signal of the risk-coverage gate) and ``aad_completion_tokens`` (``content`` is null: the
runtime keeps no per-token values). That makes ``aad serve`` an endpoint for
``[route] specialist_backend = "openai"`` (:mod:`aad_core.serving.openai_backend`).
``stream: true`` is answered as server-sent events: the whole answer in one chunk, then the
usage / ``aad_route`` chunk and ``[DONE]`` (specialist answers are validated before anything is
sent, so they cannot be streamed token by token).

Needs ``pip install 'aad[serve]'`` (FastAPI, uvicorn, httpx).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from aad_core.errors import AADError
from aad_core.schema import ChatRequest, Message, RoutingDecision

try:  # endpoint annotations are resolved from this module's globals
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
except ImportError as _err:  # pragma: no cover - depends on the installed extras
    raise AADError(f"'aad serve' needs FastAPI: {_err}", hint="pip install 'aad[serve]'") from None

if TYPE_CHECKING:
    from aad_core.serving.engine import RoutedAnswer, RoutingEngine
    from aad_core.workspace import Workspace

ROUTED_MODEL = "aad-routed"
TEACHER_KEY_ENV = "AAD_TEACHER_API_KEY"


class UpstreamTeacher:
    """Calls an OpenAI-compatible ``{base_url}/chat/completions`` with httpx.

    Parameters
    ----------
    base_url : str
        e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:11434/v1``.
    model : str or None
        Model name sent upstream (None = the client's ``model`` field).
    api_key : str or None
        Bearer token (None = ``$AAD_TEACHER_API_KEY``, else the client's own Authorization header).
    timeout_s : float
        Upstream request timeout.
    """

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout_s: float = 120.0, transport: Any = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get(TEACHER_KEY_ENV)
        self.timeout_s = timeout_s
        self.transport = transport
        self._client: Any = None

    def client(self) -> Any:
        if self._client is None:
            import httpx

            self._client = httpx.Client(timeout=self.timeout_s, transport=self.transport)
        return self._client

    def __call__(self, body: dict[str, Any], authorization: str | None = None) -> dict[str, Any]:
        import httpx

        payload = {**body, "stream": False}
        payload.pop("aad", None)
        if self.model:
            payload["model"] = self.model
        headers = {"Content-Type": "application/json"}
        auth = f"Bearer {self.api_key}" if self.api_key else authorization
        if auth:
            headers["Authorization"] = auth
        try:
            resp = self.client().post(f"{self.base_url}/chat/completions", json=payload, headers=headers)
        except httpx.HTTPError as err:
            raise AADError(f"The teacher at {self.base_url} could not be reached: {err}",
                           hint="Check --teacher-url and that the upstream server is running.") from None
        if resp.status_code >= 400:
            raise AADError(f"The teacher at {self.base_url} answered HTTP {resp.status_code}: {resp.text[:300]}",
                           hint="Check --teacher-model and the API key ($AAD_TEACHER_API_KEY).")
        return resp.json()


def _request_from_body(body: dict[str, Any]) -> ChatRequest:
    params = {k: v for k, v in body.items() if k not in ("messages", "tools", "stream", "stream_options")}
    messages = [Message.model_validate({k: v for k, v in m.items() if v is not None}) for m in body["messages"]]
    return ChatRequest(messages=messages, tools=body.get("tools") or None, params=params)


def _completion(answer: RoutedAnswer, requested_model: str) -> dict[str, Any]:
    decision = answer.decision.model_dump()
    raw = answer.teacher_raw
    if isinstance(raw, dict) and "choices" in raw:
        return {**raw, "aad_route": decision}
    msg = answer.message.model_dump(exclude_none=True)
    msg.setdefault("content", None)
    return {
        "id": f"chatcmpl-aad-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": answer.model or requested_model,
        "choices": [{"index": 0, "message": msg, "logprobs": None,
                     "finish_reason": "tool_calls" if answer.message.tool_calls else "stop"}],
        "usage": answer.usage.model_dump(),
        "aad_route": decision,
    }


def _specialist_completion(engine: RoutingEngine, name: str, body: dict[str, Any],
                           request: ChatRequest) -> dict[str, Any]:
    """The specialist ``name``'s own answer to ``request``, as a chat completion (what vLLM returns for a LoRA
    adapter's name): greedy, ``max_tokens`` (default ``[route] max_new_tokens``), cut at ``stop``."""
    max_new = int(body.get("max_tokens") or body.get("max_completion_tokens") or engine.ws.config.route.max_new_tokens)
    gen = engine.specialists.generate(name, [request], max_new_tokens=max_new)[0]
    text, n = str(gen.text), int(getattr(gen, "n_tokens", 0) or 0)
    finish = "length" if n >= max_new else "stop"
    stop = body.get("stop")
    for s in [stop] if isinstance(stop, str) else (stop or []):
        if s and s in text:
            text, finish = text[: text.index(s)], "stop"
    logprobs: dict[str, Any] | None = None
    if body.get("logprobs"):
        logprobs = {"content": None, "aad_mean_logprob": getattr(gen, "mean_logprob", None), "aad_completion_tokens": n}
        if getattr(gen, "confidence", None) is not None:
            logprobs["aad_confidence"] = gen.confidence  # type: ignore[attr-defined]
    decision = RoutingDecision(target="specialist", specialist=name, reason=f"asked for by name (model={name!r})")
    return {
        "id": f"chatcmpl-aad-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                     "finish_reason": finish}],
        "usage": {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n},
        "aad_route": decision.model_dump(),
    }


def _sse(completion: dict[str, Any]) -> Iterator[str]:
    base = {k: completion[k] for k in ("id", "created", "model") if k in completion}
    base["object"] = "chat.completion.chunk"
    choice = completion["choices"][0]
    delta = {k: v for k, v in choice["message"].items() if v is not None}
    if "tool_calls" in delta:
        delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(delta["tool_calls"])]
    yield "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}) + "\n\n"
    yield "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice.get("finish_reason")}],
                                  "usage": completion.get("usage"), "aad_route": completion["aad_route"]}) + "\n\n"
    yield "data: [DONE]\n\n"


def create_app(
    ws: Workspace | None = None,
    *,
    teacher: Callable[..., dict[str, Any]] | None = None,
    engine: RoutingEngine | None = None,
    capture: bool = True,
    preload: bool = False,
) -> FastAPI:
    """The FastAPI app. ``teacher(body, authorization)`` returns an OpenAI chat completion dict
    (default: none — requests the router sends to the teacher then fail with HTTP 503). With
    ``capture`` (default) every teacher answer the server proxies is stored as a trace (source
    ``serve``), as escalations are: the server is the only place that sees those calls. With
    ``preload`` the router and every promoted specialist are loaded and warmed at start-up
    (:meth:`RoutingEngine.preload`), before the first request is accepted."""
    from aad_core import __version__
    from aad_core.serving.engine import RoutingEngine

    if engine is None:
        if ws is None:
            from aad_core.workspace import Workspace

            ws = Workspace.find()
        engine = RoutingEngine(ws)
    engine.capture_teacher = capture
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if preload:
            import asyncio

            await asyncio.to_thread(engine.preload)
        yield
        engine.flush()  # escalation and teacher traces reach the store before the process ends

    app = FastAPI(title="aad router", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible chat completions routed between distilled specialists and a teacher.")
    app.state.engine = engine

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind}})

    promoted: dict[str, list[str]] = {}  # the promoted specialists' names, read once (a promotion needs a restart)

    def specialist_names() -> list[str]:
        """The names a request's ``model`` may give to be answered by that specialist directly."""
        if "names" not in promoted:
            from aad_core.specialists import SpecialistRegistry

            promoted["names"] = sorted(s.name for s in SpecialistRegistry(engine.ws).promoted().values())
        return [n for n in promoted["names"] if n not in engine.demoted]

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "aad_version": __version__, "teacher": teacher is not None}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": ROUTED_MODEL, "object": "model", "owned_by": "aad"}]
                + [{"id": n, "object": "model", "owned_by": "aad", "parent": ROUTED_MODEL} for n in specialist_names()]}

    @app.post("/v1/aad/route")
    def route_only(body: dict[str, Any]) -> Any:
        try:
            request = _request_from_body(body)
        except Exception as err:
            return error(400, f"Invalid request: {err}")
        return engine.decide([request])[0].model_dump()

    @app.post("/v1/chat/completions")
    def chat_completions(body: dict[str, Any], http_request: Request) -> Any:
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return error(400, "'messages' must be a non-empty list of chat messages.")
        try:
            request = _request_from_body(body)
        except Exception as err:
            return error(400, f"Invalid request: {err}")
        if body.get("model") in specialist_names():  # a specialist by name: its own answer, as vLLM gives it
            try:
                completion = _specialist_completion(engine, str(body["model"]), body, request)
            except Exception as err:
                return error(500, f"The specialist {body['model']!r} could not answer: {type(err).__name__}: {err}",
                             "server_error")
            if body.get("stream"):
                return StreamingResponse(_sse(completion), media_type="text/event-stream")
            return completion
        authorization = http_request.headers.get("authorization")

        def teacher_call(_req: ChatRequest) -> dict[str, Any]:
            if teacher is None:
                raise AADError("This request needs the teacher, but the server has none.",
                               hint="Start it with 'aad serve --teacher-url URL'.")
            return teacher(body, authorization)

        try:
            answer = engine.answer(request, teacher_call)
        except AADError as err:
            status = 503 if teacher is None else 502
            return error(status, str(err), "upstream_error")
        completion = _completion(answer, str(body.get("model") or ROUTED_MODEL))
        if body.get("stream"):
            return StreamingResponse(_sse(completion), media_type="text/event-stream")
        return completion

    return app


def serve(ws: Workspace, *, host: str = "127.0.0.1", port: int = 8000, teacher_url: str | None = None,
          teacher_model: str | None = None, preload: bool = True) -> None:
    """Run the server with uvicorn until interrupted (``preload``: load and warm the specialists first)."""
    import uvicorn

    from aad_core.serving.engine import RoutingEngine

    teacher = UpstreamTeacher(teacher_url, teacher_model) if teacher_url else None
    engine = RoutingEngine(ws, teacher_model=teacher_model)
    app = create_app(ws, teacher=teacher, engine=engine, preload=preload)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        engine.close()
