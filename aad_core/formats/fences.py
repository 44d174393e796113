"""Markdown code fences around an answer: one pattern, read two ways.

:func:`strip_fence` is the strict reading (the whole answer is one fence), used to decide what an
answer *is* and to check a served answer; :func:`fenced_body` is the lenient one (the first fence
anywhere in the answer), used by the evaluators to score what a student meant.
"""

from __future__ import annotations

import re

#: ```` ``` ````, an optional info string that ends its line ("json", "sql", ...; on a one-line
#: fence only a json / sql / sqlite tag is read as one), the body, the closing ```` ``` ````.
FENCE = re.compile(r"```(?:[\w+.-]*[ \t]*\n|(?i:json|sql|sqlite)[ \t]+)?(.*?)\n?[ \t]*```", re.DOTALL)


def strip_fence(text: str) -> str:
    """The body of the code fence that is the whole of ``text``, or ``text`` unchanged."""
    m = FENCE.fullmatch(text.strip())
    return m.group(1) if m else text


def fenced_body(text: str) -> str:
    """The body of the first code fence in ``text`` (or all of ``text``), stripped."""
    m = FENCE.search(text or "")
    return m.group(1).strip() if m else (text or "").strip()
