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
never hold the teacher's URL nor its response body: those are logged (WARNING) on the server.

Keys. With ``api_key`` (``aad serve --api-key``, ``$AAD_SERVE_API_KEY``) every ``/v1/...`` route needs
``Authorization: Bearer <that key>`` (``/health`` stays open). The key that reaches the teacher is
the server's teacher key (``$AAD_TEACHER_API_KEY``) when set; without one, the client's own
``Authorization`` header is forwarded, but only when the server has no ``api_key``: with one, that
header holds aad's key and is never sent upstream (set ``$AAD_TEACHER_API_KEY`` then).

Teacher calls are made with an async HTTP client, at most ``teacher_concurrency`` at once (the rest
wait without holding a thread), so slow teacher calls never starve ``/health`` or the specialists.

Needs ``pip install 'aad[serve]'`` (FastAPI, uvicorn, httpx).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import inspect
import json
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from aad_core.config import TEACHER_KEY_ENV  # re-exported: the variable aad serve reads
from aad_core.errors import AADError
from aad_core.schema import ChatRequest, Message, RoutingDecision, Usage

try:  # endpoint annotations are resolved from this module's globals
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect
    from starlette.types import ASGIApp, Receive, Scope, Send
except ImportError as _err:  # pragma: no cover - depends on the installed extras
    raise AADError(f"'aad serve' needs FastAPI: {_err}", hint="pip install 'aad[serve]'") from None

if TYPE_CHECKING:
    from aad_core.serving.engine import RoutedAnswer, RoutingEngine
    from aad_core.serving.routed_call import RoutedCall
    from aad_core.workspace import Workspace

log = logging.getLogger(__name__)

ROUTED_MODEL = "aad-routed"
SERVE_KEY_ENV = "AAD_SERVE_API_KEY"
#: Largest request body accepted (bytes); larger ones get HTTP 413.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
#: Teacher calls in flight at once; further ones wait (on the event loop, holding no thread).
DEFAULT_TEACHER_CONCURRENCY = 16
DEFAULT_TEACHER_TIMEOUT_S = 120.0
# An oversized body is still read (and dropped) up to this many bytes, so that the client gets its 413
# instead of a connection reset while it is sending; beyond it the connection is closed.
_DRAIN_BYTES = 32 * 1024 * 1024
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


class OpenAIError(AADError):
    """An error answered as OpenAI's error object with HTTP ``status``; its message (and hint) is what
    the client reads, so it must never hold internal URLs or upstream bodies."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status, self.type, self.param, self.code = status, type, param, code

    def client_message(self) -> str:
        return self.message if not self.hint else f"{self.message} {self.hint}"


class TeacherError(OpenAIError):
    """The teacher failed: 502 (unreachable, an HTTP error, not a chat completion) or 504 (timed out)."""

    def __init__(self, message: str, *, status: int = 502, code: str = "teacher_error",
                 hint: str | None = None) -> None:
        super().__init__(status, message, type="upstream_error", code=code, hint=hint)


def error_response(status: int, message: str, kind: str = "invalid_request_error", *, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error object with HTTP ``status``."""
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


def _openai_error_response(err: OpenAIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return error_response(err.status, err.client_message(), err.type, param=err.param, code=err.code, headers=headers)


class _ErrorsAsJSON:
    """ASGI middleware: an exception no handler took becomes a 500 in OpenAI's shape (logged with its
    traceback), never Starlette's plain-text page or a dropped connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception:
            log.exception("aad serve: unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:  # a streamed answer already under way: nothing else can be sent
                raise
            await _internal_error()(scope, receive, send)


def _internal_error() -> JSONResponse:
    return error_response(500, "The aad server failed on this request (an internal error; the server log has the "
                          "traceback). Retry it, and report it if it persists.", "server_error", code="internal_error")


# -- the teacher -------------------------------------------------------------------------------------
class UpstreamTeacher:
    """Calls an OpenAI-compatible ``{base_url}/chat/completions`` with httpx: :meth:`acall` (async, what
    the server uses) or the instance itself (sync: shadow evaluation, other callers).

    Parameters
    ----------
    base_url : str
        e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:11434/v1``.
    model : str or None
        Model name sent upstream (None = the client's ``model`` field).
    api_key : str or None
        The teacher's bearer token (None = ``$AAD_TEACHER_API_KEY``; when neither is set, the
        ``authorization`` the caller passes, which the server sets only when it has no key of its own).
    timeout_s : float
        Upstream request timeout; a call that runs out of it is :class:`TeacherError` 504.
    transport : httpx transport or None
        For tests (e.g. ``httpx.MockTransport``, used by the async client too when it can).

    Failures raise :class:`TeacherError`, whose message names neither the URL nor the upstream body
    (both are logged at WARNING).
    """

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout_s: float = DEFAULT_TEACHER_TIMEOUT_S, transport: Any = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get(TEACHER_KEY_ENV)
        self.timeout_s = timeout_s
        self.transport = transport
        self._client: Any = None
        self._aclient: Any = None
        self._aclient_loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def client(self) -> Any:
        if self._client is None:
            import httpx

            self._client = httpx.Client(timeout=self.timeout_s, transport=self.transport)
        return self._client

    def aclient(self) -> Any:
        """The async client of the running event loop (one per loop: an httpx pool cannot move between loops)."""
        loop = asyncio.get_running_loop()
        if self._aclient is None or self._aclient_loop is not loop:
            import httpx

            transport = self.transport if hasattr(self.transport, "handle_async_request") else None
            self._aclient = httpx.AsyncClient(timeout=self.timeout_s, transport=transport)
            self._aclient_loop = loop
        return self._aclient

    async def aclose(self) -> None:
        if self._aclient is not None and self._aclient_loop is asyncio.get_running_loop():
            await self._aclient.aclose()
        self._aclient = self._aclient_loop = None

    def _prepare(self, body: dict[str, Any], authorization: str | None) -> tuple[dict[str, Any], dict[str, str]]:
        payload = {**body, "stream": False}
        payload.pop("aad", None)
        payload.pop("stream_options", None)  # only valid with stream: true
        if self.model:
            payload["model"] = self.model
        headers = {"Content-Type": "application/json"}
        auth = f"Bearer {self.api_key}" if self.api_key else authorization
        if auth:
            headers["Authorization"] = auth
        return payload, headers

    def _failed(self, err: Exception) -> TeacherError:
        import httpx

        if isinstance(err, httpx.TimeoutException):
            log.warning("teacher %s timed out after %g s: %r", self.url, self.timeout_s, err)
            return TeacherError(f"The teacher did not answer within {self.timeout_s:g} s.", status=504,
                                code="teacher_timeout", hint="Retry later, or start 'aad serve' with a larger "
                                "--teacher-timeout.")
        log.warning("teacher %s could not be reached: %r", self.url, err)
        return TeacherError("The teacher could not be reached.",
                            hint="The server log names the cause; check --teacher-url and that the teacher is up.")

    def _parse(self, resp: Any) -> dict[str, Any]:
        if resp.status_code >= 400:
            log.warning("teacher %s answered HTTP %s: %s", self.url, resp.status_code, resp.text[:2000])
            hint = ("Check the key that reaches the teacher ($AAD_TEACHER_API_KEY on the server, else the client's "
                    "key when the server has no --api-key)." if resp.status_code in (401, 403)
                    else "The server log holds the teacher's answer.")
            raise TeacherError(f"The teacher answered HTTP {resp.status_code}.", code="teacher_http_error", hint=hint)
        try:
            data = resp.json()
        except ValueError:
            log.warning("teacher %s answered HTTP %s with a body that is not JSON: %r", self.url, resp.status_code,
                        resp.text[:2000])
            raise TeacherError("The teacher's answer is not JSON (expected an OpenAI chat completion).",
                               code="teacher_bad_answer", hint="Check that --teacher-url points at an "
                               "OpenAI-compatible /v1 base URL.") from None
        return checked_completion(data, where=self.url)

    def __call__(self, body: dict[str, Any], authorization: str | None = None) -> dict[str, Any]:
        import httpx

        payload, headers = self._prepare(body, authorization)
        try:
            resp = self.client().post(self.url, json=payload, headers=headers)
        except httpx.HTTPError as err:
            raise self._failed(err) from None
        return self._parse(resp)

    async def acall(self, body: dict[str, Any], authorization: str | None = None) -> dict[str, Any]:
        import httpx

        payload, headers = self._prepare(body, authorization)
        try:
            resp = await self.aclient().post(self.url, json=payload, headers=headers)
        except httpx.HTTPError as err:
            raise self._failed(err) from None
        return self._parse(resp)


def checked_completion(data: Any, *, where: str = "the teacher") -> Any:
    """``data`` when it is an OpenAI chat completion with a first choice holding a message (or, from an
    injected teacher callable, a Message / string / (Message, Usage)); else :class:`TeacherError` 502."""
    if not isinstance(data, dict):
        if isinstance(data, (Message, str, tuple)):
            return data
        why = f"a JSON {type(data).__name__}, not an object"
    else:
        choices = data.get("choices")
        first = choices[0] if isinstance(choices, list) and choices else None
        if first is None:
            why = "no 'choices'" if "choices" not in data else "'choices' is not a non-empty list"
        elif not isinstance(first, dict) or not isinstance(first.get("message"), dict):
            why = "'choices[0].message' is not an object"
        else:
            return data
    log.warning("%s answered something that is not a chat completion (%s): %s", where, why, repr(data)[:2000])
    raise TeacherError(f"The teacher's answer is not a chat completion ({why}).", code="teacher_bad_answer",
                       hint="Check that --teacher-url points at an OpenAI-compatible /v1 base URL.")


# -- request bodies -------------------------------------------------------------------------------------
def _bad(param: str | None, message: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def _kind(value: Any) -> str:
    """A JSON type name for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object" if isinstance(value, dict) else type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_NUMBER_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0)}
_BOOLEANS = ("stream", "logprobs", "parallel_tool_calls", "store")
_OBJECTS = ("stream_options", "metadata", "logit_bias")


def _check_params(body: dict[str, Any]) -> None:
    """400 for a parameter of the wrong type or out of range (null is accepted as "not given", as OpenAI does)."""
    def given(key: str) -> bool:
        return body.get(key) is not None

    if given("model") and not isinstance(body["model"], str):
        raise _bad("model", f"'model' must be a string, got {_kind(body['model'])}.", "invalid_type")
    if given("user") and not isinstance(body["user"], str):
        raise _bad("user", f"'user' must be a string, got {_kind(body['user'])}.", "invalid_type")
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (not _is_int(value) or value < 1):
            raise _bad(key, f"'{key}' must be a positive integer, got {_short(value)}.",
                       "invalid_type" if not _is_int(value) else "invalid_value")
    for key, (low, high) in _NUMBER_RANGES.items():
        value = body.get(key)
        if value is not None and not (_is_number(value) and low <= value <= high):
            raise _bad(key, f"'{key}' must be a number from {low:g} to {high:g}, got {_short(value)}.",
                       "invalid_type" if not _is_number(value) else "invalid_value")
    for key in _BOOLEANS:
        if given(key) and not isinstance(body[key], bool):
            raise _bad(key, f"'{key}' must be true or false, got {_short(body[key])}.", "invalid_type")
    for key in _OBJECTS:
        if given(key) and not isinstance(body[key], dict):
            raise _bad(key, f"'{key}' must be an object, got {_kind(body[key])}.", "invalid_type")
    if given("n") and not (_is_int(body["n"]) and body["n"] == 1):
        raise _bad("n", f"'n' must be 1 (aad serve answers one choice per request), got {_short(body['n'])}.")
    if given("seed") and not _is_int(body["seed"]):
        raise _bad("seed", f"'seed' must be an integer, got {_short(body['seed'])}.", "invalid_type")
    if given("top_logprobs") and not (_is_int(body["top_logprobs"]) and 0 <= body["top_logprobs"] <= 20):
        raise _bad("top_logprobs",
                   f"'top_logprobs' must be an integer from 0 to 20, got {_short(body['top_logprobs'])}.")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _bad("stop", f"'stop' must be a string or an array of strings, got {_short(stop)}.", "invalid_type")
        if len(stop) > 4:
            raise _bad("stop", f"'stop' holds at most 4 sequences, got {len(stop)}.")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and isinstance(fmt.get("type"), str)):
        raise _bad("response_format", "'response_format' must be an object with a string 'type' (e.g. "
                   f"{{\"type\": \"json_object\"}}), got {_short(fmt)}.", "invalid_type")
    _check_tools(body)


def _check_tools(body: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("tools", f"'tools' must be an array of tool objects, got {_kind(tools)}.", "invalid_type")
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not (isinstance(tool, dict) and tool.get("type", "function") == "function" and isinstance(fn, dict)
                    and isinstance(fn.get("name"), str) and isinstance(fn.get("parameters", {}), (dict, type(None)))):
                raise _bad(f"tools[{i}]", f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{\"name\": "
                           f"string, \"parameters\": object}}}}, got {_short(tool)}.", "invalid_type")
    choice = body.get("tool_choice")
    if choice is not None and not (choice in ("none", "auto", "required") or isinstance(choice, dict)):
        raise _bad("tool_choice", f"'tool_choice' must be \"none\", \"auto\", \"required\" or an object, got "
                   f"{_short(choice)}.")


def _check_messages(body: dict[str, Any]) -> list[Message]:
    messages = body.get("messages")
    if messages is None:
        raise _bad("messages", "'messages' is missing: give a non-empty array of chat messages, e.g. "
                   "[{\"role\": \"user\", \"content\": \"Hello\"}].", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty array of chat messages ({\"role\": ..., \"content\": "
                   f"...}}), got {_short(messages)}.",
                   "invalid_type" if not isinstance(messages, list) else "invalid_value")
    out: list[Message] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, f"'{where}' must be an object with 'role' and 'content', got {_kind(m)}.", "invalid_type")
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(f"{where}.role", f"'{where}.role' must be one of {', '.join(sorted(_ROLES))}, got "
                       f"{_short(role)}.")
        content = m.get("content")
        if content is None and role != "assistant":
            raise _bad(f"{where}.content", f"'{where}.content' is missing: a {role} message needs a string or an "
                       "array of content parts.", "missing_required_parameter")
        if content is not None and not isinstance(content, str):
            if not isinstance(content, list) or not all(isinstance(p, dict) and isinstance(p.get("type"), str)
                                                        for p in content):
                raise _bad(f"{where}.content", f"'{where}.content' must be a string or an array of content parts "
                           f"({{\"type\": \"text\", \"text\": ...}}), got {_short(content)}.", "invalid_type")
        try:
            out.append(Message.model_validate({k: v for k, v in m.items() if v is not None}))
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(p) for p in first.get("loc", ()))
            param = f"{where}.{loc}" if loc else where
            raise _bad(param, f"'{param}' is invalid: {first.get('msg', 'wrong type')}.", "invalid_type") from None
    return out


def _short(value: Any, limit: int = 80) -> str:
    """``value`` as JSON, cut to ``limit`` characters (error messages never echo a whole body)."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError, RecursionError):
        text = _kind(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_chat_body(body: dict[str, Any]) -> ChatRequest:
    """The :class:`ChatRequest` of a chat-completions body, or :class:`OpenAIError` 400 naming the
    parameter that is wrong and what it should be."""
    messages = _check_messages(body)
    _check_params(body)
    params = {k: v for k, v in body.items() if k not in ("messages", "tools", "stream", "stream_options")}
    try:
        return ChatRequest(messages=messages, tools=body.get("tools") or None, params=params)
    except (ValidationError, RecursionError) as err:
        raise _bad(None, f"The request is invalid: {str(err).splitlines()[0][:200]}.") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""  # an empty async generator


async def read_json_body(request: Request, max_bytes: int) -> dict[str, Any]:
    """The request's body as a JSON object: 413 over ``max_bytes``, 400 when it is not UTF-8 JSON
    holding an object."""
    declared = (request.headers.get("content-length") or "0").strip()
    if not (declared.isascii() and declared.isdigit()):
        raise _bad(None, f"The Content-Length header {declared[:40]!r} is not a number.", "invalid_header")
    drain = max(_DRAIN_BYTES, max_bytes)
    declared_bytes = int(declared) if len(declared) <= 18 else 10**18
    chunks: list[bytes] = []
    size = declared_bytes if declared_bytes > drain else 0  # too big to drain: answered at once
    try:
        async for chunk in (request.stream() if size <= drain else _nothing()):
            size += len(chunk)
            if size <= max_bytes:
                chunks.append(chunk)
            elif size > drain:
                break
    except ClientDisconnect:  # nobody reads the answer: no traceback in the log for it
        raise _bad(None, "The client closed the connection before the request body was complete.",
                   "client_disconnected") from None
    if size > max_bytes:
        shown = f"more than {drain:,}" if size > drain else f"{size:,}"
        raise OpenAIError(413, f"The request body is {shown} bytes; this "
                          f"server accepts at most {max_bytes:,}.", code="request_too_large",
                          hint="Send a shorter conversation, or start 'aad serve' with a larger --max-body-bytes.")
    raw = b"".join(chunks)
    if not raw.strip():
        raise _bad(None, "The request body is empty; expected a JSON object such as {\"model\": \"aad-routed\", "
                   "\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}.", "invalid_json")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _bad(None, f"The request body is not valid UTF-8 (byte {err.start}): send JSON encoded as UTF-8.",
                   "invalid_json") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise _bad(None, f"The request body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}.",
                   "invalid_json") from None
    except (ValueError, RecursionError) as err:  # NaN / Infinity, a number too long, nesting too deep
        why = "it is nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise _bad(None, f"The request body is not valid JSON: {why}.", "invalid_json") from None
    if not isinstance(body, dict):
        raise _bad(None, f"The request body must be a JSON object, got {_kind(body)}.", "invalid_type")
    try:  # a lone surrogate (\ud800) parses, but is no text: it could be neither forwarded nor stored
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise _bad(None, f"The request holds an invalid Unicode escape ({err.object[err.start:err.end]!a}, a lone "
                   "surrogate): send valid text.") from None
    except RecursionError:
        raise _bad(None, "The request body is nested too deeply.", "invalid_json") from None
    return body


# -- answers ----------------------------------------------------------------------------------------------
def estimate_prompt_tokens(request: ChatRequest) -> int:
    """About how many tokens ``request``'s prompt is, for a specialist whose backend cannot count them:
    4 characters per token (OpenAI's rule of thumb for English) plus 4 tokens per message for the chat
    template's role markers, bound tools counted as their JSON."""
    chars = sum(len(m.text()) for m in request.messages)
    if request.tools:
        chars += len(json.dumps(request.tools, ensure_ascii=False))
    return math.ceil(chars / 4) + 4 * len(request.messages)


def specialist_prompt_tokens(engine: RoutingEngine, name: str | None, request: ChatRequest) -> int:
    """The prompt tokens of ``request`` for specialist ``name``: counted by its backend's
    ``prompt_tokens(name, request)`` (its tokenizer and chat template) when it has one, else estimated."""
    count = getattr(engine.specialists, "prompt_tokens", None) if name else None
    if callable(count):
        try:
            n = count(name, request)
            if n is not None:
                return int(n)
        except Exception as err:  # counting must never fail the answer
            log.warning("could not count the prompt tokens of specialist %s: %s", name, err)
    return estimate_prompt_tokens(request)


def _with_prompt_tokens(answer: RoutedAnswer, prompt_tokens: int) -> RoutedAnswer:
    done = answer.usage.completion_tokens
    return dataclasses.replace(answer, usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=done,
                                                   total_tokens=prompt_tokens + done))


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


class _TeacherGate:
    """At most ``n`` teacher calls in flight; the others wait on the event loop. Its primitives belong to
    one event loop, so they are made again when the app runs on another (each TestClient has its own)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._loop: asyncio.AbstractEventLoop | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._threads: anyio.CapacityLimiter | None = None

    def current(self) -> tuple[asyncio.Semaphore, anyio.CapacityLimiter]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._semaphore is None or self._threads is None:
            # Sync teacher callables run on their own threads, never taking the ones the handlers need.
            self._loop, self._semaphore, self._threads = loop, asyncio.Semaphore(self.n), anyio.CapacityLimiter(self.n)
        return self._semaphore, self._threads


def _is_async_callable(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


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
        """Decide and try the specialist (a worker thread: the runtime batches concurrent requests)."""
        call = engine.route_call(request, teacher_call=shadow_teacher)
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
        decisions = await anyio.to_thread.run_sync(engine.decide, [request])
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
          teacher_timeout_s: float = DEFAULT_TEACHER_TIMEOUT_S) -> None:
    """Run the server with uvicorn until interrupted (``preload``: load and warm the specialists first;
    ``api_key`` None = ``$AAD_SERVE_API_KEY``; the other options as :func:`create_app` says)."""
    import uvicorn

    from aad_core.serving.engine import RoutingEngine

    teacher = UpstreamTeacher(teacher_url, teacher_model, timeout_s=teacher_timeout_s) if teacher_url else None
    engine = RoutingEngine(ws, teacher_model=teacher_model)
    app = create_app(ws, teacher=teacher, engine=engine, preload=preload,
                     api_key=api_key if api_key is not None else os.environ.get(SERVE_KEY_ENV),
                     max_body_bytes=max_body_bytes, teacher_concurrency=teacher_concurrency)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        engine.close()
