"""Import recorded LLM calls from JSONL files, and export them again.

Formats (one JSON object per line):

``openai-chat``
    ``{"request": <chat-completions request body>, "response": <chat-completions response body>}``
    plus optional ``id``, ``created_at``, ``task``, ``latency_ms``, ``cost``, ``tags``, ``metadata``,
    ``session_id`` and ``user_id`` (else the request's ``user``, OpenAI's end-user id, is the user id).
``openai-ft``
    The OpenAI fine-tuning format: ``{"messages": [...], "tools": [...]}``; the final assistant
    message is the answer. Optional keys as for ``openai-chat``.
``aad``
    aad's own export: one :class:`~aad_core.schema.Trace` per line.

Lines without an ``id`` get one derived from their content, so importing a file twice adds nothing.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from aad_core.capture.convert import openai_user
from aad_core.errors import IngestError
from aad_core.schema import TokenLogprob, Trace, Usage

Format = Literal["openai-chat", "openai-ft", "aad"]
FORMATS: tuple[str, ...] = ("openai-chat", "openai-ft", "aad")
_ID_NAMESPACE = uuid.UUID("6f1c2a4e-7d0b-4c55-9a3e-0a4ad0000001")

_REQUEST_KEYS = {"messages", "tools"}
_META_KEYS = {"id", "created_at", "task", "latency_ms", "cost", "tags", "metadata", "feedback", "source", "session_id",
              "user_id"}


def content_id(obj: Any) -> str:
    """A deterministic trace id from a record's content."""
    return str(uuid.uuid5(_ID_NAMESPACE, json.dumps(obj, sort_keys=True, ensure_ascii=False)))


def _validation_message(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {err.error_count() - 1} more problems)" if err.error_count() > 1 else ""
    return f"field '{where}': {first['msg']} (got {first.get('input')!r:.80}){more}"


def _logprobs(choice: dict[str, Any]) -> list[TokenLogprob] | None:
    lp = choice.get("logprobs")
    if not isinstance(lp, dict) or not lp.get("content"):
        return None
    return [TokenLogprob.model_validate({k: v for k, v in tok.items() if k != "bytes"} | {
        "top_logprobs": [{"token": a["token"], "logprob": a["logprob"]} for a in tok.get("top_logprobs") or []]
    }) for tok in lp["content"]]


def parse_openai_chat(obj: dict[str, Any]) -> Trace:
    if "request" not in obj or "response" not in obj:
        missing = [k for k in ("request", "response") if k not in obj]
        raise ValueError(
            f"missing key(s) {missing}; expected an object with 'request' (a chat-completions request "
            f"body) and 'response' (a chat-completions response body), got keys {sorted(obj)}"
        )
    req, resp = obj["request"], obj["response"]
    if not isinstance(req, dict) or not isinstance(req.get("messages"), list):
        raise ValueError("'request.messages' must be a list of chat messages")
    if not isinstance(resp, dict) or not isinstance(resp.get("choices"), list) or not resp["choices"]:
        raise ValueError("'response.choices' must be a non-empty list")
    choice = resp["choices"][0]
    if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
        raise ValueError("'response.choices[0].message' must be an object")
    params = {k: v for k, v in req.items() if k not in _REQUEST_KEYS}
    usage = resp.get("usage")
    meta = {k: obj[k] for k in _META_KEYS if k in obj}
    if meta.get("user_id") is None:
        meta["user_id"] = openai_user(req)  # OpenAI's end-user id (it stays a request parameter too)
    fields: dict[str, Any] = {
        "id": meta.pop("id", None) or content_id({"request": req, "response": resp}),
        "source": meta.pop("source", "openai-chat"),
        "model": resp.get("model") or req.get("model"),
        "request": {"messages": req["messages"], "tools": req.get("tools"), "params": params},
        "response": choice["message"],
        "usage": Usage.model_validate({k: usage.get(k, 0) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}) if isinstance(usage, dict) else None,
        "teacher_logprobs": _logprobs(choice),
        **meta,
    }
    return Trace.model_validate({k: v for k, v in fields.items() if v is not None})


def parse_openai_ft(obj: dict[str, Any]) -> Trace:
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"expected an object with a non-empty 'messages' list, got keys {sorted(obj)}")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        role = last.get("role") if isinstance(last, dict) else type(last).__name__
        raise ValueError(f"the last message must be the assistant's answer (role 'assistant'), got role {role!r}")
    meta = {k: obj[k] for k in _META_KEYS if k in obj}
    return Trace.model_validate(
        {
            "id": meta.pop("id", None) or content_id({"messages": messages, "tools": obj.get("tools")}),
            "source": meta.pop("source", "openai-ft"),
            "request": {"messages": messages[:-1], "tools": obj.get("tools")},
            "response": last,
            **meta,
        }
    )


def parse_aad(obj: dict[str, Any]) -> Trace:
    return Trace.model_validate(obj)


_PARSERS = {"openai-chat": parse_openai_chat, "openai-ft": parse_openai_ft, "aad": parse_aad}


@dataclass
class IngestResult:
    traces: list[Trace] = field(default_factory=list)
    errors: list[IngestError] = field(default_factory=list)
    lines: int = 0


def read_jsonl(path: Path, fmt: str) -> IngestResult:
    """Parse every line of ``path``; collect the valid traces and one error per invalid line."""
    if fmt not in _PARSERS:
        raise ValueError(f"The 'format' parameter of read_jsonl must be one of {FORMATS}. Got {fmt!r} instead.")
    parse = _PARSERS[fmt]
    result = IngestResult()
    hint = f"Fix the line, or pass --skip-invalid to import the valid lines only (format: {fmt})."
    try:
        handle = path.open("rb")  # lines decoded one by one: one bad byte costs its line, not the file
    except OSError as err:
        raise IngestError(f"cannot open: {err.strerror}", location=str(path), hint="Check the path.") from None
    with handle:
        for lineno, raw in enumerate(handle, 1):
            loc = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                if raw.strip():
                    result.lines += 1
                    result.errors.append(IngestError(
                        f"not valid UTF-8: byte 0x{raw[err.start]:02x} at column {err.start + 1}", location=loc,
                        hint=f"Save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8). {hint}"))
                continue
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark
            if not line.strip():
                continue
            result.lines += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                result.errors.append(IngestError(f"not valid JSON: {err.msg} at column {err.colno}", location=loc, hint=hint))
                continue
            except RecursionError:
                result.errors.append(IngestError("not readable JSON: nested too deep", location=loc, hint=hint))
                continue
            if not isinstance(obj, dict):
                result.errors.append(IngestError(f"expected a JSON object, got {type(obj).__name__}", location=loc, hint=hint))
                continue
            try:
                result.traces.append(parse(obj))
            except ValidationError as err:
                result.errors.append(IngestError(_validation_message(err), location=loc, hint=hint))
            except (ValueError, TypeError, KeyError, AttributeError) as err:
                result.errors.append(IngestError(str(err), location=loc, hint=hint))
            except RecursionError:
                result.errors.append(IngestError("a record nested too deep to read", location=loc, hint=hint))
    return result


def iter_paths(paths: list[Path]) -> Iterator[Path]:
    """Files as given; folders expand to their ``*.jsonl`` files (sorted)."""
    for p in paths:
        if p.is_dir():
            yield from sorted(p.rglob("*.jsonl"))
        else:
            yield p


# -- export --------------------------------------------------------------------------------------

def to_openai_ft(trace: Trace) -> dict[str, Any]:
    messages = [m.model_dump(exclude_none=True) for m in trace.request.messages]
    if trace.response is not None:
        messages.append(trace.response.model_dump(exclude_none=True))
    out: dict[str, Any] = {"messages": messages}
    if trace.request.tools:
        out["tools"] = trace.request.tools
    return out


def to_aad(trace: Trace) -> dict[str, Any]:
    return json.loads(trace.model_dump_json(exclude_none=True))


EXPORTERS = {"openai-ft": to_openai_ft, "aad": to_aad}
