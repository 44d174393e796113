"""RoutedLLM in LlamaIndex: chat, complete, streaming, async, a chat engine and tools — with a
fake teacher LLM."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, LLMMetadata, MessageRole  # noqa: E402
from llama_index.core.chat_engine import SimpleChatEngine  # noqa: E402
from llama_index.core.llms import CustomLLM, MockLLM  # noqa: E402
from llama_index.core.llms.callbacks import llm_completion_callback  # noqa: E402
from llama_index.core.base.llms.types import CompletionResponse  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402
from test_router import (SLOW_SPECIALIST_S, SLOW_TEACHER_S, Scripted, engine_for, escalations,  # noqa: E402,F401
                         routed_workspace)

from aad_core.workspace import Workspace  # noqa: E402
from aad_llamaindex import RoutedLLM  # noqa: E402
from aad_llamaindex.events import ROUTED_CLASS_NAME  # noqa: E402


TEACHER_USAGE = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}


class FakeTeacher(CustomLLM):
    """Always answers the same text (a stand-in for a hosted LLM)."""

    answer: str = "teacher says hi"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="fake-teacher", is_chat_model=False)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs) -> CompletionResponse:  # noqa: ANN003
        return CompletionResponse(text=self.answer)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs):  # noqa: ANN003, ANN201
        text = ""
        for word in self.answer.split(" "):
            delta = word if not text else " " + word
            text += delta
            yield CompletionResponse(text=text, delta=delta)


class SlowTeacher(FakeTeacher):
    """A teacher that takes SLOW_TEACHER_S per answer (per streamed word) and reports its usage."""

    answer: str = "slow teacher"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="slow-teacher", is_chat_model=False)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs) -> CompletionResponse:  # noqa: ANN003
        time.sleep(SLOW_TEACHER_S)
        return CompletionResponse(text=self.answer, raw={"usage": TEACHER_USAGE})

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs):  # noqa: ANN003, ANN201
        words = self.answer.split(" ")
        for i, word in enumerate(words):
            time.sleep(SLOW_TEACHER_S)
            yield CompletionResponse(text=" ".join(words[: i + 1]), delta=word if not i else " " + word,
                                     raw={"usage": TEACHER_USAGE} if i == len(words) - 1 else None)


def routed(ws: Workspace, backend: Scripted, teacher: CustomLLM | None = None, **kw) -> RoutedLLM:  # noqa: ANN003
    return RoutedLLM(teacher=teacher or FakeTeacher(), routing_engine=engine_for(ws, backend, **kw))


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role=MessageRole.SYSTEM, content="You are a bank assistant."),
            ChatMessage(role=MessageRole.USER, content=text)]


def test_chat_and_complete_route_and_report(workspace: Workspace) -> None:
    llm = routed(workspace, Scripted('{"intent": "card_arrival"}'))
    resp = llm.chat(user("my card has not arrived"))
    assert json.loads(resp.message.content) == {"intent": "card_arrival"}
    assert resp.additional_kwargs["aad_route"]["target"] == "specialist"
    assert resp.additional_kwargs["usage"]["completion_tokens"] == 5
    teacher = llm.chat(user("plan my trip"))
    assert teacher.message.content == "teacher says hi" and teacher.additional_kwargs["aad_route"]["target"] == "teacher"
    done = llm.complete("my card has not arrived")
    assert json.loads(done.text) == {"intent": "card_arrival"}
    assert done.additional_kwargs["aad_route"]["specialist"] == "cards"


def test_escalation_returns_the_teacher_and_is_recorded(workspace: Workspace) -> None:
    llm = routed(workspace, Scripted(raises=True))
    resp = llm.chat(user("my card has not arrived"))
    assert resp.message.content == "teacher says hi"
    assert resp.additional_kwargs["aad_route"]["escalated"]
    llm.routing_engine.flush()
    (trace,) = escalations(workspace)
    assert "RuntimeError" in trace.metadata["aad_escalation"]["reason"]


def test_streaming_and_async(workspace: Workspace) -> None:
    llm = routed(workspace, Scripted('{"intent": "card_arrival"}'))
    parts = list(llm.stream_chat(user("my card has not arrived")))
    assert json.loads(parts[-1].message.content) == {"intent": "card_arrival"}
    teacher_parts = list(llm.stream_chat(user("plan my trip")))
    assert len(teacher_parts) == 3 and "".join(p.delta for p in teacher_parts) == "teacher says hi"
    assert all(p.additional_kwargs["aad_route"]["target"] == "teacher" for p in teacher_parts)
    assert [p.delta for p in llm.stream_complete("plan my trip")][-1] == " hi"


async def test_async_chat(workspace: Workspace) -> None:
    llm = routed(workspace, Scripted('{"intent": "card_arrival"}'))
    resp = await llm.achat(user("my card has not arrived"))
    assert resp.additional_kwargs["aad_route"]["target"] == "specialist"
    out = await llm.acomplete("plan my trip")
    assert out.text == "teacher says hi"
    parts = [p async for p in await llm.astream_chat(user("plan my trip"))]
    assert parts[-1].message.content == "teacher says hi"


def test_chat_engine_runs_on_the_routed_llm(workspace: Workspace) -> None:
    llm = routed(workspace, Scripted('{"intent": "card_arrival"}'))
    engine = SimpleChatEngine.from_defaults(llm=llm)
    first = engine.chat("my card has not arrived")
    assert json.loads(str(first)) == {"intent": "card_arrival"}
    second = engine.chat("and plan my trip please")
    assert str(second) == "teacher says hi"
    assert len(engine.chat_history) == 4


def test_tools_reach_the_specialist(workspace: Workspace) -> None:
    def lookup_card(card_id: int) -> str:
        """Look up the delivery status of a card."""
        return "shipped"

    tool = FunctionTool.from_defaults(fn=lookup_card)
    backend = Scripted('<tool_call>{"name": "lookup_card", "arguments": {"card_id": 7}}</tool_call>')
    llm = routed(workspace, backend, output_kind="tool_calls")
    resp = llm.chat_with_tools([tool], user_msg="my card has not arrived")
    (call,) = llm.get_tool_calls_from_response(resp)
    assert call.tool_name == "lookup_card" and call.tool_kwargs == {"card_id": 7}
    assert tool.call(**call.tool_kwargs).content == "shipped"


@pytest.mark.parametrize("mode", ["chat", "achat", "stream_chat", "astream_chat"])
async def test_escalation_trace_records_the_teachers_latency(workspace: Workspace, mode: str) -> None:
    llm = routed(workspace, Scripted(raises=True, sleep_s=SLOW_SPECIALIST_S), teacher=SlowTeacher())
    messages = user("my card has not arrived")
    if mode == "chat":
        resp = llm.chat(messages)
    elif mode == "achat":
        resp = await llm.achat(messages)
    elif mode == "stream_chat":
        resp = list(llm.stream_chat(messages))[-1]
    else:
        resp = [p async for p in await llm.astream_chat(messages)][-1]
    assert resp.message.content == "slow teacher" and resp.additional_kwargs["aad_route"]["escalated"]
    llm.routing_engine.flush()
    (trace,) = escalations(workspace)
    # The teacher's own time (the whole stream when streaming), not the specialist's attempt before it.
    assert SLOW_TEACHER_S * 1000 <= trace.latency_ms < SLOW_SPECIALIST_S * 1000
    assert trace.model == "slow-teacher" and trace.usage.model_dump() == TEACHER_USAGE


@pytest.mark.real_model
def test_chat_engine_end_to_end_on_trained_specialists(routed_workspace: tuple[Workspace, dict]) -> None:  # noqa: F811
    ws, info = routed_workspace
    llm = RoutedLLM(teacher=MockLLM(), workspace=ws.root)
    engine = SimpleChatEngine.from_defaults(llm=llm, system_prompt=info["intent_system"])
    engine.chat("I am still waiting for my new card to arrive")
    last = llm.chat([ChatMessage(role=MessageRole.SYSTEM, content=info["intent_system"]),
                     ChatMessage(role=MessageRole.USER, content="When will my card be delivered?")])
    route = last.additional_kwargs["aad_route"]
    # The router picks the intent specialist; its answer may still be escalated by the confidence
    # gate (the tiny specialist's log-probs sit near its calibrated cut-off).
    assert route["cluster_id"] == info["intent_cluster"] and route["specialist"] == info["intent_specialist"]
    assert route["target"] == "specialist" or route["escalated"], route["reason"]
    assert isinstance(last, ChatResponse) and last.message.content


def test_an_attached_event_handler_never_records_the_routed_llms_own_answers(workspace: Workspace) -> None:
    """RoutedLLM inside an agent whose calls aad records: a specialist's answer never becomes a teacher
    trace; the teacher call the routed LLM makes is recorded as itself, once."""
    from aad_llamaindex import attach, detach

    handler = attach(workspace=workspace, redact=False, task="intent")
    try:
        llm = routed(workspace, Scripted('{"intent": "card_arrival"}'))
        served = llm.chat([ChatMessage(role="user", content="my card has not arrived")])
        assert served.additional_kwargs["aad_route"]["target"] == "specialist"
        taught = llm.chat([ChatMessage(role="user", content="plan my trip to Japan")])
        assert taught.additional_kwargs["aad_route"]["target"] == "teacher"
        handler.flush()
    finally:
        detach(handler)
    llm.routing_engine.flush()
    with workspace.store() as store:
        captured = [t for t in store.iter_traces() if t.source == "llamaindex"]
    assert [t.response.content for t in captured] == ["teacher says hi"]
    assert captured[0].model != ROUTED_CLASS_NAME
