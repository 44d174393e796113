"""Label answers: a short one-line answer that is neither JSON nor SQL (an intent, a category)."""

from __future__ import annotations

from aad_core.formats.fences import strip_fence
from aad_core.formats.sql import SQL_START

#: A label is at most this many characters and words, on one line.
LABEL_MAX_CHARS = 64
LABEL_MAX_WORDS = 5


def is_label(text: str) -> bool:
    """``text`` is one line of at most :data:`LABEL_MAX_WORDS` words / :data:`LABEL_MAX_CHARS`
    characters, and neither a JSON object/array nor a SQL statement (fenced or not)."""
    text = text.strip()
    if not text or "\n" in text or len(text) > LABEL_MAX_CHARS or len(text.split()) > LABEL_MAX_WORDS:
        return False
    body = strip_fence(text).strip()
    return bool(body) and body[0] not in "{[" and not SQL_START.match(body)


def label_key(text: str) -> str:
    """The spelling under which two labels count as the same one (case and surrounding spaces ignored)."""
    return text.strip().lower()
