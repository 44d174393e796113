"""JSON answers: what counts as one, how a student's is read, and its canonical form."""

from __future__ import annotations

import json
from typing import Any

from aad_core.formats.fences import fenced_body, strip_fence


def is_json(text: str) -> bool:
    """``text`` (or the code fence that is all of it) is one JSON object or array."""
    try:
        return isinstance(json.loads(strip_fence(text)), (dict, list))
    except (json.JSONDecodeError, ValueError, TypeError):
        return False


def parse_json_answer(text: str) -> tuple[bool, Any]:
    """Parse a JSON answer, tolerating a Markdown code fence or text around one object/array."""
    body = fenced_body(text)
    try:
        return True, json.loads(body)
    except (json.JSONDecodeError, ValueError):
        pass
    starts = [i for i in (body.find("{"), body.find("[")) if i >= 0]
    if starts:
        try:
            value, _ = json.JSONDecoder().raw_decode(body[min(starts):])
            return True, value
        except (json.JSONDecodeError, ValueError):
            pass
    return False, None


def canonical_json(value: Any) -> str:
    """One spelling of a JSON value: sorted keys, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
