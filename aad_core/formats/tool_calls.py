"""Turn a specialist's generated text into OpenAI ``tool_calls``.

Specialists learn tool calls from the chat template's rendering of the teacher's assistant
messages. The format is the Hermes / Qwen / SmolLM convention that ``aad_core.models.chat_format``
renders: one ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` block per call. A bare
JSON object (or list of objects) with ``name`` and ``arguments`` as the whole answer (in a code
fence or not; OpenAI's ``{"function": {...}}`` and ``{"tool_calls": [...]}`` shapes too) is
accepted as well, because small students often drop the tags.

This is the one tool-call parser: the router reads a specialist's answer with it and the
``tool-calls`` evaluator scores what it reads, so the parity gate judges the calls the router serves.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from aad_core.formats.fences import strip_fence
from aad_core.schema import FunctionCall, ToolCall

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


class ToolCallParseError(ValueError):
    """The text announces tool calls but they are not valid JSON calls."""


def _to_call(obj: Any) -> ToolCall:
    if not isinstance(obj, dict):
        raise ToolCallParseError(f"a tool call must be a JSON object, got {type(obj).__name__}")
    fn = obj.get("function") if isinstance(obj.get("function"), dict) else obj
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ToolCallParseError("a tool call needs a non-empty 'name'")
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as err:
            raise ToolCallParseError(f"arguments of {name!r} are not JSON: {err}") from None
    if not isinstance(args, dict):
        raise ToolCallParseError(f"arguments of {name!r} must be a JSON object")
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=json.dumps(args)))


def _looks_like_call(obj: Any) -> bool:
    if isinstance(obj, list):
        return bool(obj) and all(_looks_like_call(o) for o in obj)
    if not isinstance(obj, dict):
        return False
    fn = obj.get("function") if isinstance(obj.get("function"), dict) else obj
    return "name" in fn and ("arguments" in fn or "parameters" in fn)


def _bare_calls(obj: Any) -> list[Any] | None:
    """The call objects of a bare JSON answer, or None when it is not tool calls."""
    if isinstance(obj, dict) and isinstance(obj.get("tool_calls"), list):
        obj = obj["tool_calls"]
    if not _looks_like_call(obj):
        return None
    return obj if isinstance(obj, list) else [obj]


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Split generated ``text`` into (remaining content, tool calls).

    Raises :class:`ToolCallParseError` when a ``<tool_call>`` block or a bare JSON call is present
    but malformed (which the router treats as a failed check and escalates, and the ``tool-calls``
    evaluator as an answer it cannot read).
    """
    blocks = _BLOCK.findall(text)
    if blocks:
        calls = []
        for raw in blocks:
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as err:
                raise ToolCallParseError(f"<tool_call> block is not JSON: {err}") from None
            calls.extend(_to_call(o) for o in (obj if isinstance(obj, list) else [obj]))
        content = _BLOCK.sub("", text).strip()
        return content, calls
    stripped = strip_fence(text).strip()
    if stripped[:1] in "[{":
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError:
            return text, []
        items = _bare_calls(obj)
        if items is not None:
            return "", [_to_call(o) for o in items]
    return text, []


def render_tool_calls(calls: list[ToolCall]) -> str:
    """The text form of ``calls`` (the inverse of :func:`parse_tool_calls`)."""
    return "\n".join(
        "<tool_call>" + json.dumps({"name": c.function.name, "arguments": c.function.parsed_arguments()}) + "</tool_call>"
        for c in calls
    )
