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


#: A teacher answer whose feedback quality (:func:`teacher_quality`) is below this is wrong: it is
#: left out of training and selection (the cluster stage's split marks it ``"excluded"``).
WRONG_BELOW = 0.5


def feedback_quality(fb: Any) -> float | None:
    """The quality in [0, 1] that a ``Trace.feedback`` mapping gives the teacher's answer, or None.

    Understood keys: ``score`` (a number in [0, 1]; ``aad traces feedback ID -1`` clamps to 0),
    ``correct`` / ``thumbs_up`` (booleans), ``rating`` with ``rating_max`` (default 5).
    """
    if not isinstance(fb, dict):
        return None
    if isinstance(fb.get("score"), (int, float)) and not isinstance(fb.get("score"), bool):
        return min(1.0, max(0.0, float(fb["score"])))
    for key in ("correct", "thumbs_up"):
        if isinstance(fb.get(key), bool):
            return 1.0 if fb[key] else 0.0
    if isinstance(fb.get("rating"), (int, float)) and not isinstance(fb.get("rating"), bool):
        top = float(fb.get("rating_max", 5) or 5)
        return min(1.0, max(0.0, float(fb["rating"]) / top))
    return None


def teacher_quality(trace: Trace) -> float | None:
    """The teacher answer's quality from user feedback in [0, 1], or None when there is none
    (:func:`feedback_quality` of ``trace.feedback``)."""
    return feedback_quality(trace.feedback or {})


def teacher_answer_wrong(trace: Trace) -> bool:
    """Whether user feedback marks the teacher's answer wrong (quality below :data:`WRONG_BELOW`):
    such a call is not trained on, nor selected."""
    quality = teacher_quality(trace)
    return quality is not None and quality < WRONG_BELOW
