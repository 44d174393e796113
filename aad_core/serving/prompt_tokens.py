"""The prompt tokens ``aad serve`` reports in ``usage`` for a specialist's answer: counted by the
specialist's backend (its tokenizer and chat template) when it can, else estimated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import TYPE_CHECKING

from aad_core.schema import ChatRequest, Usage

if TYPE_CHECKING:
    from aad_core.serving.engine import RoutedAnswer, RoutingEngine

# The server's logger (docs/routing.md names it), whichever of its modules logs.
log = logging.getLogger("aad_core.serving.server")


def estimate_prompt_tokens(request: ChatRequest) -> int:
    """About how many tokens ``request``'s prompt is, for a specialist whose backend cannot count them:
    4 characters per token (OpenAI's rule of thumb for English) plus 4 tokens per message for the chat
    template's role markers, bound tools counted as their JSON."""
    chars = sum(len(m.text()) for m in request.messages)
    if request.tools:
        chars += len(json.dumps(request.tools, ensure_ascii=False))
    return math.ceil(chars / 4) + 4 * len(request.messages)


def specialist_prompt_tokens(engine: RoutingEngine, name: str | None, request: ChatRequest) -> int:
    """The prompt tokens of ``request`` for specialist ``name``: counted by its backend's
    ``prompt_tokens(name, request)`` (its tokenizer and chat template) when it has one, else estimated."""
    count = getattr(engine.specialists, "prompt_tokens", None) if name else None
    if callable(count):
        try:
            n = count(name, request)
            if n is not None:
                return int(n)
        except Exception as err:  # counting must never fail the answer
            log.warning("could not count the prompt tokens of specialist %s: %s", name, err)
    return estimate_prompt_tokens(request)


def _with_prompt_tokens(answer: RoutedAnswer, prompt_tokens: int) -> RoutedAnswer:
    done = answer.usage.completion_tokens
    return dataclasses.replace(answer, usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=done,
                                                   total_tokens=prompt_tokens + done))
