"""Paraphrases of a request's last user message: the fixed instruction sent to the teacher, the parsing
of its answer (one paraphrase per line), and the request with a paraphrase in place of the original."""

from __future__ import annotations

import re

from aad_core.schema import ChatRequest, Message

#: The system prompt of a paraphrase request (``{n}``: how many). The user message is the text itself.
PARAPHRASE_INSTRUCTION = (
    "You paraphrase requests that users send to an assistant. Write {n} different paraphrases of the user's "
    "request. Keep its meaning, its intent, its language and every value in it (names, numbers, ids, dates, "
    "codes and placeholders such as <EMAIL_ADDRESS_1>) exactly as they are; change the wording and the sentence "
    "structure. Do not answer the request. Reply with the {n} paraphrases only, one per line, without numbering, "
    "quotes or comments."
)

#: A list marker or number a model may put before a line despite the instruction: "1.", "2)", "-", "*", "•".
_MARKER = re.compile(r"^\s*(?:\d{1,3}\s*[.):]|[-*•])\s+")
_QUOTES = "\"'“”‘’`"


def paraphrasable(request: ChatRequest) -> str | None:
    """Why the last user message of ``request`` cannot be paraphrased line by line, or None when it can:
    it must exist, be text only and fit on one line."""
    last = next((m for m in reversed(request.messages) if m.role == "user"), None)
    if last is None:
        return "no user message"
    if isinstance(last.content, list) and any(p.get("type", "text") != "text" for p in last.content):
        return "the last user message is not text only"
    text = last.text().strip()
    if not text:
        return "the last user message is empty"
    if "\n" in text:
        return "the last user message spans several lines (paraphrases are read one per line)"
    return None


def paraphrase_request(text: str, n: int, *, model: str | None = None) -> ChatRequest:
    """The request asking the teacher for ``n`` paraphrases of ``text``."""
    params = {"model": model} if model else {}
    return ChatRequest(messages=[Message(role="system", content=PARAPHRASE_INSTRUCTION.format(n=n)),
                                 Message(role="user", content=text)], params=params)


def _key(text: str) -> str:
    """Two paraphrases with this key are the same (case, spaces and a final full stop ignored)."""
    return re.sub(r"\s+", " ", text).strip().rstrip(".!?").strip().casefold()


def parse_paraphrases(answer: str, original: str, n: int) -> tuple[list[str], int]:
    """(paraphrases, lines dropped): at most ``n`` non-empty lines of ``answer``, list markers and quotes
    removed, without duplicates or lines that repeat ``original``."""
    kept: list[str] = []
    seen = {_key(original)}
    dropped = 0
    for line in answer.splitlines():
        text = _MARKER.sub("", line).strip()
        if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
            text = text[1:-1].strip()
        if not text:
            continue  # blank lines are layout, not paraphrases
        key = _key(text)
        if key in seen or len(kept) == n:
            dropped += 1
            continue
        seen.add(key)
        kept.append(text)
    return kept, dropped


def with_last_user(request: ChatRequest, text: str) -> ChatRequest:
    """``request`` with ``text`` as its last user message (system prompt, tools, parameters and the other
    turns unchanged)."""
    messages = list(request.messages)
    index = max(i for i, m in enumerate(messages) if m.role == "user")
    messages[index] = messages[index].model_copy(update={"content": text})
    return request.model_copy(update={"messages": messages})
