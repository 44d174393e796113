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
sent, so they cannot be streamed token by token). ``usage.prompt_tokens`` of a specialist's answer
is counted with that specialist's tokenizer and chat template where its backend can
(``prompt_tokens(name, request)``), else estimated as :func:`estimate_prompt_tokens` says.

Errors are OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``, never plain text:
400 a body that is not a JSON object or a parameter of the wrong type or value, 401 a missing or wrong
key (when the server has one), 404/405 an unknown route or method, 413 a body over ``max_body_bytes``,
500 an unexpected server error, 502 a teacher that failed (unreachable, an HTTP error, an answer that is
not a chat completion), 503 no teacher configured, 504 a teacher that timed out. Client-facing messages
never hold the teacher's URL nor its response body: those are logged (WARNING) on the server. A routing
fault (a broken router artifact, a bug in a router or specialist plugin) is no error: the teacher answers
(``aad_route.reason`` names the fault's type, the log its cause, once a minute at most) and its answer is
recorded like any other.

Identity. The stored traces carry OpenAI's ``user`` parameter as ``Trace.user_id`` (or ``metadata.user_id``
when the request has one) and ``metadata.session_id`` (``thread_id``, ``conversation_id``) as
``Trace.session_id``, as ``aad ingest`` reads them; the redactor turns an id holding personal data (an
e-mail address) into a keyed pseudonym.

Keys. With ``api_key`` (``aad serve --api-key``, ``$AAD_SERVE_API_KEY``) every ``/v1/...`` route needs
``Authorization: Bearer <that key>`` (``/health`` stays open). The key that reaches the teacher is
the server's teacher key (``$AAD_TEACHER_API_KEY``) when set; without one, the client's own
``Authorization`` header is forwarded, but only when the server has no ``api_key``: with one, that
header holds aad's key and is never sent upstream (set ``$AAD_TEACHER_API_KEY`` then).

Teacher calls are made with an async HTTP client, at most ``teacher_concurrency`` at once (the rest
wait without holding a thread), so slow teacher calls never starve ``/health`` or the specialists.

The server's parts live beside it: :mod:`~aad_core.serving.openai_errors` (the error object and the
middleware), :mod:`~aad_core.serving.request_checks` (reading and checking request bodies),
:mod:`~aad_core.serving.upstream_teacher` (the teacher client) and
:mod:`~aad_core.serving.prompt_tokens` (``usage.prompt_tokens``); their public names are re-exported here.

Needs ``pip install 'aad[serve]'`` (FastAPI, uvicorn, httpx).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from aad_core.config import TEACHER_KEY_ENV  # re-exported: the variable aad serve reads
from aad_core.errors import AADError
from aad_core.schema import ChatRequest, RoutingDecision

try:  # endpoint annotations are resolved from this module's globals
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as _err:  # pragma: no cover - depends on the installed extras
    raise AADError(f"'aad serve' needs FastAPI: {_err}", hint="pip install 'aad[serve]'") from None

# The server's parts; their public names are re-exported (``__all__``).
from aad_core.serving.openai_errors import (OpenAIError, TeacherError, _ErrorsAsJSON, _internal_error,
                                            _openai_error_response, error_response)
from aad_core.serving.prompt_tokens import _with_prompt_tokens, estimate_prompt_tokens, specialist_prompt_tokens
from aad_core.serving.request_checks import max_new_tokens, parse_chat_body, read_json_body
from aad_core.serving.upstream_teacher import (DEFAULT_TEACHER_TIMEOUT_S, UpstreamTeacher, _is_async_callable,
                                               _TeacherGate, checked_completion, configured_teacher)

if TYPE_CHECKING:
    from aad_core.serving.engine import RoutedAnswer, RoutingEngine
    from aad_core.serving.routed_call import RoutedCall
    from aad_core.workspace import Workspace

__all__ = [
    "DEFAULT_MAX_BODY_BYTES", "DEFAULT_TEACHER_CONCURRENCY", "DEFAULT_TEACHER_TIMEOUT_S", "ROUTED_MODEL",
    "SERVE_KEY_ENV", "TEACHER_KEY_ENV", "OpenAIError", "TeacherError", "UpstreamTeacher", "checked_completion",
    "configured_teacher", "create_app", "error_response", "estimate_prompt_tokens", "parse_chat_body",
    "read_json_body", "serve", "specialist_prompt_tokens",
]

log = logging.getLogger(__name__)

ROUTED_MODEL = "aad-routed"
SERVE_KEY_ENV = "AAD_SERVE_API_KEY"
#: Largest request body accepted (bytes); larger ones get HTTP 413.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
#: Teacher calls in flight at once; further ones wait (on the event loop, holding no thread).
DEFAULT_TEACHER_CONCURRENCY = 16


# -- answers ----------------------------------------------------------------------------------------------
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
    max_new = max_new_tokens(body, engine.ws.config.route.max_new_tokens)
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
    prompt = specialist_prompt_tokens(engine, name, request)
    return {
        "id": f"chatcmpl-aad-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                     "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n},
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
    teacher: Callable[..., Any] | None = None,
    engine: RoutingEngine | None = None,
    capture: bool = True,
    preload: bool = False,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    teacher_concurrency: int = DEFAULT_TEACHER_CONCURRENCY,
) -> FastAPI:
    """The FastAPI app.

    ``teacher(body, authorization)`` returns an OpenAI chat completion dict (default: none — requests the
    router sends to the teacher then fail with HTTP 503). An :class:`UpstreamTeacher` is called through
    its async :meth:`~UpstreamTeacher.acall`, a coroutine function is awaited, any other callable runs on
    a worker thread of its own; at most ``teacher_concurrency`` of them at once. A teacher raising
    :class:`TeacherError` (or :class:`OpenAIError`) gets that status and message; ``TimeoutError`` 504;
    anything else 502 with a generic message (the exception is logged).

    ``api_key``: the bearer key clients must send to ``/v1/...`` (None or "" = open; ``/health`` is always
    open). The client's ``Authorization`` header is passed to ``teacher`` only without ``api_key``; with
    one, ``teacher`` gets None (an :class:`UpstreamTeacher` then uses ``$AAD_TEACHER_API_KEY``).

    ``max_body_bytes``: larger request bodies get HTTP 413. With ``capture`` (default) every teacher answer
    the server proxies is stored as a trace (source ``serve``), as escalations are: the server is the only
    place that sees those calls. With ``preload`` the router and every promoted specialist are loaded and
    warmed at start-up (:meth:`RoutingEngine.preload`), before the first request is accepted."""
    from aad_core import __version__
    from aad_core.serving.engine import RoutingEngine
    from aad_core.serving.routed_call import teacher_result

    if max_body_bytes < 1:
        raise AADError(f"max_body_bytes must be a positive number of bytes, got {max_body_bytes}.",
                       hint=f"Use e.g. {DEFAULT_MAX_BODY_BYTES} (1 MiB).")
    if teacher_concurrency < 1:
        raise AADError(f"teacher_concurrency must be at least 1, got {teacher_concurrency}.",
                       hint=f"Use e.g. {DEFAULT_TEACHER_CONCURRENCY}.")
    if engine is None:
        if ws is None:
            from aad_core.workspace import Workspace

            ws = Workspace.find()
        engine = RoutingEngine(ws)
    engine.capture_teacher = capture
    key = api_key or None
    gate = _TeacherGate(teacher_concurrency)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if preload:
            await asyncio.to_thread(engine.preload)
        try:
            yield
        finally:
            aclose = getattr(teacher, "aclose", None)
            if callable(aclose):
                with contextlib.suppress(Exception):
                    await aclose()
            await asyncio.to_thread(engine.flush)  # escalation and teacher traces reach the store before the end

    app = FastAPI(title="aad router", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible chat completions routed between distilled specialists and a teacher.")
    app.state.engine = engine
    app.add_middleware(_ErrorsAsJSON)

    @app.exception_handler(OpenAIError)
    async def openai_error(_request: Request, err: OpenAIError) -> JSONResponse:
        return _openai_error_response(err)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, err: RequestValidationError) -> JSONResponse:
        first = (err.errors() or [{}])[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return error_response(400, f"Invalid request{f' at {param!r}' if param else ''}: "
                              f"{first.get('msg', 'malformed body')}.", param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = (f"No route {request.method} {request.url.path[:200]}: aad serve answers POST /v1/chat/completions, "
                   "GET /v1/models, POST /v1/aad/route and GET /health." if err.status_code in codes
                   else str(err.detail))
        return error_response(err.status_code, message, "invalid_request_error" if err.status_code < 500
                              else "server_error", code=codes.get(err.status_code), headers=err.headers)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, err: Exception) -> JSONResponse:  # after _ErrorsAsJSON: rare
        log.error("aad serve: unhandled error: %r", err)
        return _internal_error()

    def authorize(request: Request) -> None:
        if key is None:
            return
        scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
        # the header arrives decoded as latin-1: its bytes are the client's (UTF-8) bytes
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1", "replace"),
                                                                 key.encode("utf-8")):
            raise OpenAIError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>' with the key "
                              "this server was started with (aad serve --api-key / $AAD_SERVE_API_KEY).",
                              code="invalid_api_key")

    promoted: dict[str, list[str]] = {}  # the promoted specialists' names, read once (a promotion needs a restart)

    def specialist_names() -> list[str]:
        """The names a request's ``model`` may give to be answered by that specialist directly."""
        if "names" not in promoted:
            from aad_core.specialists import SpecialistRegistry

            promoted["names"] = sorted(s.name for s in SpecialistRegistry(engine.ws).promoted().values())
        return [n for n in promoted["names"] if n not in engine.demoted]

    async def names() -> list[str]:
        return specialist_names() if "names" in promoted else await anyio.to_thread.run_sync(specialist_names)

    async def call_teacher(body: dict[str, Any], authorization: str | None) -> Any:
        semaphore, threads = gate.current()
        async with semaphore:
            try:
                acall = getattr(teacher, "acall", None)
                if callable(acall):
                    raw = await acall(body, authorization)
                elif _is_async_callable(teacher):
                    raw = await teacher(body, authorization)  # type: ignore[misc]
                else:
                    raw = await anyio.to_thread.run_sync(teacher, body, authorization, limiter=threads)
            except OpenAIError:
                raise
            except TimeoutError as err:
                log.warning("the teacher timed out: %r", err)
                raise TeacherError("The teacher did not answer in time.", status=504, code="teacher_timeout") from None
            except Exception as err:
                log.warning("the teacher call failed: %r", err, exc_info=True)
                raise TeacherError(f"The teacher call failed ({type(err).__name__}).",
                                   hint="The server log names the cause.") from None
        return checked_completion(raw)

    def route(request: ChatRequest, shadow_teacher: Callable[[ChatRequest], Any] | None
              ) -> tuple[RoutedCall, RoutedAnswer | None]:
        """Decide and try the specialist (a worker thread: the runtime batches concurrent requests). A routing
        fault (a broken router artifact, a bug in a plugin) never fails the request: the teacher answers it,
        and its answer is recorded, as for any request the router sends to the teacher."""
        try:
            call = engine.route_call(request, teacher_call=shadow_teacher)
        except Exception as err:  # RoutingEngine.route_call handles its own faults; an engine subclass may not
            call = engine.fault_call(request, err)
        served = call.served_answer
        if served is not None and served.usage.prompt_tokens == 0:
            name = call.decision.specialist if call.specialist_answer is not None else None
            served = _with_prompt_tokens(served, specialist_prompt_tokens(engine, name, request))
        return call, served

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "aad_version": __version__, "teacher": teacher is not None}

    @app.get("/v1/models")
    async def models(http_request: Request) -> dict[str, Any]:
        authorize(http_request)
        return {"object": "list", "data": [{"id": ROUTED_MODEL, "object": "model", "owned_by": "aad"}]
                + [{"id": n, "object": "model", "owned_by": "aad", "parent": ROUTED_MODEL} for n in await names()]}

    @app.post("/v1/aad/route")
    async def route_only(http_request: Request) -> Any:
        authorize(http_request)
        request = parse_chat_body(await read_json_body(http_request, max_body_bytes))
        try:
            decisions = await anyio.to_thread.run_sync(engine.decide, [request])
        except Exception as err:  # what /v1/chat/completions would do: the teacher (the fault is logged)
            decisions = [engine.fault_call(request, err).decision]
        return decisions[0].model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(http_request: Request) -> Any:
        authorize(http_request)
        body = await read_json_body(http_request, max_body_bytes)
        request = parse_chat_body(body)
        model = body.get("model")
        if isinstance(model, str) and model in await names():  # a specialist by name: its own answer, as vLLM gives it
            try:
                completion = await anyio.to_thread.run_sync(_specialist_completion, engine, model, body, request)
            except Exception as err:
                log.warning("specialist %s could not answer: %r", model, err, exc_info=True)
                raise OpenAIError(500, f"The specialist {model!r} could not answer ({type(err).__name__}).",
                                  type="server_error", code="specialist_error",
                                  hint="The server log names the cause.") from None
            if body.get("stream"):
                return StreamingResponse(_sse(completion), media_type="text/event-stream")
            return completion
        # the client's key goes upstream only when it is not aad's own key (see the module docstring)
        authorization = None if key is not None else http_request.headers.get("authorization")
        shadow_teacher = None
        if teacher is not None and not _is_async_callable(teacher):
            def shadow_teacher(_req: ChatRequest) -> Any:  # shadow evaluation runs on its own background thread
                return teacher(body, authorization)

        call, answer = await anyio.to_thread.run_sync(route, request, shadow_teacher)
        if answer is None:
            if teacher is None:
                raise OpenAIError(503, "This request needs the teacher, but the server has none.", type="server_error",
                                  code="no_teacher", hint="Start it with 'aad serve --teacher-url URL'.")
            call.start_teacher()
            raw = await call_teacher(body, authorization)
            try:
                message, usage, teacher_model = teacher_result(raw)
            except Exception as err:
                log.warning("the teacher's answer could not be read: %r: %s", err, repr(raw)[:2000])
                raise TeacherError("The teacher's answer is not a readable chat completion.",
                                   code="teacher_bad_answer") from None
            answer = await call.afinish_teacher(message, usage, teacher_model, raw)
        completion = _completion(answer, str(model or ROUTED_MODEL))
        if body.get("stream"):
            return StreamingResponse(_sse(completion), media_type="text/event-stream")
        return completion

    return app


def serve(ws: Workspace, *, host: str = "127.0.0.1", port: int = 8000, teacher_url: str | None = None,
          teacher_model: str | None = None, preload: bool = True, api_key: str | None = None,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, teacher_concurrency: int = DEFAULT_TEACHER_CONCURRENCY,
          teacher_timeout_s: float | None = None, teacher: UpstreamTeacher | None = None) -> None:
    """Run the server with uvicorn until interrupted (``preload``: load and warm the specialists first;
    ``api_key`` None = ``$AAD_SERVE_API_KEY``; the other options as :func:`create_app` says). The teacher:
    ``teacher`` when given, else :func:`configured_teacher` of ``teacher_url`` / ``teacher_model`` /
    ``teacher_timeout_s`` and the workspace's ``[teacher]`` section."""
    import uvicorn

    from aad_core.serving.engine import RoutingEngine

    if teacher is None:
        teacher = configured_teacher(ws.config.teacher, url=teacher_url, model=teacher_model,
                                     timeout_s=teacher_timeout_s)
    engine = RoutingEngine(ws, teacher_model=teacher.model if teacher is not None else teacher_model)
    app = create_app(ws, teacher=teacher, engine=engine, preload=preload,
                     api_key=api_key if api_key is not None else os.environ.get(SERVE_KEY_ENV),
                     max_body_bytes=max_body_bytes, teacher_concurrency=teacher_concurrency)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        engine.close()
