"""Import LLM spans from OpenTelemetry traces in OTLP JSON (``aad ingest --format otlp-json``).

A team that already traces its agent with OpenTelemetry can distil from what it has. Input: OTLP
JSON as the OTel Collector's file exporter and ``OTLPSpanExporter`` payloads write it: one
``{"resourceSpans": [...]}`` document per file or per line (JSON Lines); a bare list of spans also
works. Trace and span ids may be hex (OTLP JSON) or base64 (protobuf's JSON mapping, e.g.
``MessageToJson`` of the SDK's own OTLP encoder); both become hex. The Python SDK's
``ConsoleSpanExporter`` / ``ReadableSpan.to_json()`` form (``context.trace_id = "0x..."``, ISO
``start_time``, a plain ``attributes`` mapping) is read too. Every span that describes one LLM call becomes one trace; other spans (chains, tools,
retrievers) are counted and skipped.

Two attribute conventions are read:

* **OpenInference** (Arize; its LangChain, LlamaIndex and OpenAI instrumentations):
  ``openinference.span.kind = "LLM"``, ``llm.model_name``, ``llm.input_messages.<i>.message.role``
  / ``.content`` / ``.contents.<j>.message_content.text`` / ``.tool_calls.<k>.tool_call.{id,
  function.name, function.arguments}`` / ``.tool_call_id`` / ``.name``, the same under
  ``llm.output_messages``, ``llm.tools.<i>.tool.json_schema``, ``llm.invocation_parameters``,
  ``llm.token_count.{prompt, completion, total}``, ``metadata``, ``tag.tags``;
* **OpenTelemetry GenAI semantic conventions**: ``gen_ai.request.model`` / ``gen_ai.response.model``,
  ``gen_ai.usage.{input,output}_tokens``, messages as ``gen_ai.input.messages`` /
  ``gen_ai.output.messages`` (JSON, parts) or the older ``gen_ai.prompt.<i>.{role,content}`` /
  ``gen_ai.completion.<i>.*``.

Latency is the span's end minus its start; ``created_at`` its start; an ERROR status makes an
``error`` trace. The trace id is derived from the OTel trace and span ids, so importing a file
twice adds nothing; the span id is the trace's ``run_id``, its parent span the ``parent_run_id``,
and the OTel trace id is kept in ``metadata["otel_trace_id"]``. A ``metadata`` key ``aad_task``
(OpenInference metadata) becomes the trace's task.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aad_core.capture.convert import identity_from
from aad_core.errors import IngestError
from aad_core.schema import ChatRequest, FunctionCall, Message, ToolCall, Trace, Usage

FORMAT_NAMES = ("otlp-json", "otel")
_ID_NAMESPACE = uuid.UUID("6f1c2a4e-7d0b-4c55-9a3e-0a4ad0000003")


def _value(v: Any) -> Any:
    """An OTLP ``AnyValue`` (``{"stringValue": ...}``, ``{"intValue": "3"}``, arrays...) as Python."""
    if not isinstance(v, dict):
        return v
    if "stringValue" in v:
        return v["stringValue"]
    if "intValue" in v:
        return int(v["intValue"])
    if "doubleValue" in v:
        return float(v["doubleValue"])
    if "boolValue" in v:
        return bool(v["boolValue"])
    if "arrayValue" in v:
        return [_value(x) for x in (v["arrayValue"] or {}).get("values", [])]
    if "kvlistValue" in v:
        return {kv["key"]: _value(kv.get("value")) for kv in (v["kvlistValue"] or {}).get("values", [])}
    if "bytesValue" in v:
        return v["bytesValue"]
    return None


def span_attributes(span: dict[str, Any]) -> dict[str, Any]:
    attrs = span.get("attributes") or []
    if isinstance(attrs, dict):  # already a mapping (some exporters)
        return dict(attrs)
    return {a["key"]: _value(a.get("value")) for a in attrs if isinstance(a, dict) and "key" in a}


_HEX = re.compile(r"[0-9a-fA-F]+")


def otel_id(value: Any, nbytes: int) -> str:
    """A trace (16 bytes) or span (8 bytes) id as lower-case hex, whether it was written as hex (OTLP
    JSON), ``0x``-prefixed hex (the SDK's ``to_json``) or base64 (protobuf's JSON mapping of the bytes
    field); "" when absent. Anything else is kept as written."""
    if value is None or value == "":
        return ""
    if isinstance(value, int):
        return format(value, f"0{2 * nbytes}x")
    text = str(value)
    if text.lower().startswith("0x"):
        text = text[2:]
    if len(text) == 2 * nbytes and _HEX.fullmatch(text):
        return text.lower()
    if len(text) == 4 * ((nbytes + 2) // 3):  # base64 of nbytes bytes
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) == nbytes:
            return raw.hex()
    return text


def _span_time_ns(span: dict[str, Any], which: str) -> int | None:
    """``startTimeUnixNano`` / ``endTimeUnixNano`` (OTLP), else the SDK ``to_json`` form's ISO
    ``start_time`` / ``end_time``."""
    nanos = _nanos(span.get(f"{which}TimeUnixNano"))
    if nanos is not None:
        return nanos
    iso = span.get(f"{which}_time")
    if not isinstance(iso, str) or not iso:
        return None
    try:
        when = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    delta = when - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def iter_spans(doc: Any) -> Iterator[dict[str, Any]]:
    """The spans of one OTLP JSON document (``resourceSpans`` / ``scopeSpans``), or of a list of spans."""
    if isinstance(doc, list):
        for item in doc:
            yield from iter_spans(item)
        return
    if not isinstance(doc, dict):
        return
    if "resourceSpans" in doc:
        for rs in doc.get("resourceSpans") or []:
            for ss in rs.get("scopeSpans") or rs.get("instrumentationLibrarySpans") or []:
                yield from ss.get("spans") or []
    elif "spanId" in doc or "span_id" in doc or isinstance(doc.get("context"), dict):
        yield doc


def _indexed(attrs: dict[str, Any], prefix: str) -> dict[int, dict[str, Any]]:
    """``prefix.<i>.rest`` keys grouped by i: ``{i: {rest: value}}``."""
    out: dict[int, dict[str, Any]] = {}
    head = prefix + "."
    for key, value in attrs.items():
        if not key.startswith(head):
            continue
        idx, _, rest = key[len(head):].partition(".")
        if idx.isdigit():
            out.setdefault(int(idx), {})[rest] = value
    return dict(sorted(out.items()))


def _oi_message(fields: dict[str, Any]) -> dict[str, Any]:
    """One OpenInference message (``message.*`` keys) as an OpenAI chat message."""
    role = fields.get("message.role") or "user"
    content = fields.get("message.content")
    if content is None:
        parts = _indexed({k: v for k, v in fields.items()}, "message.contents")
        texts = [p.get("message_content.text") for p in parts.values() if p.get("message_content.text") is not None]
        content = "\n".join(texts) if texts else None
    msg: dict[str, Any] = {"role": role, "content": content}
    calls = []
    for call in _indexed(fields, "message.tool_calls").values():
        name = call.get("tool_call.function.name")
        if not name:
            continue
        args = call.get("tool_call.function.arguments")
        calls.append({"id": call.get("tool_call.id"), "type": "function",
                      "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args or {})}})
    if calls:
        msg["tool_calls"] = calls
    if fields.get("message.tool_call_id"):
        msg["tool_call_id"] = fields["message.tool_call_id"]
    if fields.get("message.name"):
        msg["name"] = fields["message.name"]
    return msg


def _genai_parts_message(m: dict[str, Any]) -> dict[str, Any]:
    """A GenAI semantic-conventions message (``{"role", "parts": [...]}``) as an OpenAI chat message."""
    if "parts" not in m:
        return m
    texts, calls, call_id = [], [], None
    for p in m.get("parts") or []:
        kind = p.get("type")
        if kind == "text":
            texts.append(p.get("content", ""))
        elif kind == "tool_call":
            args = p.get("arguments")
            calls.append({"id": p.get("id"), "type": "function",
                          "function": {"name": p.get("name"), "arguments": args if isinstance(args, str) else json.dumps(args or {})}})
        elif kind == "tool_call_response":
            call_id = p.get("id")
            resp = p.get("response")
            texts.append(resp if isinstance(resp, str) else json.dumps(resp))
    out: dict[str, Any] = {"role": m.get("role") or "user", "content": "\n".join(texts) if texts else None}
    if calls:
        out["tool_calls"] = calls
    if call_id:
        out["tool_call_id"] = call_id
    return out


def _json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def _messages(attrs: dict[str, Any], side: str) -> list[dict[str, Any]]:
    """Input (``side="input"``) or output messages, whichever convention the span uses."""
    oi = _indexed(attrs, f"llm.{side}_messages")
    if oi:
        return [_oi_message(m) for m in oi.values()]
    genai = _json(attrs.get(f"gen_ai.{side}.messages"))
    if isinstance(genai, list):
        return [_genai_parts_message(m) for m in genai if isinstance(m, dict)]
    old = _indexed(attrs, "gen_ai.prompt" if side == "input" else "gen_ai.completion")
    return [{"role": m.get("role") or ("user" if side == "input" else "assistant"), "content": m.get("content")}
            for m in old.values()]


def is_llm_span(attrs: dict[str, Any]) -> bool:
    kind = str(attrs.get("openinference.span.kind", "")).upper()
    if kind:
        return kind == "LLM"
    return any(k.startswith(("gen_ai.", "llm.input_messages", "llm.output_messages")) for k in attrs)


def _nanos(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def span_to_trace(span: dict[str, Any]) -> Trace | None:
    """The trace of one LLM span; None for a span that is not an LLM call."""
    attrs = span_attributes(span)
    if not is_llm_span(attrs):
        return None
    inputs = _messages(attrs, "input")
    if not inputs and attrs.get("input.value") is not None:
        inputs = [{"role": "user", "content": str(attrs["input.value"])}]
    if not inputs:
        raise ValueError("an LLM span without input messages (llm.input_messages / gen_ai.input.messages)")
    outputs = _messages(attrs, "output")
    answer = next((m for m in reversed(outputs) if m.get("role") in (None, "assistant", "ai", "model")), None)
    if answer is None and outputs:
        answer = outputs[-1]
    if answer is None and attrs.get("output.value") is not None and not str(attrs.get("output.mime_type", "")).endswith("json"):
        answer = {"role": "assistant", "content": str(attrs["output.value"])}
    tools = []
    for tool in _indexed(attrs, "llm.tools").values():
        schema = _json(tool.get("tool.json_schema"))
        if isinstance(schema, dict):
            tools.append(schema if "function" in schema else {"type": "function", "function": schema})
    params = _json(attrs.get("llm.invocation_parameters")) or {}
    request: dict[str, Any] = {"messages": [_clean(m) for m in inputs]}
    if tools:
        request["tools"] = tools
    if isinstance(params, dict) and params:
        request["params"] = {k: v for k, v in params.items()
                             if k not in ("messages", "tools") and not k.startswith("_") and v is not None}
    prompt = _int(attrs.get("llm.token_count.prompt", attrs.get("gen_ai.usage.input_tokens")))
    completion = _int(attrs.get("llm.token_count.completion", attrs.get("gen_ai.usage.output_tokens")))
    total = _int(attrs.get("llm.token_count.total"))
    usage = None
    if prompt is not None or completion is not None or total is not None:
        usage = Usage(prompt_tokens=prompt, completion_tokens=completion,
                      total_tokens=total if total is not None else (prompt or 0) + (completion or 0))
    start, end = _span_time_ns(span, "start"), _span_time_ns(span, "end")
    context = span.get("context") if isinstance(span.get("context"), dict) else {}
    trace_id = otel_id(span.get("traceId") or span.get("trace_id") or context.get("trace_id"), 16)
    span_id = otel_id(span.get("spanId") or span.get("span_id") or context.get("span_id"), 8)
    parent = otel_id(span.get("parentSpanId") or span.get("parent_span_id") or span.get("parent_id"), 8) or None
    status = span.get("status") or {}
    if not isinstance(status, dict):  # some exporters write the status code alone ("ERROR")
        status = {"code": status}
    failed = (status.get("code") in (2, "STATUS_CODE_ERROR", "ERROR")
              or status.get("status_code") in ("ERROR", "STATUS_CODE_ERROR"))
    metadata: dict[str, Any] = {"otel_trace_id": trace_id, "otel_span_name": span.get("name")}
    extra = _json(attrs.get("metadata"))
    if isinstance(extra, dict):
        metadata.update(extra)
    for key in ("session.id", "user.id"):
        if attrs.get(key) is not None:
            metadata[key] = attrs[key]
    model = attrs.get("llm.model_name") or attrs.get("gen_ai.response.model") or attrs.get("gen_ai.request.model")
    tags = attrs.get("tag.tags")
    # OpenInference's session.id / user.id, else the keys the capture handlers read from metadata
    session_id, user_id = identity_from({"session_id": attrs.get("session.id"), "user_id": attrs.get("user.id")},
                                        metadata)
    fields: dict[str, Any] = {
        "id": str(uuid.uuid5(_ID_NAMESPACE, f"{trace_id}/{span_id}")),
        "source": "otel",
        "task": metadata.get("aad_task"),
        "run_id": span_id or None,
        "parent_run_id": str(parent) if parent else None,
        "session_id": session_id,
        "user_id": user_id,
        "model": model,
        "request": ChatRequest.model_validate(request),
        "response": Message.model_validate(_clean(answer)) if answer else None,
        "usage": usage,
        "latency_ms": (end - start) / 1e6 if start is not None and end is not None else None,
        "status": "error" if failed else "ok",
        "error": (status.get("message") or status.get("description") or "error") if failed else None,
        "tags": [str(t) for t in tags] if isinstance(tags, list) else [],
        "metadata": metadata,
    }
    if start is not None:
        fields["created_at"] = datetime.fromtimestamp(start / 1e9, tz=timezone.utc)
    return Trace(**fields)


def _clean(msg: dict[str, Any]) -> dict[str, Any]:
    role = msg.get("role")
    role = {"human": "user", "ai": "assistant", "model": "assistant"}.get(role, role)
    out = {**msg, "role": role}
    if out.get("tool_calls"):
        out["tool_calls"] = [ToolCall(id=c.get("id"), function=FunctionCall(**c["function"])).model_dump(exclude_none=True)
                             for c in out["tool_calls"]]
    return {k: v for k, v in out.items() if v is not None or k == "content"}


def read_otlp_json(path: Path):  # -> aad_core.capture.ingest.IngestResult
    """Every LLM span of an OTLP JSON file (one document, or one per line) as traces; ``lines`` counts spans."""
    from aad_core.capture.ingest import IngestResult

    result = IngestResult()
    hint = "Fix the span, or pass --skip-invalid to import the valid spans only (format: otlp-json)."
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise IngestError(f"cannot open: {err.strerror}", location=str(path), hint="Check the path.") from None
    except UnicodeDecodeError as err:
        data = path.read_bytes()
        line = data.count(b"\n", 0, err.start) + 1
        raise IngestError(f"not valid UTF-8: byte 0x{data[err.start]:02x} at line {line}", location=f"{path}:{line}",
                          hint="Save the file as UTF-8 (OTLP JSON is UTF-8).") from None
    docs: list[tuple[str, Any]] = []
    try:  # one document, JSON Lines, or documents written one after another
        decoder, pos = json.JSONDecoder(), 0
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos >= len(text):
                break
            doc, end = decoder.raw_decode(text, pos)
            docs.append((f"{path}:{text.count(chr(10), 0, pos) + 1}", doc))
            pos = end
    except (json.JSONDecodeError, RecursionError):
        docs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                result.errors.append(IngestError(f"not valid JSON: {err.msg} at column {err.colno}",
                                                 location=f"{path}:{lineno}", hint=hint))
            except RecursionError:
                result.errors.append(IngestError("not readable JSON: nested too deep", location=f"{path}:{lineno}",
                                                 hint=hint))
    for where, doc in docs:
        try:
            spans = list(iter_spans(doc))
        except (AttributeError, TypeError) as err:  # e.g. "scopeSpans" holding a string
            result.lines += 1
            result.errors.append(IngestError(f"not an OTLP JSON document: {err}", location=where, hint=hint))
            continue
        for span in spans:
            result.lines += 1
            if not isinstance(span, dict):
                result.errors.append(IngestError(f"a span must be a JSON object, got {type(span).__name__}",
                                                 location=f"{where} span ?", hint=hint))
                continue
            context = span.get("context")
            sid = span.get("spanId") or span.get("span_id") or (context.get("span_id") if isinstance(context, dict)
                                                                 else None)
            loc = f"{where} span {otel_id(sid, 8) or '?'}"
            try:
                trace = span_to_trace(span)
            except (ValueError, TypeError, KeyError, AttributeError) as err:
                result.errors.append(IngestError(str(err).splitlines()[0], location=loc, hint=hint))
                continue
            except RecursionError:
                result.errors.append(IngestError("a span nested too deep to read", location=loc, hint=hint))
                continue
            if trace is not None:
                result.traces.append(trace)
    return result
