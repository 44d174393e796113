"""Repairs for a trace that cannot be redacted or serialised as it is (a "poison" trace).

Two faults make a trace unwritable: a lone surrogate character (not valid UTF-8, so neither JSON
nor SQLite can hold it) and structures nested so deep that a recursive walk or the JSON encoder
gives up (``RecursionError``, "maximum serialization depth exceeded"). :func:`repair` returns a
copy with lone surrogates replaced by U+FFFD and anything nested deeper than :data:`MAX_DEPTH`
(as Python containers, or as JSON inside a string such as tool-call arguments) replaced by a short
note, and the list of what it changed. It walks at most :data:`MAX_DEPTH` levels, so it cannot
itself run out of stack.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel

from aad_core.schema import Trace

#: Deepest nesting kept (containers, or brackets of JSON text inside a string).
MAX_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")
_TOO_DEEP = f"<aad: removed, nested deeper than {MAX_DEPTH} levels>"


def _json_depth(text: str) -> int:
    """The deepest bracket nesting of ``text`` (strings inside it not parsed; an upper bound)."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif ch in "]}":
            depth = max(0, depth - 1)
    return deepest


class _Repair:
    def __init__(self) -> None:
        self.notes: set[str] = set()

    def value(self, node: Any, depth: int) -> Any:
        if isinstance(node, str):
            return self.text(node)
        if isinstance(node, BaseModel):
            return self.model(node, depth + 1)
        if isinstance(node, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                self.notes.add(f"a structure nested deeper than {MAX_DEPTH} levels was removed")
                return _TOO_DEEP
            if isinstance(node, dict):
                return {self.text(str(k)): self.value(v, depth + 1) for k, v in node.items()}
            return [self.value(v, depth + 1) for v in node]
        return node

    def text(self, text: str) -> str:
        if _SURROGATE.search(text):
            self.notes.add("lone surrogate characters were replaced by U+FFFD")
            text = _SURROGATE.sub("\ufffd", text)
        if ("[" in text or "{" in text) and len(text) > 2 * MAX_DEPTH and _json_depth(text) > MAX_DEPTH:
            self.notes.add(f"a JSON text nested deeper than {MAX_DEPTH} levels was removed")
            return json.dumps(_TOO_DEEP)  # still valid JSON (tool-call arguments stay parseable)
        return text

    def model(self, model: BaseModel, depth: int) -> BaseModel:
        out = model.model_copy()
        names = list(type(model).model_fields) + list(model.model_extra or {})
        for name in names:
            setattr(out, name, self.value(getattr(model, name), depth))
        return out


def repair(trace: Trace) -> tuple[Trace, list[str]]:
    """A copy of ``trace`` that can be redacted and serialised, and what was changed (empty: nothing)."""
    fixer = _Repair()
    out = fixer.model(trace, 0)
    assert isinstance(out, Trace)
    notes = sorted(fixer.notes)
    if notes:
        out.metadata = {**out.metadata, "aad_repaired": notes}
    return out, notes
