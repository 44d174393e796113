"""``RoutedChatModel``: a drop-in LangChain chat model that answers routine requests with the
workspace's distilled specialists and everything else with the teacher.

.. code-block:: python

    from langchain_openai import ChatOpenAI
    from aad_langchain import RoutedChatModel

    llm = RoutedChatModel(teacher=ChatOpenAI(model="gpt-4o"), workspace="./my-agent")
    msg = llm.invoke("Which intent is 'my card has not arrived'?")
    msg.response_metadata["aad_route"]   # target, cluster_id, specialist, similarity, threshold, reason

A specialist's answer is only returned when it passes the output validators and the confidence
gate within ``timeout``; otherwise the teacher answers and the case is recorded for retraining.
``tiers=[...]`` puts middle tiers between them (a cascade): any LangChain chat model or an
OpenAI-compatible endpoint, tried in order, each with the task's validators as its gate.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.callbacks import (AsyncCallbackManager, AsyncCallbackManagerForLLMRun, CallbackManager,
                                      CallbackManagerForLLMRun)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, convert_to_openai_messages
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, ensure_config
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr

from aad_core.capture.convert import message_from_openai
from aad_core.schema import ChatRequest, Message, Usage
from aad_langchain.callback import ESCALATION_METADATA_KEY, ROUTED_LLM_TYPE, AADCallbackHandler

if TYPE_CHECKING:
    from aad_core.serving.routed_call import RoutedCall

log = logging.getLogger(__name__)

_CALL_ONLY = ("tools", "tool_choice", "model", "ls_structured_output_format")
#: The routed model's run of a :meth:`RoutedChatModel.stream` / ``astream`` that is starting: the model
#: and the run's config (with its ``run_id``). LangChain's ``stream()`` gives ``_stream`` no run
#: manager; with this, the teacher call of a stream is a child run of the routed run, as with ``invoke``.
_STREAM_RUN: ContextVar[tuple[Any, RunnableConfig] | None] = ContextVar("aad_routed_stream_run", default=None)
_NO_CHUNK: Any = object()


def _child_config(run_manager: Any, call: RoutedCall | None = None) -> dict[str, Any]:
    """Run config that makes the teacher call a child run of the routed call (same handlers).

    On an escalation the teacher's run carries ``metadata["aad_escalation"]`` (the reason and the
    specialist's rejected answer); when an :class:`AADCallbackHandler` will record that run, it is the
    one trace of the teacher call and the routing engine stores none of its own."""
    if run_manager is None:
        return {}
    cls = AsyncCallbackManager if isinstance(run_manager, AsyncCallbackManagerForLLMRun) else CallbackManager
    # The routed model's own ls_* tracing parameters (ls_model_name="aad-routed", ...) describe it, not the
    # teacher: the teacher's run gets its own.
    metadata = {k: v for k, v in (run_manager.inheritable_metadata or {}).items() if not k.startswith("ls_")}
    escalation = call.escalation_info() if call is not None else None
    if escalation is not None:
        metadata[ESCALATION_METADATA_KEY] = escalation
        if any(isinstance(h, AADCallbackHandler) for h in run_manager.inheritable_handlers or []):
            call.captured_by_caller = True
    manager = cls(handlers=run_manager.inheritable_handlers, inheritable_handlers=run_manager.inheritable_handlers,
                  parent_run_id=run_manager.run_id, tags=run_manager.inheritable_tags,
                  inheritable_tags=run_manager.inheritable_tags, metadata=metadata, inheritable_metadata=metadata)
    return {"callbacks": manager}


def _estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4) if text else 0


class RoutedChatModel(BaseChatModel):
    """Routes each call to a distilled specialist or to ``teacher`` (any LangChain chat model).

    Every answer carries ``response_metadata["aad_route"]`` (the routing decision) and
    ``usage_metadata``. ``bind_tools`` binds the tools for the specialists and the teacher.
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    teacher: BaseChatModel
    """The chat model that answers everything a specialist should not (and every escalation)."""
    workspace: str | Path | None = None
    """The aad workspace folder (default: ``$AAD_WORKSPACE`` or the nearest folder with ``aad.toml``)."""
    model_name: str = Field(default="aad-routed", alias="model")
    """Name reported to tracing (LangSmith) for this routed model."""
    temperature: float | None = None
    """Sampling temperature passed to the specialists (0 or None = greedy)."""
    max_tokens: int | None = None
    """Most tokens a specialist may generate (default: ``[route] max_new_tokens``)."""
    timeout: float | None = None
    """Seconds a specialist may take before the teacher answers instead (default: ``[route] timeout_s``)."""
    stop: list[str] | None = None
    """Stop sequences applied to the specialists' answers and passed to the teacher."""
    max_retries: int = 0
    """Retries of a failed teacher call."""
    api_key: SecretStr | None = None
    """Unused by routing itself (the teacher carries its own credentials); accepted so code written
    for provider chat models keeps working."""
    streaming: bool = False
    """Whether :meth:`invoke` streams internally (callbacks get tokens)."""
    routing_engine: Any = Field(default=None, exclude=True)
    """A prebuilt :class:`aad_core.serving.RoutingEngine` (default: built from ``workspace`` on first use)."""
    preload: bool = False
    """Load and warm the router and every promoted specialist when the model is built, so that the first
    call is not the cold one (default: on first use)."""
    tiers: list[Any] | None = Field(default=None, exclude=True)
    """Middle tiers of the cascade, tried in order after the specialist and before the teacher: LangChain chat
    models, :class:`~aad_langchain.LangChainTier` (name, ``tasks``, ``min_mean_logprob``), ``[[route.tiers]]``
    dicts (OpenAI-compatible endpoints) or :class:`~aad_core.serving.cascade.Tier` objects. None = ``[route]
    tiers`` of aad.toml; ``[]`` = none."""

    _engine: Any = PrivateAttr(default=None)
    _tier_objects: list[Any] | None = PrivateAttr(default=None)

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        if self.tiers is not None:
            from aad_core.serving.cascade import normalise_tiers
            from aad_langchain.tiers import tier_of

            self._tier_objects = normalise_tiers([tier_of(t) for t in self.tiers])
        if self.preload:
            self.engine().preload()

    # -- identity -----------------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return ROUTED_LLM_TYPE

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "workspace": str(self.workspace) if self.workspace else None,
                "teacher": getattr(self.teacher, "_llm_type", type(self.teacher).__name__)}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="aad", ls_model_name=kwargs.get("model", self.model_name),
                                 ls_model_type="chat")
        if self.temperature is not None:
            params["ls_temperature"] = self.temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        ls_stop = stop or kwargs.get("stop") or self.stop
        if ls_stop:
            params["ls_stop"] = list(ls_stop) if not isinstance(ls_stop, str) else [ls_stop]
        return params

    # -- tools ----------------------------------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: dict[str, Any] | str | Literal["auto", "any", "none", "required"] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (any format LangChain converts to the OpenAI schema) for specialists and teacher."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        if tool_choice is not None and tool_choice is not False:
            if tool_choice is True or tool_choice == "any":
                tool_choice = "required"
            elif isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "required"):
                tool_choice = {"type": "function", "function": {"name": tool_choice}}
            kwargs["tool_choice"] = tool_choice
        return super().bind(tools=formatted, **kwargs)

    # -- plumbing -------------------------------------------------------------------------------
    def engine(self) -> Any:
        """The routing engine (built on first use from ``workspace``)."""
        if self.routing_engine is not None:
            return self.routing_engine
        if self._engine is None:
            from aad_core.serving.engine import shared_engine
            from aad_core.workspace import Workspace

            self._engine = shared_engine(Workspace.find(self.workspace))
        return self._engine

    def _teacher_name(self) -> str:
        for attr in ("model_name", "model", "model_id"):
            value = getattr(self.teacher, attr, None)
            if isinstance(value, str) and value:
                return value
        return getattr(self.teacher, "_llm_type", type(self.teacher).__name__)

    def _request(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> ChatRequest:
        params: dict[str, Any] = {k: v for k, v in kwargs.items() if k not in _CALL_ONLY}
        params["model"] = kwargs.get("model", self.model_name)
        if kwargs.get("tool_choice") is not None:
            params["tool_choice"] = kwargs["tool_choice"]
        if self.temperature is not None:
            params.setdefault("temperature", self.temperature)
        if self.max_tokens is not None:
            params.setdefault("max_tokens", self.max_tokens)
        stops = stop or self.stop
        if stops:
            params["stop"] = list(stops)
        msgs = [message_from_openai(m) for m in convert_to_openai_messages(messages)]
        return ChatRequest(messages=msgs, tools=kwargs.get("tools") or None, params=params)

    def _teacher_runnable(self, kwargs: dict[str, Any]) -> Runnable[LanguageModelInput, BaseMessage]:
        teacher: Runnable[LanguageModelInput, BaseMessage] = self.teacher
        tools = kwargs.get("tools")
        if tools:
            choice = kwargs.get("tool_choice")
            try:
                teacher = self.teacher.bind_tools(tools, **({"tool_choice": choice} if choice is not None else {}))
            except NotImplementedError:
                teacher = self.teacher
        extra = {k: v for k, v in kwargs.items() if k not in _CALL_ONLY}
        if extra:
            teacher = teacher.bind(**extra)
        if self.max_retries > 0:
            teacher = teacher.with_retry(stop_after_attempt=self.max_retries + 1)
        return teacher

    def _route(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> RoutedCall:
        return self.engine().route_call(self._request(messages, stop, kwargs), timeout_s=self.timeout,
                                        tiers=self._tier_objects)

    async def _aroute(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> RoutedCall:
        return await self.engine().aroute_call(self._request(messages, stop, kwargs), timeout_s=self.timeout,
                                               tiers=self._tier_objects)

    # -- aad's schema <-> LangChain's messages ---------------------------------------------------
    def _specialist_message(self, call: RoutedCall) -> AIMessage:
        """The answer of the specialist or of a middle tier (``call.served_answer``) as an AIMessage."""
        served = call.served_answer
        assert served is not None  # a specialist or a middle tier answered
        tier = call.tier_outcome
        source = tier if tier is not None else call.outcome
        msg = served.message
        prompt_tokens = _estimate_tokens("\n".join(m.text() for m in call.request.messages))
        usage = source.usage if source is not None else None
        out_tokens = usage.completion_tokens if usage and usage.completion_tokens else _estimate_tokens(msg.text())
        if usage is not None and tier is not None and usage.prompt_tokens:
            prompt_tokens = usage.prompt_tokens
        tool_calls = [{"name": c.function.name, "args": c.function.parsed_arguments(), "id": c.id, "type": "tool_call"}
                      for c in msg.tool_calls or []]
        return AIMessage(
            content=msg.text(),
            tool_calls=tool_calls,
            usage_metadata=UsageMetadata(input_tokens=prompt_tokens, output_tokens=out_tokens,
                                         total_tokens=prompt_tokens + out_tokens),
            response_metadata={"aad_route": call.decision.model_dump(),
                               "model_name": served.model if tier is not None else call.decision.specialist,
                               "model_provider": "aad",
                               "aad_mean_logprob": source.mean_logprob if source is not None else None},
        )

    def _teacher_message(self, call: RoutedCall, answer: BaseMessage) -> tuple[AIMessage, Message, Usage | None]:
        """The teacher's answer as the user gets it (with ``aad_route`` and usage), and in aad's schema."""
        if not isinstance(answer, AIMessage):
            answer = AIMessage(content=answer.content)
        update: dict[str, Any] = {"response_metadata": {**answer.response_metadata,
                                                        "aad_route": call.decision.model_dump()}}
        if answer.usage_metadata is None:
            prompt_tokens = _estimate_tokens("\n".join(m.text() for m in call.request.messages))
            out = _estimate_tokens(answer.text if isinstance(answer.text, str) else str(answer.content))
            update["usage_metadata"] = UsageMetadata(input_tokens=prompt_tokens, output_tokens=out,
                                                     total_tokens=prompt_tokens + out)
            update["response_metadata"]["aad_usage_estimated"] = True
        answer = answer.model_copy(update=update)
        try:
            raw = convert_to_openai_messages([answer])[0]
            message = Message.model_validate({k: v for k, v in raw.items() if v is not None})
            um = answer.usage_metadata
            usage = Usage(prompt_tokens=um["input_tokens"], completion_tokens=um["output_tokens"],
                          total_tokens=um["total_tokens"]) if um else None
        except Exception as err:  # aad's bookkeeping must never break the teacher's answer
            log.warning("could not convert the teacher's answer to aad's schema: %s", err)
            message, usage = Message(role="assistant", content=str(answer.text)), None
        return answer, message, usage

    def _finish_teacher(self, call: RoutedCall, answer: BaseMessage) -> AIMessage:
        answer, message, usage = self._teacher_message(call, answer)
        call.finish_teacher(message, usage, self._teacher_name(), raw=answer)
        return answer

    async def _afinish_teacher(self, call: RoutedCall, answer: BaseMessage) -> AIMessage:
        answer, message, usage = self._teacher_message(call, answer)
        await call.afinish_teacher(message, usage, self._teacher_name(), raw=answer)
        return answer

    def _result(self, call: RoutedCall, message: AIMessage) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=message)],
                          llm_output={"aad_route": call.decision.model_dump(), "model_name": self.model_name})

    def _specialist_chunk(self, call: RoutedCall) -> ChatGenerationChunk:
        full = self._specialist_message(call)
        chunk = AIMessageChunk(
            content=full.content,
            tool_call_chunks=[{"name": tc["name"], "args": json.dumps(tc["args"]), "id": tc["id"], "index": i,
                               "type": "tool_call_chunk"} for i, tc in enumerate(full.tool_calls)],
            usage_metadata=full.usage_metadata, response_metadata=full.response_metadata, chunk_position="last",
        )
        return ChatGenerationChunk(message=chunk)

    @staticmethod
    def _teacher_chunk(call: RoutedCall, part: BaseMessage, first: bool) -> tuple[AIMessageChunk, ChatGenerationChunk]:
        """(the part as a chunk, what the user gets: the first one carries ``aad_route``)."""
        if not isinstance(part, AIMessageChunk):
            part = AIMessageChunk(content=part.content)
        shown = part
        if first:
            shown = part.model_copy(update={"response_metadata": {**part.response_metadata,
                                                                  "aad_route": call.decision.model_dump()}})
        return part, ChatGenerationChunk(message=shown)

    @staticmethod
    def _joined(collected: AIMessageChunk | None) -> AIMessage:
        if collected is None:
            return AIMessage(content="")
        return AIMessage(**collected.model_dump(exclude={"type", "tool_call_chunks", "chunk_position"}))

    @staticmethod
    def _usage_tail(collected: AIMessageChunk | None, final: AIMessage) -> ChatGenerationChunk | None:
        """A last chunk with the estimated usage when the teacher's stream reported none."""
        if collected is not None and collected.usage_metadata is not None:
            return None
        return ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=final.usage_metadata,
                                                          chunk_position="last"))

    # -- streaming: the routed run's callbacks for the teacher's run ---------------------------------
    def stream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
               stop: list[str] | None = None, **kwargs: Any) -> Iterator[AIMessageChunk]:
        config = ensure_config(config)
        config["run_id"] = config.get("run_id") or uuid.uuid4()
        token = _STREAM_RUN.set((self, config))
        try:  # the first chunk starts the routed run and _stream, which reads _STREAM_RUN once
            chunks = super().stream(input, config, stop=stop, **kwargs)
            first = next(chunks, _NO_CHUNK)
        finally:
            _STREAM_RUN.reset(token)
        if first is not _NO_CHUNK:
            yield first
            yield from chunks

    async def astream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
                      stop: list[str] | None = None, **kwargs: Any) -> AsyncIterator[AIMessageChunk]:
        config = ensure_config(config)
        config["run_id"] = config.get("run_id") or uuid.uuid4()
        token = _STREAM_RUN.set((self, config))
        try:
            chunks = super().astream(input, config, stop=stop, **kwargs)
            first = await anext(chunks, _NO_CHUNK)
        finally:
            _STREAM_RUN.reset(token)
        if first is not _NO_CHUNK:
            yield first
            async for chunk in chunks:
                yield chunk

    def _stream_parent(self, run_manager: Any, *, is_async: bool) -> Any:
        """``run_manager``, or when LangChain's ``stream()`` gave none, a manager for the routed run of
        the stream being started (its id and inheritable callbacks, tags and metadata), which only
        makes the teacher's run its child: the routed run's own events stay with LangChain's manager."""
        current = _STREAM_RUN.get()
        if run_manager is not None or current is None or current[0] is not self:
            return run_manager
        config = current[1]
        configure = AsyncCallbackManager.configure if is_async else CallbackManager.configure
        manager = configure(config.get("callbacks"), self.callbacks, self.verbose, config.get("tags"), self.tags,
                            config.get("metadata"), self.metadata)
        cls = AsyncCallbackManagerForLLMRun if is_async else CallbackManagerForLLMRun
        return cls(run_id=config["run_id"], handlers=[], inheritable_handlers=manager.inheritable_handlers,
                   parent_run_id=manager.parent_run_id, tags=[], inheritable_tags=manager.inheritable_tags,
                   metadata={}, inheritable_metadata=manager.inheritable_metadata)

    # -- generation -------------------------------------------------------------------------------
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        call = self._route(messages, stop, kwargs)
        if call.served_answer is not None:
            return self._result(call, self._specialist_message(call))
        teacher, config = self._teacher_runnable(kwargs), _child_config(run_manager, call)
        call.start_teacher()
        answer = teacher.invoke(messages, config=config, stop=stop or self.stop)
        return self._result(call, self._finish_teacher(call, answer))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        call = await self._aroute(messages, stop, kwargs)
        if call.served_answer is not None:
            return self._result(call, self._specialist_message(call))
        teacher, config = self._teacher_runnable(kwargs), _child_config(run_manager, call)
        call.start_teacher()
        answer = await teacher.ainvoke(messages, config=config, stop=stop or self.stop)
        return self._result(call, await self._afinish_teacher(call, answer))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        parent = self._stream_parent(run_manager, is_async=False)  # before the first yield
        call = self._route(messages, stop, kwargs)
        if call.served_answer is not None:
            chunk = self._specialist_chunk(call)
            if run_manager:
                run_manager.on_llm_new_token(str(chunk.message.content), chunk=chunk)
            yield chunk
            return
        teacher, config = self._teacher_runnable(kwargs), _child_config(parent, call)
        collected: AIMessageChunk | None = None
        call.start_teacher()
        for part in teacher.stream(messages, config=config, stop=stop or self.stop):
            part, gen = self._teacher_chunk(call, part, first=collected is None)
            collected = part if collected is None else collected + part
            if run_manager:
                run_manager.on_llm_new_token(str(part.content) if isinstance(part.content, str) else "", chunk=gen)
            yield gen
        tail = self._usage_tail(collected, self._finish_teacher(call, self._joined(collected)))
        if tail is not None:
            yield tail

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        parent = self._stream_parent(run_manager, is_async=True)  # before the first yield
        call = await self._aroute(messages, stop, kwargs)
        if call.served_answer is not None:
            chunk = self._specialist_chunk(call)
            if run_manager:
                await run_manager.on_llm_new_token(str(chunk.message.content), chunk=chunk)
            yield chunk
            return
        teacher, config = self._teacher_runnable(kwargs), _child_config(parent, call)
        collected: AIMessageChunk | None = None
        call.start_teacher()
        async for part in teacher.astream(messages, config=config, stop=stop or self.stop):
            part, gen = self._teacher_chunk(call, part, first=collected is None)
            collected = part if collected is None else collected + part
            if run_manager:
                await run_manager.on_llm_new_token(str(part.content) if isinstance(part.content, str) else "",
                                                   chunk=gen)
            yield gen
        tail = self._usage_tail(collected, await self._afinish_teacher(call, self._joined(collected)))
        if tail is not None:
            yield tail
