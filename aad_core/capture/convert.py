"""Small conversions shared by the capture integrations (LangChain, LlamaIndex, router)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aad_core.schema import TokenLogprob, TopLogprob, Usage

_PRIMITIVES = (str, int, float, bool, type(None))


def json_safe(value: Any, _depth: int = 0) -> Any:
    """``value`` with everything that JSON cannot hold replaced by its ``repr`` (params and
    metadata can carry classes, clients, callables)."""
    if isinstance(value, _PRIMITIVES):
        return value
    if _depth > 20:
        return repr(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v, _depth + 1) for v in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump) and isinstance(value, object) and not isinstance(value, type):
        try:
            return json_safe(dump(), _depth + 1)
        except Exception:
            pass
    return repr(value)


def openai_tool(tool: Any) -> dict[str, Any]:
    """A bound tool as an OpenAI ``{"type": "function", "function": {...}}`` schema."""
    if isinstance(tool, Mapping):
        if tool.get("type") == "function" and "function" in tool:
            return json_safe(tool)
        if "name" in tool and ("parameters" in tool or "description" in tool):
            return {"type": "function", "function": json_safe(tool)}
        return json_safe(tool)
    return {"type": "function", "function": {"name": str(getattr(tool, "name", repr(tool)))}}


def arguments_json(args: Any) -> str:
    """Tool-call arguments as the JSON string the OpenAI format uses."""
    if isinstance(args, str):
        return args
    return json.dumps(json_safe(args if args is not None else {}), ensure_ascii=False)


def openai_logprobs(logprobs: Any) -> list[TokenLogprob] | None:
    """OpenAI-style ``{"content": [{"token", "logprob", "top_logprobs": [...]}, ...]}`` (or the
    bare list) as teacher log-probs; None when absent or not in that shape."""
    if isinstance(logprobs, Mapping):
        logprobs = logprobs.get("content")
    if not isinstance(logprobs, list) or not logprobs:
        return None
    out = []
    for tok in logprobs:
        if not isinstance(tok, Mapping) or "token" not in tok or "logprob" not in tok:
            return None
        tops = [
            TopLogprob(token=str(a["token"]), logprob=float(a["logprob"]))
            for a in tok.get("top_logprobs") or []
            if isinstance(a, Mapping) and "token" in a and "logprob" in a
        ]
        out.append(TokenLogprob(token=str(tok["token"]), logprob=float(tok["logprob"]), top_logprobs=tops))
    return out


def usage_from(data: Any) -> Usage | None:
    """Token usage from LangChain ``usage_metadata`` (input/output_tokens) or an OpenAI
    ``usage`` dict (prompt/completion_tokens)."""
    if not isinstance(data, Mapping) or not data:
        return None
    prompt = data.get("input_tokens", data.get("prompt_tokens"))
    completion = data.get("output_tokens", data.get("completion_tokens"))
    if prompt is None and completion is None:
        return None
    prompt, completion = int(prompt or 0), int(completion or 0)
    total = int(data.get("total_tokens") or prompt + completion)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total)
