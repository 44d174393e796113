"""LlamaIndex capture on the instrumentation dispatcher (not the legacy callbacks).

::

    from aad_llamaindex import attach, detach

    handler = attach(workspace="./my-agent")   # every LLM call from now on is recorded
    ...
    detach(handler)                             # flushes and stops recording

:class:`AADEventHandler` turns ``LLMChatStart/End`` and ``LLMCompletionStart/End`` events into one
:class:`~aad_core.schema.Trace` per call (OpenAI chat format; streamed calls are recorded from the
last in-progress response). A companion span handler sees which LLM span is nested in which, so
a ``chat()`` that a ``CustomLLM`` implements with ``complete()`` is recorded once (the outer call
the agent made), and it records calls that fail (``status="error"``). ``predict`` and
``structured_predict`` are recorded through the chat/completion call they make. A task tag comes
from the handler's ``task=`` or ``instrument_tags({"aad_task": ...})``; ``Trace.session_id`` from the tag
``session_id`` (or ``thread_id``, ``conversation_id``), ``Trace.user_id`` from ``user_id`` (else OpenAI's
``user`` parameter of the call). The spans above a call (query engine, agent, workflow: not stored) are
its ``metadata["aad_run_path"]``, the first of them its ``metadata["aad_root_run_id"]``, shared by every
call of one pipeline; its ``parent_run_id`` is None.
"""

from __future__ import annotations

import inspect
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.exception import ExceptionEvent
from llama_index.core.instrumentation.events.llm import (
    LLMChatEndEvent,
    LLMChatInProgressEvent,
    LLMChatStartEvent,
    LLMCompletionEndEvent,
    LLMCompletionInProgressEvent,
    LLMCompletionStartEvent,
)
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
from pydantic import PrivateAttr

from aad_core.capture.convert import (
    arguments_json,
    identity_from,
    json_safe,
    openai_logprobs,
    openai_role,
    openai_tool,
    openai_user,
    usage_from,
)
from aad_core.capture.writer import CaptureWriter
from aad_core.schema import ChatRequest, FunctionCall, Message, TokenLogprob, ToolCall, Trace, Usage

if TYPE_CHECKING:
    from aad_core.config import AADSettings
    from aad_core.store.base import TraceStore
    from aad_core.workspace import Workspace

log = logging.getLogger(__name__)

TASK_TAG = "aad_task"
#: Metadata keys of the run tree (as aad_langchain's): the root span of the call's pipeline (the call's own
#: span when it has none) and the spans above the call, root first. LlamaIndex's enclosing spans (query
#: engines, agents, workflows) are not stored, so a call's ``parent_run_id`` stays None.
ROOT_RUN_METADATA_KEY = "aad_root_run_id"
RUN_PATH_METADATA_KEY = "aad_run_path"
#: A span id is "<Class.method or function>-<uuid4>".
_SPAN_NAME = re.compile(r"^(.*)-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_ID_NAMESPACE = uuid.UUID("6f1c2a4e-7d0b-4c55-9a3e-0a4ad0000002")


@dataclass
class _Call:
    start: float
    request: ChatRequest
    model: str | None
    task: str | None
    tags: dict[str, Any]
    #: The open spans above the call, root first: ``[{"run_id", "name"}, ...]``.
    path: list[dict[str, str]]
    session_id: str | None = None
    user_id: str | None = None
    last: ChatResponse | CompletionResponse | None = None
    #: The last usage a streamed response reported (providers send it on one chunk, often not the last).
    usage: Usage | None = None


# -- conversions -------------------------------------------------------------------------------
def _tool_calls(msg: ChatMessage) -> list[ToolCall] | None:
    calls: list[ToolCall] = []
    for block in msg.blocks:
        if getattr(block, "block_type", None) == "tool_call":
            calls.append(ToolCall(id=block.tool_call_id, function=FunctionCall(
                name=block.tool_name, arguments=arguments_json(block.tool_kwargs))))
    for raw in msg.additional_kwargs.get("tool_calls") or []:  # provider (OpenAI) objects or dicts
        data = json_safe(raw)
        fn = data.get("function") or {} if isinstance(data, dict) else {}
        if isinstance(fn, dict) and fn.get("name"):
            calls.append(ToolCall(id=data.get("id"), function=FunctionCall(
                name=str(fn["name"]), arguments=arguments_json(fn.get("arguments")))))
    return calls or None


def to_openai_message(msg: ChatMessage) -> Message:
    """A LlamaIndex ``ChatMessage`` in the OpenAI chat format."""
    role = openai_role(msg.role)
    texts = [b.text for b in msg.blocks if getattr(b, "block_type", None) == "text"]
    out = Message(role=role, content="\n".join(texts) if texts else None)
    out.tool_calls = _tool_calls(msg)
    if role == "tool":
        out.tool_call_id = msg.additional_kwargs.get("tool_call_id")
        out.content = out.content or ""
    elif role != "assistant" and out.content is None:
        out.content = ""
    if msg.additional_kwargs.get("name"):
        out.name = str(msg.additional_kwargs["name"])
    return out


def _tools(kwargs: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = kwargs.get("tools") or kwargs.get("functions")
    if not tools:
        return None
    out = []
    for t in tools:
        meta = getattr(t, "metadata", None)
        if meta is not None and hasattr(meta, "to_openai_tool"):
            out.append(json_safe(meta.to_openai_tool()))
        else:
            out.append(openai_tool(t))
    return out


def _raw_dict(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return raw
    dump = getattr(raw, "model_dump", None)
    try:
        return dump() if callable(dump) else {}
    except Exception:
        return {}


#: The LLM's settings that are parameters of the call it makes (the rest of ``model_dict`` describes
#: the LLM object: context window, system prompt, output parser, retries, client options, ...).
_CALL_PARAMS = ("model", "model_name", "temperature", "max_tokens", "max_new_tokens", "max_completion_tokens",
                "top_p", "top_k", "min_p", "stop", "seed", "frequency_penalty", "presence_penalty",
                "repetition_penalty", "n", "logprobs", "top_logprobs", "response_format", "tool_choice",
                "reasoning_effort", "parallel_tool_calls", "user")


def _call_params(model_dict: dict[str, Any], llm: Any, call_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's parameters: the model name, the LLM object's sampling settings and ``additional_kwargs``
    (extra request parameters, e.g. OpenAI's) and the call's own keyword arguments (tools are recorded
    apart). The event's ``model_dict`` is the LLM's metadata (context window, num_output, ...): only its
    model name is a parameter of the call."""
    params = {k: model_dict[k] for k in ("model", "model_name") if model_dict.get(k) is not None}
    for k in _CALL_PARAMS:
        value = getattr(llm, k, None) if llm is not None else None
        if value is not None and isinstance(value, (str, int, float, bool, list, dict, tuple)):
            params[k] = value
    extra = getattr(llm, "additional_kwargs", None) if llm is not None else None
    if isinstance(extra, dict):
        params.update({k: v for k, v in extra.items() if v is not None})
    params.update({k: v for k, v in call_kwargs.items() if k not in ("tools", "functions") and v is not None})
    return params


def _usage(resp: ChatResponse | CompletionResponse) -> Usage | None:
    raw = _raw_dict(resp.raw)
    return (
        usage_from(raw.get("usage")) or usage_from(raw.get("usage_metadata"))
        or usage_from(resp.additional_kwargs) or usage_from(resp.additional_kwargs.get("usage"))
    )


def _logprobs(resp: ChatResponse | CompletionResponse) -> list[TokenLogprob] | None:
    raw = _raw_dict(resp.raw)
    choices = raw.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        found = openai_logprobs(choices[0].get("logprobs"))
        if found:
            return found
    if not resp.logprobs:  # LlamaIndex's own shape: per position, the top alternatives
        return None
    out = []
    for alts in resp.logprobs:
        if not alts:
            return None
        best = max(alts, key=lambda a: a.logprob)
        out.append({"token": best.token, "logprob": best.logprob,
                    "top_logprobs": [{"token": a.token, "logprob": a.logprob} for a in alts]})
    return openai_logprobs(out)


def _answer(resp: ChatResponse | CompletionResponse | None) -> Message | None:
    if resp is None:
        return None
    if isinstance(resp, ChatResponse):
        msg = to_openai_message(resp.message)
        msg.role = "assistant"
        return msg
    return Message(role="assistant", content=resp.text)


# -- handlers ----------------------------------------------------------------------------------
class _LLMSpans(BaseSpanHandler[Any]):
    """Remembers the parent of each open span (the run tree) and the LLM of each open LLM span, and
    reports LLM spans that fail."""

    _owner: AADEventHandler = PrivateAttr()
    _parents: dict[str, str | None] = PrivateAttr(default_factory=dict)
    _instances: dict[str, Any] = PrivateAttr(default_factory=dict)

    @classmethod
    def class_name(cls) -> str:
        return "AADLLMSpans"

    def span_enter(self, id_: str, bound_args: inspect.BoundArguments, instance: Any = None,
                   parent_id: str | None = None, tags: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self._parents[id_] = parent_id
        if instance is not None and _is_llm(instance):
            self._instances[id_] = instance

    def span_exit(self, id_: str, bound_args: inspect.BoundArguments, instance: Any = None,
                  result: Any = None, **kwargs: Any) -> None:
        self._parents.pop(id_, None)
        self._instances.pop(id_, None)

    def span_drop(self, id_: str, bound_args: inspect.BoundArguments, instance: Any = None,
                  err: BaseException | None = None, **kwargs: Any) -> None:
        self._parents.pop(id_, None)
        self._instances.pop(id_, None)
        if err is not None:
            self._owner._fail_call(id_, err)

    def parent(self, span_id: str | None) -> str | None:
        return self._parents.get(span_id) if span_id else None

    def path(self, span_id: str | None) -> list[dict[str, str]]:
        """The open spans above ``span_id``, root first: ``[{"run_id", "name"}, ...]``."""
        path: list[dict[str, str]] = []
        seen: set[str] = set()
        current = self.parent(span_id)
        while current is not None and current not in seen:
            seen.add(current)
            match = _SPAN_NAME.match(current)
            path.append({"run_id": current, "name": match.group(1) if match else current})
            current = self.parent(current)
        return path[::-1]

    def llm(self, span_id: str | None) -> Any:
        """The LLM object whose call opened span ``span_id`` (None when unknown)."""
        return self._instances.get(span_id) if span_id else None

    def new_span(self, *args: Any, **kwargs: Any) -> None:  # spans are not kept
        return None

    def prepare_to_exit_span(self, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_to_drop_span(self, *args: Any, **kwargs: Any) -> None:
        return None


def _is_llm(instance: Any) -> bool:
    from llama_index.core.base.llms.base import BaseLLM

    return isinstance(instance, BaseLLM)


#: ``class_name()`` of :class:`aad_llamaindex.RoutedLLM` (its calls are not recorded).
ROUTED_CLASS_NAME = "AAD_RoutedLLM"

class AADEventHandler(BaseEventHandler):
    """Records LlamaIndex LLM calls into an aad trace store (use :func:`attach`).

    Parameters
    ----------
    workspace:
        The aad workspace (or its folder, created when missing) whose store receives the traces.
    store:
        A trace store to write to instead.
    task:
        Task tag for every call; ``instrument_tags({"aad_task": ...})`` wins.
    redact:
        Remove PII before anything is written (S2). None = the ``[capture] redact`` setting
        (true by default).
    writer:
        A :class:`~aad_core.capture.CaptureWriter` to share.
    config:
        Settings for a writer this handler creates.
    """

    task: str | None = None
    redact: bool | None = None

    _writer: CaptureWriter = PrivateAttr()
    _owns_writer: bool = PrivateAttr(default=True)
    _spans: _LLMSpans = PrivateAttr()
    _calls: dict[str, _Call] = PrivateAttr(default_factory=dict)
    _nested: set[str] = PrivateAttr(default_factory=set)
    _errors: int = PrivateAttr(default=0)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(
        self,
        workspace: Workspace | str | Path | None = None,
        store: TraceStore | None = None,
        task: str | None = None,
        redact: bool | None = None,
        *,
        writer: CaptureWriter | None = None,
        config: AADSettings | None = None,
    ) -> None:
        if task is not None and not isinstance(task, str):
            raise ValueError(f"The 'task' parameter of AADEventHandler must be a str or None. Got {task!r} instead.")
        super().__init__(task=task, redact=redact)
        self._owns_writer = writer is None
        self._writer = writer or CaptureWriter(workspace=workspace, store=store, redact=redact, config=config)
        self._spans = _LLMSpans()
        self._spans._owner = self

    @classmethod
    def class_name(cls) -> str:
        return "AADEventHandler"

    @property
    def writer(self) -> CaptureWriter:
        return self._writer

    @property
    def span_handler(self) -> BaseSpanHandler[Any]:
        """The companion span handler (nesting and failed calls); :func:`attach` adds both."""
        return self._spans

    def flush(self, timeout: float | None = None) -> bool:
        return self._writer.flush(timeout)

    def close(self, timeout: float | None = None) -> None:
        if self._owns_writer:
            self._writer.close(timeout)
        else:
            self._writer.flush(timeout)

    def feedback(self, span_id: str, score: float, *, comment: str | None = None, name: str = "user") -> dict[str, Any]:
        """Attach a score (and a comment) to the recorded call of LLM span ``span_id`` (or its trace id):
        stored as ``Trace.feedback`` (aad_core.traces.record_feedback)."""
        from aad_core.traces import record_feedback

        self._writer.flush()
        store = self._writer.store
        trace_id = span_id if store is not None and store.get(span_id) else str(uuid.uuid5(_ID_NAMESPACE, span_id))
        return record_feedback(self._writer, trace_id, score, comment=comment, name=name)

    def stats(self) -> dict[str, int]:
        return {**self._writer.stats(), "handler_errors": self._errors, "in_flight": len(self._calls)}

    # -- events ------------------------------------------------------------------------------
    def handle(self, event: Any, **kwargs: Any) -> None:
        try:
            if isinstance(event, (LLMChatInProgressEvent, LLMCompletionInProgressEvent)):
                call = self._calls.get(event.span_id or "")
                if call is not None:
                    call.last = event.response
                    call.usage = _usage(event.response) or call.usage
            elif isinstance(event, LLMChatStartEvent):
                self._start(event, [to_openai_message(m) for m in event.messages])
            elif isinstance(event, LLMCompletionStartEvent):
                self._start(event, [Message(role="user", content=event.prompt)])
            elif isinstance(event, (LLMChatEndEvent, LLMCompletionEndEvent)):
                self._end(event.span_id, event.response)
            elif isinstance(event, ExceptionEvent):
                self._fail_call(event.span_id, event.exception)
        except Exception as err:
            self._fail(err)

    def _start(self, event: LLMChatStartEvent | LLMCompletionStartEvent, messages: list[Message]) -> None:
        if (event.model_dict or {}).get("class_name") == ROUTED_CLASS_NAME:
            # aad's own RoutedLLM: its answer may be a specialist's, which must never become training data;
            # the teacher call it makes is a call of its own and is recorded as itself.
            return
        span = event.span_id or event.id_
        parent = self._spans.parent(span)
        ancestor = parent
        while ancestor is not None:  # a call made inside a call we already record
            if ancestor in self._calls or ancestor in self._nested:
                with self._lock:
                    self._nested.add(span)
                return
            ancestor = self._spans.parent(ancestor)
        model_dict = event.model_dict or {}
        kw = dict(event.additional_kwargs or {})
        model = model_dict.get("model") or model_dict.get("model_name") or model_dict.get("class_name")
        params = _call_params(model_dict, self._spans.llm(span), kw)
        tags = json_safe(event.tags or {})
        task = tags.get(TASK_TAG) or self.task
        session_id, user_id = identity_from(tags)
        self._calls[span] = _Call(
            start=time.perf_counter(),
            request=ChatRequest(messages=messages, tools=_tools(kw), params=json_safe(params)),
            model=str(model) if model is not None else None,
            task=str(task) if task is not None else None,
            tags=tags,
            path=self._spans.path(span),
            session_id=session_id,
            user_id=user_id or openai_user(params),
        )

    def _end(self, span_id: str | None, response: ChatResponse | CompletionResponse | None) -> None:
        span = span_id or ""
        if span in self._nested:
            with self._lock:
                self._nested.discard(span)
            return
        call = self._calls.pop(span, None)
        if call is None:
            return
        resp = response if response is not None else call.last
        self._submit(span, call, resp)

    def _fail_call(self, span_id: str | None, err: BaseException) -> None:
        try:
            span = span_id or ""
            with self._lock:
                self._nested.discard(span)
            call = self._calls.pop(span, None)
            if call is not None:
                self._submit(span, call, call.last, error=f"{type(err).__name__}: {err}")
        except Exception as exc:
            self._fail(exc)

    def _submit(self, span: str, call: _Call, resp: ChatResponse | CompletionResponse | None,
                error: str | None = None) -> None:
        self._writer.submit(Trace(
            id=str(uuid.uuid5(_ID_NAMESPACE, span)),  # one trace per LLM span, however often attached
            source="llamaindex",
            task=call.task,
            run_id=span,
            # A call inside a recorded call is not recorded (see _start), so no stored run is above this
            # one: its enclosing spans, never stored, are its path, not its parent.
            parent_run_id=None,
            session_id=call.session_id,
            user_id=call.user_id,
            model=call.model,
            request=call.request,
            response=_answer(resp),
            usage=(_usage(resp) if resp is not None else None) or call.usage,
            latency_ms=(time.perf_counter() - call.start) * 1000,
            teacher_logprobs=_logprobs(resp) if resp is not None else None,
            status="error" if error else "ok",
            error=error,
            tags=[f"{k}={v}" for k, v in call.tags.items()],
            metadata={**({"llamaindex_tags": call.tags} if call.tags else {}),
                      ROOT_RUN_METADATA_KEY: call.path[0]["run_id"] if call.path else span,
                      RUN_PATH_METADATA_KEY: call.path},
        ))

    def _fail(self, err: BaseException) -> None:
        with self._lock:
            self._errors += 1
            first = self._errors == 1
        if first:
            log.error("aad capture: AADEventHandler failed to record a call (%s: %s); the call itself was not "
                      "affected. Further handler errors are counted in stats().", type(err).__name__, err,
                      exc_info=err)


def attach(
    workspace: Workspace | str | Path | None = None, *, dispatcher: Any = None, **kwargs: Any
) -> AADEventHandler:
    """Record every LlamaIndex LLM call: add an :class:`AADEventHandler` (and its span handler)
    to the root instrumentation dispatcher (or ``dispatcher``). ``kwargs`` go to the handler."""
    from llama_index.core.instrumentation import get_dispatcher

    handler = AADEventHandler(workspace=workspace, **kwargs)
    target = dispatcher or get_dispatcher()
    target.add_event_handler(handler)
    target.add_span_handler(handler.span_handler)
    return handler


def detach(handler: AADEventHandler, *, dispatcher: Any = None, timeout: float | None = None) -> None:
    """Stop recording with ``handler``, then flush it and close its writer."""
    from llama_index.core.instrumentation import get_dispatcher

    target = dispatcher or get_dispatcher()
    target.event_handlers = [h for h in target.event_handlers if h is not handler]
    target.span_handlers = [h for h in target.span_handlers if h is not handler.span_handler]
    handler.close(timeout)


__all__ = ["AADEventHandler", "attach", "detach", "to_openai_message"]
