"""Reading and checking a chat-completions request of ``aad serve``: :func:`read_json_body` (the body
as a JSON object, 413 when too large) and :func:`parse_chat_body` (the :class:`ChatRequest`, or a 400
naming the parameter that is wrong and what it should be). Failures are
:class:`~aad_core.serving.openai_errors.OpenAIError`; their messages never echo a whole body.

Needs ``pip install 'aad[serve]'`` (FastAPI).
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Mapping
from typing import Any, get_args

from aad_core.errors import AADError
from aad_core.schema import ChatRequest, Message, Role
from aad_core.serving.openai_errors import OpenAIError

try:
    from fastapi import Request
    from pydantic import ValidationError
    from starlette.requests import ClientDisconnect
except ImportError as _err:  # pragma: no cover - depends on the installed extras
    raise AADError(f"'aad serve' needs FastAPI: {_err}", hint="pip install 'aad[serve]'") from None

# An oversized body is still read (and dropped) up to this many bytes, so that the client gets its 413
# instead of a connection reset while it is sending; beyond it the connection is closed.
_DRAIN_BYTES = 32 * 1024 * 1024
_ROLES = frozenset(get_args(Role))


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


def max_new_tokens(params: Mapping[str, Any], default: int) -> int:
    """The answer's token budget a request asks for: ``max_tokens``, ``max_completion_tokens`` (newer
    OpenAI clients) or ``max_new_tokens``, else ``default``."""
    return int(params.get("max_tokens") or params.get("max_completion_tokens") or params.get("max_new_tokens")
               or default)


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

