"""LangChain capture: :class:`AADCallbackHandler` records every chat-model and LLM call.

Use it the way LangChain intends callbacks to be used::

    handler = AADCallbackHandler(workspace="./my-agent")
    model.invoke("Hi", config={"callbacks": [handler]})            # one call
    agent.invoke({"messages": [...]}, config={"callbacks": [handler]})  # every call of an agent

Each call becomes one :class:`~aad_core.schema.Trace` (OpenAI chat format) with the trace id set
to LangChain's ``run_id``, so a handler attached twice never stores a call twice. The handler never
raises into the user's call: its own errors are counted (``stats()["handler_errors"]``) and
logged once.

A trace's ``session_id`` is the first of the metadata keys ``session_id``, ``thread_id`` (LangGraph's
``configurable.thread_id`` lands there) or ``conversation_id`` on the call or a chain above it, its
``user_id`` the metadata key ``user_id`` (else OpenAI's ``user`` parameter)::

    agent.invoke(..., config={"callbacks": [handler], "metadata": {"session_id": "s-1", "user_id": "u-7"}})
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage, convert_to_openai_messages
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, GenerationChunk, LLMResult

from aad_core.capture.convert import (identity_from, json_safe, message_from_openai, openai_logprobs, openai_tool,
                                     openai_user, usage_from)
from aad_core.capture.writer import CaptureWriter
from aad_core.schema import TIER_METADATA_KEY, ChatRequest, Message, TokenLogprob, Trace, Usage

if TYPE_CHECKING:
    from aad_core.config import AADSettings
    from aad_core.store.base import TraceStore
    from aad_core.workspace import Workspace

log = logging.getLogger(__name__)

TASK_METADATA_KEY = "aad_task"
#: Metadata of a teacher run that RoutedChatModel made because its specialist's answer was rejected.
ESCALATION_METADATA_KEY = "aad_escalation"
#: Metadata keys of the run tree: the root run of the invocation and the runs above the call.
ROOT_RUN_METADATA_KEY = "aad_root_run_id"
RUN_PATH_METADATA_KEY = "aad_run_path"
#: LangChain's own bookkeeping tags (position in a sequence or map, LangGraph steps, LangSmith flags).
_INTERNAL_TAG = re.compile(r"^(seq:step:|map:key:|graph:step:|langsmith:)")
_PARAM_SKIP = {"tools", "_type"}

_ACTIVE: ContextVar[AADCallbackHandler | None] = ContextVar("aad_langchain_active_handler", default=None)
_HOOK_LOCK = threading.Lock()
_hook_registered = False


def _register_configure_hook() -> None:
    """Let LangChain add the active handler (see :meth:`AADCallbackHandler.activate`) to every run."""
    global _hook_registered
    with _HOOK_LOCK:
        if not _hook_registered:
            from langchain_core.tracers.context import register_configure_hook

            register_configure_hook(_ACTIVE, True)
            _hook_registered = True


@dataclass
class _Run:
    start: float
    request: ChatRequest
    model: str | None
    task: str | None
    parent_run_id: str | None
    tags: list[str]
    metadata: dict[str, Any]
    session_id: str | None = None
    user_id: str | None = None
    chunks: list[Any] = field(default_factory=list)


#: ``_llm_type`` of :class:`aad_langchain.RoutedChatModel` (its runs are not recorded).
ROUTED_LLM_TYPE = "aad-routed-chat"

class AADCallbackHandler(BaseCallbackHandler):
    """Records LangChain chat-model and LLM calls into an aad trace store.

    Parameters
    ----------
    workspace:
        The aad workspace (or its folder, created when missing) whose store receives the traces.
    store:
        A trace store to write to instead (e.g. a ``SQLiteTraceStore``).
    task:
        Task tag for every call of this handler; a call's ``metadata={"aad_task": ...}`` wins.
    redact:
        Remove PII before anything is written (S2). None = the ``[capture] redact`` setting
        (true by default).
    writer:
        A :class:`~aad_core.capture.CaptureWriter` to share with other handlers (then
        ``workspace``, ``store``, ``redact`` and ``config`` are taken from it).
    config:
        Settings for a writer this handler creates.
    """

    raise_error: bool = False
    run_inline: bool = True  # cheap and thread-safe: no executor hop in async runs
    ignore_chain: bool = False  # chain runs are followed (not stored) for the run tree: root id and path
    ignore_agent: bool = True
    ignore_retriever: bool = True
    ignore_retry: bool = True
    ignore_custom_event: bool = True

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
            raise ValueError(f"The 'task' parameter of AADCallbackHandler must be a str or None. Got {task!r} instead.")
        self.workspace = workspace
        self.store = store
        self.task = task
        self.redact = redact
        self.config = config
        self._owns_writer = writer is None
        self.writer = writer or CaptureWriter(workspace=workspace, store=store, redact=redact, config=config)
        self._runs: dict[UUID, _Run] = {}
        #: Open chain / tool / routed-model runs: run id -> (parent run id, name), for the run tree.
        self._parents: dict[UUID, tuple[UUID | None, str]] = {}
        #: The metadata of open chain / tool runs that name a session or user (see _identity).
        self._run_metadata: dict[UUID, dict[str, Any]] = {}
        self._handler_errors = 0
        self._logged_error = False

    # -- public ------------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every recorded call is in the store (or spooled)."""
        return self.writer.flush(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush and stop the writer (if this handler created it)."""
        if self._owns_writer:
            self.writer.close(timeout)
        else:
            self.writer.flush(timeout)

    @contextmanager
    def activate(self) -> Iterator[AADCallbackHandler]:
        """Record every LangChain model call made inside the ``with`` block (in this thread or
        task and the runs it starts), without passing ``callbacks=`` anywhere::

            with handler.activate():
                agent.invoke({"messages": [...]})
        """
        _register_configure_hook()
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def feedback(self, run_id: UUID | str, score: float, *, comment: str | None = None,
                 name: str = "user") -> dict[str, Any]:
        """Attach a score (and a comment) to the recorded call of LangChain run ``run_id`` (its trace id):
        stored as ``Trace.feedback``, filtered on by ``aad traces list --min-score`` (aad_core.traces)."""
        from aad_core.traces import record_feedback

        return record_feedback(self.writer, str(run_id), score, comment=comment, name=name)

    def stats(self) -> dict[str, int]:
        """The writer's counters plus ``handler_errors`` and ``in_flight`` (calls not finished)."""
        return {**self.writer.stats(), "handler_errors": self._handler_errors, "in_flight": len(self._runs)}

    # -- start -------------------------------------------------------------------------------
    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            msgs = [message_from_openai(m) for m in convert_to_openai_messages(messages[0] if messages else [])]
            self._start(run_id, parent_run_id, msgs, tags, metadata, kwargs)
        except Exception as err:
            self._fail(err)

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            msgs = [Message(role="user", content=prompts[0] if prompts else "")]
            self._start(run_id, parent_run_id, msgs, tags, metadata, kwargs)
        except Exception as err:
            self._fail(err)

    def _start(
        self,
        run_id: UUID,
        parent_run_id: UUID | None,
        messages: list[Message],
        tags: list[str] | None,
        metadata: dict[str, Any] | None,
        kwargs: dict[str, Any],
    ) -> None:
        start = time.perf_counter()
        metadata = metadata or {}
        inv = kwargs.get("invocation_params") or {}
        if inv.get("_type") == ROUTED_LLM_TYPE:
            # aad's own RoutedChatModel: its answer may be a specialist's, which must never become training
            # data. The teacher call it makes runs as a child run and is recorded as itself.
            self._parents[run_id] = (parent_run_id, str(kwargs.get("name") or "RoutedChatModel"))
            return
        if metadata.get(TIER_METADATA_KEY):
            # a middle tier of aad's cascade: its answer, like a specialist's, is never training data
            self._parents[run_id] = (parent_run_id, str(kwargs.get("name") or f"aad-tier-{metadata[TIER_METADATA_KEY]}"))
            return
        tools = inv.get("tools")
        params = {k: v for k, v in inv.items() if k not in _PARAM_SKIP}
        if "tool_choice" in inv:
            params["tool_choice"] = inv["tool_choice"]
        model = (
            inv.get("model") or inv.get("model_name") or metadata.get("ls_model_name")
            or inv.get("_type") or kwargs.get("name")
        )
        task = metadata.get(TASK_METADATA_KEY) or self.task
        session_id, user_id = self._identity(metadata, parent_run_id)
        self._runs[run_id] = _Run(
            start=start,
            request=ChatRequest(
                messages=messages,
                tools=[openai_tool(t) for t in tools] if tools else None,
                params=json_safe(params),
            ),
            model=str(model) if model is not None else None,
            task=str(task) if task is not None else None,
            parent_run_id=str(parent_run_id) if parent_run_id else None,
            tags=[t for t in tags or [] if not _INTERNAL_TAG.match(str(t))]
            + (["escalation"] if ESCALATION_METADATA_KEY in metadata else []),
            metadata=json_safe({**metadata, **self._tree(run_id, parent_run_id)}),
            session_id=session_id,
            user_id=user_id or openai_user(inv),
        )

    def _identity(self, metadata: dict[str, Any], parent_run_id: UUID | None) -> tuple[str | None, str | None]:
        """``(session_id, user_id)`` of a call: from its metadata (LangChain passes a run's inheritable
        metadata down, so a chain's ``config={"metadata": {...}}`` is already there), else from the nearest
        open chain or tool run above it that names them (aad_core.capture.convert.SESSION_KEYS / USER_KEYS)."""
        sources: list[dict[str, Any] | None] = [metadata]
        current, seen = parent_run_id, set()
        while current is not None and current not in seen and len(sources) < 64:
            seen.add(current)
            sources.append(self._run_metadata.get(current))
            current = self._parents.get(current, (None, ""))[0]
        return identity_from(*sources)

    # -- the run tree: chain and tool runs are followed, not stored ----------------------------
    def on_chain_start(self, serialized: dict[str, Any] | None, inputs: Any, *, run_id: UUID,
                       parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        self._open(run_id, parent_run_id, serialized, kwargs)

    def on_tool_start(self, serialized: dict[str, Any] | None, input_str: str, *, run_id: UUID,
                      parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        self._open(run_id, parent_run_id, serialized, kwargs)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._close(run_id)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._close(run_id)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._close(run_id)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._close(run_id)

    def _close(self, run_id: UUID) -> None:
        self._parents.pop(run_id, None)
        self._run_metadata.pop(run_id, None)

    def _open(self, run_id: UUID, parent_run_id: UUID | None, serialized: dict[str, Any] | None,
              kwargs: dict[str, Any]) -> None:
        try:
            ident = (serialized or {}).get("id")
            name = kwargs.get("name") or (serialized or {}).get("name") or (ident[-1] if ident else "") or "run"
            self._parents[run_id] = (parent_run_id, str(name))
            metadata = kwargs.get("metadata")
            if isinstance(metadata, dict) and any(identity_from(metadata)):
                self._run_metadata[run_id] = metadata
        except Exception as err:
            self._fail(err)

    def _path(self, parent_run_id: UUID | None) -> list[dict[str, str]]:
        """The open runs above a call, root first: ``[{"run_id", "name"}, ...]`` (an untracked parent ends it)."""
        path: list[dict[str, str]] = []
        seen: set[UUID] = set()
        current = parent_run_id
        while current is not None and current not in seen:
            seen.add(current)
            parent, name = self._parents.get(current, (None, ""))
            path.append({"run_id": str(current), "name": name} if name else {"run_id": str(current)})
            current = parent
        return path[::-1]

    # -- streaming ---------------------------------------------------------------------------
    def on_llm_new_token(
        self,
        token: str,
        *,
        chunk: GenerationChunk | ChatGenerationChunk | None = None,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        run = self._runs.get(run_id)
        if run is not None:
            run.chunks.append(chunk if chunk is not None else token)

    def _tree(self, run_id: UUID, parent_run_id: UUID | None) -> dict[str, Any]:
        """``aad_root_run_id`` (the agent invocation's root run: every call of one pipeline shares it) and
        ``aad_run_path`` (the chain / tool runs from the root down to the call's parent, with their names)."""
        path = self._path(parent_run_id)
        return {ROOT_RUN_METADATA_KEY: path[0]["run_id"] if path else str(run_id), RUN_PATH_METADATA_KEY: path}

    # -- end ---------------------------------------------------------------------------------
    def on_llm_end(self, response: LLMResult, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        self._parents.pop(run_id, None)
        try:
            run = self._runs.pop(run_id, None)
            if run is None:
                return
            latency = (time.perf_counter() - run.start) * 1000
            gens = response.generations[0] if response.generations else []
            gen = gens[0] if gens else self._assembled(run.chunks)
            answer, usage, logprobs = self._answer(gen)
            if usage is None and response.llm_output:
                usage = usage_from(response.llm_output.get("token_usage") or response.llm_output.get("usage"))
            self._submit(run_id, run, latency, answer=answer, usage=usage, logprobs=logprobs)
        except Exception as err:
            self._fail(err)

    def on_llm_error(
        self, error: BaseException, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._parents.pop(run_id, None)
        try:
            run = self._runs.pop(run_id, None)
            if run is None:
                return
            latency = (time.perf_counter() - run.start) * 1000
            answer, usage, logprobs = self._answer(self._assembled(run.chunks)) if run.chunks else (None, None, None)
            self._submit(run_id, run, latency, answer=answer, usage=usage, logprobs=logprobs,
                         error=f"{type(error).__name__}: {error}")
        except Exception as err:
            self._fail(err)

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _assembled(chunks: Sequence[Any]) -> Any:
        """The streamed output so far, chunks added up the way LangChain adds them."""
        if not chunks:
            return None
        if all(isinstance(c, str) for c in chunks):
            return GenerationChunk(text="".join(chunks))
        typed = [c for c in chunks if not isinstance(c, str)]
        total = typed[0]
        for c in typed[1:]:
            total = total + c
        return total

    @staticmethod
    def _answer(gen: Any) -> tuple[Message | None, Usage | None, list[TokenLogprob] | None]:
        if gen is None:
            return None, None, None
        if isinstance(gen, ChatGeneration):
            msg = gen.message
            answer = Message.model_validate(convert_to_openai_messages([msg])[0])
            answer.role = "assistant"
            usage = usage_from(getattr(msg, "usage_metadata", None))
            meta = msg.response_metadata or {}
            logprobs = openai_logprobs(meta.get("logprobs"))
            if logprobs is None and gen.generation_info:
                logprobs = openai_logprobs(gen.generation_info.get("logprobs"))
            return answer, usage, logprobs
        info = getattr(gen, "generation_info", None) or {}
        return Message(role="assistant", content=gen.text), None, openai_logprobs(info.get("logprobs"))

    def _submit(
        self,
        run_id: UUID,
        run: _Run,
        latency_ms: float,
        *,
        answer: Message | None,
        usage: Usage | None,
        logprobs: list[TokenLogprob] | None,
        error: str | None = None,
    ) -> None:
        self.writer.submit(Trace(
            id=str(run_id),
            source="langchain",
            task=run.task,
            run_id=str(run_id),
            parent_run_id=run.parent_run_id,
            session_id=run.session_id,
            user_id=run.user_id,
            model=run.model,
            request=run.request,
            response=answer,
            usage=usage,
            latency_ms=latency_ms,
            teacher_logprobs=logprobs,
            status="error" if error else "ok",
            error=error,
            tags=run.tags,
            metadata=run.metadata,
        ))

    def _fail(self, err: BaseException) -> None:
        self._handler_errors += 1
        if not self._logged_error:
            self._logged_error = True
            log.error("aad capture: AADCallbackHandler failed to record a call (%s: %s); the call itself "
                      "was not affected. Further handler errors are counted in stats().", type(err).__name__, err,
                      exc_info=err)
