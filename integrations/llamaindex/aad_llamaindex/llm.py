"""``RoutedLLM``: a drop-in LlamaIndex LLM that answers routine requests with the workspace's
distilled specialists and everything else with the teacher.

.. code-block:: python

    from llama_index.llms.openai import OpenAI
    from aad_llamaindex import RoutedLLM

    llm = RoutedLLM(teacher=OpenAI(model="gpt-4o"), workspace="./my-agent")
    resp = llm.chat([ChatMessage(role="user", content="Which intent is 'card not arrived'?")])
    resp.additional_kwargs["aad_route"]  # target, cluster_id, specialist, similarity, threshold, reason

A specialist's answer is only returned when it passes the validators and the confidence gate;
otherwise the teacher answers and the case is recorded for retraining.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import (ChatMessage, ChatResponse, ChatResponseAsyncGen, ChatResponseGen,
                                              CompletionResponse, CompletionResponseAsyncGen, CompletionResponseGen,
                                              LLMMetadata, MessageRole)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import LLM, ToolSelection
from llama_index.core.tools import BaseTool

from aad_core.capture.convert import openai_role
from aad_core.schema import ChatRequest, FunctionCall, Message, ToolCall, Usage
from aad_llamaindex.events import ROUTED_CLASS_NAME

if TYPE_CHECKING:
    from aad_core.serving.routed_call import RoutedCall

log = logging.getLogger(__name__)



def _to_message(m: ChatMessage) -> Message:
    role = openai_role(m.role)
    calls = None
    raw_calls = m.additional_kwargs.get("tool_calls")
    if raw_calls:
        calls = []
        for c in raw_calls:
            c = c if isinstance(c, dict) else c.model_dump() if hasattr(c, "model_dump") else dict(c)
            fn = c.get("function", c)
            args = fn.get("arguments", "{}")
            calls.append(ToolCall(id=c.get("id"), function=FunctionCall(
                name=fn.get("name", ""), arguments=args if isinstance(args, str) else json.dumps(args))))
    return Message(role=role, content=m.content if (m.content or not calls) else None, tool_calls=calls,
                   tool_call_id=m.additional_kwargs.get("tool_call_id"))


def _tool_spec(tool: BaseTool) -> dict[str, Any]:
    meta = tool.metadata
    return {"type": "function", "function": {"name": meta.name, "description": meta.description,
                                             "parameters": meta.get_parameters_dict()}}


class RoutedLLM(FunctionCallingLLM):
    """Routes each call to a distilled specialist or to ``teacher`` (any LlamaIndex LLM).

    Every response carries ``additional_kwargs["aad_route"]`` (the routing decision) and
    ``additional_kwargs["usage"]``.
    """

    teacher: LLM = Field(description="The LLM that answers everything a specialist should not.")
    workspace: str | None = Field(default=None, description="The aad workspace folder (default: found from the cwd).")
    model_name: str = Field(default="aad-routed", description="Name reported in metadata.")
    timeout: float | None = Field(default=None, description="Seconds a specialist may take (default [route] timeout_s).")
    max_tokens: int | None = Field(default=None, description="Most tokens a specialist may generate.")
    routing_engine: Any = Field(default=None, exclude=True, description="A prebuilt RoutingEngine (tests, apps).")

    _engine: Any = PrivateAttr(default=None)

    def __init__(self, teacher: LLM, workspace: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(teacher=teacher, workspace=str(workspace) if workspace is not None else None, **kwargs)

    @classmethod
    def class_name(cls) -> str:
        return ROUTED_CLASS_NAME

    @property
    def metadata(self) -> LLMMetadata:
        t = self.teacher.metadata
        return LLMMetadata(context_window=t.context_window, num_output=self.max_tokens or t.num_output,
                           is_chat_model=True, is_function_calling_model=True, model_name=self.model_name)

    # -- plumbing -------------------------------------------------------------------------------
    def engine(self) -> Any:
        if self.routing_engine is not None:
            return self.routing_engine
        if self._engine is None:
            from aad_core.serving.engine import shared_engine
            from aad_core.workspace import Workspace

            self._engine = shared_engine(Workspace.find(self.workspace))
        return self._engine

    def _teacher_name(self) -> str:
        try:
            return self.teacher.metadata.model_name
        except Exception:
            return type(self.teacher).__name__

    def _request(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatRequest:
        params: dict[str, Any] = {"model": self.model_name}
        if self.max_tokens:
            params["max_tokens"] = self.max_tokens
        if kwargs.get("tool_required"):
            params["tool_choice"] = "required"
        return ChatRequest(messages=[_to_message(m) for m in messages], tools=kwargs.get("tools") or None,
                           params=params)

    # -- aad's schema <-> LlamaIndex's responses ---------------------------------------------------
    def _specialist_response(self, call: RoutedCall) -> ChatResponse:
        """The answer of the specialist or of a middle tier of the cascade (``call.served_answer``)."""
        served = call.served_answer
        tier = call.tier_outcome
        outcome = tier if tier is not None else call.outcome
        assert served is not None and outcome is not None  # a specialist or a middle tier answered
        msg = served.message
        extra: dict[str, Any] = {}
        if msg.tool_calls:
            extra["tool_calls"] = [c.model_dump() for c in msg.tool_calls]
        prompt = max(1, sum(len(m.text()) for m in call.request.messages) // 4)
        usage = {"prompt_tokens": prompt, "completion_tokens": outcome.usage.completion_tokens if outcome.usage else 0}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=msg.text(), additional_kwargs=extra),
            raw={"model": served.model if tier is not None else call.decision.specialist,
                 "mean_logprob": outcome.mean_logprob},
            additional_kwargs={"aad_route": call.decision.model_dump(), "usage": usage},
        )

    def _teacher_response(self, call: RoutedCall, resp: ChatResponse) -> tuple[ChatResponse, Message, Usage | None]:
        """The teacher's response as the user gets it (with ``aad_route`` and usage), and in aad's schema."""
        usage = resp.additional_kwargs.get("usage")
        if usage is None and isinstance(resp.raw, dict) and isinstance(resp.raw.get("usage"), dict):
            usage = resp.raw["usage"]
        extra = {**resp.additional_kwargs, "aad_route": call.decision.model_dump()}
        if usage is not None:
            extra["usage"] = usage
        resp = resp.model_copy(update={"additional_kwargs": extra})
        try:
            message = _to_message(resp.message).model_copy(update={"role": "assistant"})
            u = Usage.model_validate({k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")
                                      if k in usage}) if isinstance(usage, dict) else None
        except Exception as err:  # aad's bookkeeping must never break the teacher's answer
            log.warning("could not convert the teacher's answer to aad's schema: %s", err)
            message, u = Message(role="assistant", content=str(resp.message.content or "")), None
        return resp, message, u

    def _finish_teacher(self, call: RoutedCall, resp: ChatResponse) -> ChatResponse:
        resp, message, usage = self._teacher_response(call, resp)
        call.finish_teacher(message, usage, self._teacher_name(), raw=resp)
        return resp

    async def _afinish_teacher(self, call: RoutedCall, resp: ChatResponse) -> ChatResponse:
        resp, message, usage = self._teacher_response(call, resp)
        await call.afinish_teacher(message, usage, self._teacher_name(), raw=resp)
        return resp

    @staticmethod
    def _with_route(call: RoutedCall, part: ChatResponse) -> ChatResponse:
        return part.model_copy(update={"additional_kwargs": {**part.additional_kwargs,
                                                             "aad_route": call.decision.model_dump()}})

    def _teacher_call(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponse:
        tools = kwargs.get("aad_tool_objects")
        if tools and isinstance(self.teacher, FunctionCallingLLM):
            return self.teacher.chat_with_tools(tools, chat_history=list(messages),
                                                tool_required=bool(kwargs.get("tool_required")))
        return self.teacher.chat(messages)

    async def _ateacher_call(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponse:
        tools = kwargs.get("aad_tool_objects")
        if tools and isinstance(self.teacher, FunctionCallingLLM):
            return await self.teacher.achat_with_tools(tools, chat_history=list(messages),
                                                       tool_required=bool(kwargs.get("tool_required")))
        return await self.teacher.achat(messages)

    # -- chat -------------------------------------------------------------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        call = self.engine().route_call(self._request(messages, kwargs), timeout_s=self.timeout)
        if call.served_answer is not None:
            return self._specialist_response(call)
        call.start_teacher()
        return self._finish_teacher(call, self._teacher_call(messages, kwargs))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        call = await self.engine().aroute_call(self._request(messages, kwargs), timeout_s=self.timeout)
        if call.served_answer is not None:
            return self._specialist_response(call)
        call.start_teacher()
        return await self._afinish_teacher(call, await self._ateacher_call(messages, kwargs))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        call = self.engine().route_call(self._request(messages, kwargs), timeout_s=self.timeout)

        def gen() -> ChatResponseGen:
            if call.served_answer is not None:
                resp = self._specialist_response(call)
                yield resp.model_copy(update={"delta": resp.message.content})
                return
            last: ChatResponse | None = None
            call.start_teacher()
            if kwargs.get("aad_tool_objects"):
                stream = iter([self._teacher_call(messages, kwargs)])
            else:
                stream = self.teacher.stream_chat(messages)
            for part in stream:
                last = part
                yield self._with_route(call, part)
            if last is not None:
                self._finish_teacher(call, last)

        return gen()

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        call = await self.engine().aroute_call(self._request(messages, kwargs), timeout_s=self.timeout)

        async def gen() -> ChatResponseAsyncGen:
            if call.served_answer is not None:
                resp = self._specialist_response(call)
                yield resp.model_copy(update={"delta": resp.message.content})
                return
            last: ChatResponse | None = None
            call.start_teacher()
            async for part in await self.teacher.astream_chat(messages):
                last = part
                yield self._with_route(call, part)
            if last is not None:
                await self._afinish_teacher(call, last)

        return gen()

    # -- completion (a one-message chat) ----------------------------------------------------------
    @staticmethod
    def _as_completion(resp: ChatResponse, delta: str | None = None) -> CompletionResponse:
        return CompletionResponse(text=resp.message.content or "", delta=delta, raw=resp.raw,
                                  additional_kwargs=resp.additional_kwargs)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._as_completion(self.chat([ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._as_completion(await self.achat([ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        parts = self.stream_chat([ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs)
        return (self._as_completion(p, p.delta) for p in parts)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        parts = await self.astream_chat([ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs)

        async def gen() -> CompletionResponseAsyncGen:
            async for p in parts:
                yield self._as_completion(p, p.delta)

        return gen()

    # -- tools ------------------------------------------------------------------------------------
    def _prepare_chat_with_tools(self, tools: Sequence[BaseTool], user_msg: str | ChatMessage | None = None,
                                 chat_history: list[ChatMessage] | None = None, verbose: bool = False,
                                 allow_parallel_tool_calls: bool = False, tool_required: bool = False,
                                 **kwargs: Any) -> dict[str, Any]:
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(user_msg if isinstance(user_msg, ChatMessage)
                            else ChatMessage(role=MessageRole.USER, content=user_msg))
        return {"messages": messages, "tools": [_tool_spec(t) for t in tools], "aad_tool_objects": list(tools),
                "tool_required": tool_required, **kwargs}

    def get_tool_calls_from_response(self, response: ChatResponse, error_on_no_tool_call: bool = True,
                                     **kwargs: Any) -> list[ToolSelection]:
        route = response.additional_kwargs.get("aad_route") or {}
        if route.get("target") == "teacher" and isinstance(self.teacher, FunctionCallingLLM):
            return self.teacher.get_tool_calls_from_response(response, error_on_no_tool_call=error_on_no_tool_call,
                                                             **kwargs)
        calls = response.message.additional_kwargs.get("tool_calls") or []
        if not calls and error_on_no_tool_call:
            raise ValueError(f"Expected at least one tool call, got 0 (route: {route.get('reason', 'unknown')}).")
        out = []
        for c in calls:
            fn = c.get("function", c)
            args = fn.get("arguments", "{}")
            out.append(ToolSelection(tool_id=c.get("id") or fn.get("name"), tool_name=fn.get("name"),
                                     tool_kwargs=json.loads(args) if isinstance(args, str) else args))
        return out
