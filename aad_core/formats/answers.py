"""How a trace's answer becomes a comparable string, and how much the teacher's answer is trusted.

Tool calls are serialised as a JSON list ``[{"name": ..., "arguments": {...}}]`` (arguments
decoded from the OpenAI JSON string), so the tool-call evaluator compares calls, not formatting.
Plain answers are their text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from aad_core.schema import Message, Trace


def tool_calls_string(message: Message) -> str:
    calls = []
    for call in message.tool_calls or []:
        try:
            args: Any = call.function.parsed_arguments()
        except (json.JSONDecodeError, ValueError):
            args = call.function.arguments
        calls.append({"name": call.function.name, "arguments": args})
    return json.dumps(calls, ensure_ascii=False, sort_keys=True)


def answer_string(trace: Trace) -> str:
    """The teacher's recorded answer as the string evaluators compare against."""
    if trace.response is None:
        return ""
    if trace.response.tool_calls:
        return tool_calls_string(trace.response)
    return trace.response.text()


def answer_pairs(traces: Sequence[Trace]) -> list[tuple[str, bool]]:
    """(answer string, had tool calls) for each trace with a recorded answer: what
    :func:`aad_core.formats.kinds.output_kind` reads."""
    return [(answer_string(t), bool(t.response.tool_calls)) for t in traces if t.response is not None]


def teacher_quality(trace: Trace) -> float | None:
    """The teacher answer's quality from user feedback in [0, 1], or None when there is none.

    Understood keys: ``score`` (a number in [0, 1]), ``correct`` / ``thumbs_up`` (booleans),
    ``rating`` with ``rating_max`` (default 5).
    """
    fb = trace.feedback or {}
    if isinstance(fb.get("score"), (int, float)) and not isinstance(fb.get("score"), bool):
        return min(1.0, max(0.0, float(fb["score"])))
    for key in ("correct", "thumbs_up"):
        if isinstance(fb.get(key), bool):
            return 1.0 if fb[key] else 0.0
    if isinstance(fb.get("rating"), (int, float)):
        top = float(fb.get("rating_max", 5) or 5)
        return min(1.0, max(0.0, float(fb["rating"]) / top))
    return None
