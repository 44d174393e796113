"""The shape of the requests a task's specialist was trained on, and whether a new request has it.

A specialist trained on single-turn requests has never seen a conversation history: given four
earlier turns it answers from the wrong one (a product copied from an earlier turn). Tool results in
the history, tools the task's calls never bound, or a ``response_format`` they never asked for are
the same kind of stranger. ``aad route
--calibrate`` records each task's training shape in ``router.json`` (``clusters[<id>]["request_shape"]``,
from every call of the task's training split) and the routing engine sends a request whose shape
exceeds it to the teacher, saying why.

A router.json written before the shape existed has no ``request_shape``: nothing is enforced.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from aad_core.schema import ChatRequest

__all__ = ["request_shape", "shape_envelope", "shape_mismatch", "training_shape"]

_CONTEXT_ROLES = ("system", "developer")


def request_shape(request: ChatRequest) -> dict[str, Any]:
    """One request's shape: user turns, messages other than the system prompt, whether tool results
    appear in the history, and the names of the bound tools."""
    messages = [m for m in request.messages if m.role not in _CONTEXT_ROLES]
    return {
        "user_turns": sum(1 for m in messages if m.role == "user"),
        "messages": len(messages),
        "tool_messages": any(m.role in ("tool", "function") for m in messages),
        "tools": sorted(set(request.tool_names())),
        "response_format": _response_format(request.params.get("response_format")),
    }


def _response_format(value: Any) -> str | None:
    """``"json_schema:<name>"``, ``"json_object"``, ... for a request's ``response_format`` (None: none)."""
    if not value:
        return None
    if isinstance(value, Mapping):
        kind = str(value.get("type") or "")
        schema = value.get(kind) if isinstance(value.get(kind), Mapping) else {}
        name = schema.get("name") if isinstance(schema, Mapping) else None
        return f"{kind}:{name}" if name else kind or "unknown"
    return str(value)


def training_shape(requests: Iterable[ChatRequest]) -> dict[str, Any] | None:
    """The envelope of the training requests' shapes (None when there are none): the most user turns
    and messages, whether any had tool results in its history, and every tool name any of them bound."""
    return shape_envelope(request_shape(r) for r in requests)


def shape_envelope(shapes: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """:func:`training_shape` of requests already reduced to their :func:`request_shape`. ``tools`` is the
    tool set every training call bound, or None when the calls bound different tool sets."""
    n, turns, msgs, tool_msgs, tools, formats = 0, 0, 0, False, set(), set()
    tool_sets: set[tuple[str, ...]] = set()
    for shape in shapes:
        n += 1
        tool_sets.add(tuple(shape["tools"]))
        if shape.get("response_format"):
            formats.add(str(shape["response_format"]))
        turns, msgs = max(turns, shape["user_turns"]), max(msgs, shape["messages"])
        tool_msgs = tool_msgs or shape["tool_messages"]
        tools.update(shape["tools"])
    if not n:
        return None
    # A task whose calls bind different tools each time (a function-calling node handed each request's own
    # tools) learned to use whatever is bound: only a fixed tool set is enforced (None = any tools).
    fixed = len(tool_sets - {()}) <= 1
    return {"max_user_turns": turns, "max_messages": msgs, "tool_messages": tool_msgs,
            "tools": sorted(tools) if fixed else None, "response_formats": sorted(formats), "n": n}


def _turns(n: int) -> str:
    return f"{n} prior turn" + ("" if n == 1 else "s")


def shape_mismatch(request: ChatRequest, trained: Mapping[str, Any] | None) -> str:
    """Why ``request`` falls outside the shape its specialist was ``trained`` on ("" when it fits, or
    when no training shape was recorded)."""
    if not trained:
        return ""
    shape = request_shape(request)
    max_turns = trained.get("max_user_turns")
    if max_turns is not None and shape["user_turns"] > int(max_turns):
        prior, trained_prior = shape["user_turns"] - 1, max(int(max_turns) - 1, 0)
        on = ("single-turn requests" if trained_prior == 0
              else f"requests with at most {_turns(trained_prior)}")
        return f"{_turns(prior)}; the specialist was trained on {on}"
    if shape["tool_messages"] and not trained.get("tool_messages", True):
        return "tool results in the history; the specialist was trained on requests without tool results"
    max_messages = trained.get("max_messages")
    if max_messages is not None and shape["messages"] > int(max_messages):
        return (f"{shape['messages']} messages of history; the specialist was trained on requests of at most "
                f"{int(max_messages)}")
    known = trained.get("tools")
    if known is not None:
        unknown = [t for t in shape["tools"] if t not in set(known)]
        if unknown:
            names = ", ".join(unknown)
            if not known:
                return f"the request binds tools ({names}); the specialist was trained on requests without tools"
            return (f"the request binds tools its specialist never saw ({names}); it was trained with "
                    f"{', '.join(known)}")
    formats = trained.get("response_formats")
    if formats is not None and shape["response_format"] and shape["response_format"] not in set(formats):
        seen = ("requests with " + ", ".join(formats)) if formats else "requests without one"
        return f"the request asks for response_format {shape['response_format']}; the specialist was trained on {seen}"
    return ""
