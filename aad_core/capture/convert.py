"""Small conversions shared by the capture integrations (LangChain, LlamaIndex, router)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, get_args

from aad_core.schema import Message, Role, TokenLogprob, TopLogprob, Usage, check_identity

_PRIMITIVES = (str, int, float, bool, type(None))


def json_safe(value: Any, _depth: int = 0) -> Any:
    """``value`` with everything that JSON cannot hold replaced by its ``repr`` (params and
    metadata can carry classes, clients, callables)."""
    if isinstance(value, _PRIMITIVES):
        return value
    if _depth > 20:
        return repr(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v, _depth + 1) for v in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump) and isinstance(value, object) and not isinstance(value, type):
        try:
            return json_safe(dump(), _depth + 1)
        except Exception:
            pass
    return repr(value)


def openai_tool(tool: Any) -> dict[str, Any]:
    """A bound tool as an OpenAI ``{"type": "function", "function": {...}}`` schema."""
    if isinstance(tool, Mapping):
        if tool.get("type") == "function" and "function" in tool:
            return json_safe(tool)
        if "name" in tool and ("parameters" in tool or "description" in tool):
            return {"type": "function", "function": json_safe(tool)}
        return json_safe(tool)
    return {"type": "function", "function": {"name": str(getattr(tool, "name", repr(tool)))}}


def arguments_json(args: Any) -> str:
    """Tool-call arguments as the JSON string the OpenAI format uses."""
    if isinstance(args, str):
        return args
    return json.dumps(json_safe(args if args is not None else {}), ensure_ascii=False)


def openai_logprobs(logprobs: Any) -> list[TokenLogprob] | None:
    """OpenAI-style ``{"content": [{"token", "logprob", "top_logprobs": [...]}, ...]}`` (or the
    bare list) as teacher log-probs; None when absent or not in that shape."""
    if isinstance(logprobs, Mapping):
        logprobs = logprobs.get("content")
    if not isinstance(logprobs, list) or not logprobs:
        return None
    out = []
    for tok in logprobs:
        if not isinstance(tok, Mapping) or "token" not in tok or "logprob" not in tok:
            return None
        tops = [
            TopLogprob(token=str(a["token"]), logprob=float(a["logprob"]))
            for a in tok.get("top_logprobs") or []
            if isinstance(a, Mapping) and "token" in a and "logprob" in a
        ]
        out.append(TokenLogprob(token=str(tok["token"]), logprob=float(tok["logprob"]), top_logprobs=tops))
    return out


#: Other names for OpenAI's roles: Cohere's "chatbot", Gemini's "model".
ROLE_ALIASES = {"chatbot": "assistant", "model": "assistant"}


def openai_role(role: Any) -> Role:
    """The OpenAI chat role for a framework's ``role`` (a string or an enum): an alias reads as
    "assistant", and a role OpenAI does not have (``ChatMessage(role="critic")``) as "user"."""
    name = str(getattr(role, "value", role))
    name = ROLE_ALIASES.get(name, name)
    return name if name in get_args(Role) else "user"  # type: ignore[return-value]


def message_from_openai(raw: Mapping[str, Any]) -> Message:
    """One message in the OpenAI chat form (LangChain's ``convert_to_openai_messages``) in aad's
    schema: its role as :func:`openai_role` reads it, and a message the schema refuses keeps its
    text, for the call must be captured and answered either way."""
    fields = {k: v for k, v in raw.items() if v is not None}
    fields["role"] = openai_role(fields.get("role"))
    try:
        return Message.model_validate(fields)
    except ValueError:
        content = fields.get("content")
        return Message(role=fields["role"], content=content if isinstance(content, str) else json.dumps(content))


def usage_from(data: Any) -> Usage | None:
    """Token usage from LangChain ``usage_metadata`` (input/output_tokens) or an OpenAI
    ``usage`` dict (prompt/completion_tokens)."""
    if not isinstance(data, Mapping) or not data:
        return None
    prompt = data.get("input_tokens", data.get("prompt_tokens"))
    completion = data.get("output_tokens", data.get("completion_tokens"))
    if prompt is None and completion is None:
        return None
    prompt, completion = int(prompt or 0), int(completion or 0)
    total = int(data.get("total_tokens") or prompt + completion)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total)


#: Metadata keys naming the conversation a call belongs to, first found wins: LangSmith's thread keys
#: (``session_id``, ``thread_id``, ``conversation_id``); LangGraph copies ``configurable.thread_id`` there.
SESSION_KEYS = ("session_id", "thread_id", "conversation_id")
#: Metadata keys naming the application's end user.
USER_KEYS = ("user_id",)


def _first_identity(sources: tuple[Mapping[str, Any] | None, ...], keys: tuple[str, ...], name: str) -> str | None:
    for source in sources:
        if not isinstance(source, Mapping):
            continue
        for key in keys:
            try:
                value = check_identity(source.get(key), name)
            except ValueError:  # not usable as an id (too long, control characters, not text): look further
                continue
            if value is not None:
                return value
    return None


def identity_from(*sources: Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    """``(session_id, user_id)`` from metadata mappings, nearest first (the call's, then its enclosing
    runs'): the first valid value of :data:`SESSION_KEYS` / :data:`USER_KEYS`. A value that is no valid
    id (aad_core.schema.check_identity) is skipped, so a capture handler never fails on it."""
    return _first_identity(sources, SESSION_KEYS, "session_id"), _first_identity(sources, USER_KEYS, "user_id")


def openai_user(params: Mapping[str, Any] | None) -> str | None:
    """OpenAI's ``user`` request parameter (the end user's id) when it is a valid id, else None."""
    return _first_identity((params,), ("user",), "user_id")


def request_identity(params: Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    """``(session_id, user_id)`` of a chat-completions request's parameters (``aad serve``, the routing
    engine's traces): its ``metadata`` object's :data:`SESSION_KEYS` / :data:`USER_KEYS`, and for the user
    OpenAI's ``user`` parameter when the metadata names none (as ``aad ingest`` reads a record)."""
    if not isinstance(params, Mapping):
        return None, None
    meta = params.get("metadata")
    session_id, user_id = identity_from(meta if isinstance(meta, Mapping) else None)
    return session_id, user_id if user_id is not None else openai_user(params)
