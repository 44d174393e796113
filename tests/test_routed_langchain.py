"""RoutedChatModel in LangChain chains: specialist and teacher paths, escalation, streaming,
batching, async, tools — with a fake teacher model."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("langchain_core")

from langchain_core.language_models.fake_chat_models import FakeListChatModel, GenericFakeChatModel  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from test_router import (SLOW_SPECIALIST_S, SLOW_TEACHER_S, Scripted, engine_for, escalations,  # noqa: E402,F401
                         routed_workspace)

from aad_core.workspace import Workspace  # noqa: E402
from aad_langchain import RoutedChatModel  # noqa: E402

PROMPT = ChatPromptTemplate.from_messages([("system", "You are a bank assistant."), ("human", "{question}")])


class ToolTeacher(GenericFakeChatModel):
    """A fake teacher that records the tools it was bound with."""

    bound: list[Any] = []

    def bind_tools(self, tools, **kwargs):  # noqa: ANN001, ANN003, ANN201
        ToolTeacher.bound = list(tools)
        return self


def routed(ws: Workspace, backend: Scripted, teacher: Any = None, callbacks: Any = None, **kw: Any) -> RoutedChatModel:
    teacher = teacher or FakeListChatModel(responses=["teacher says hi"])
    return RoutedChatModel(teacher=teacher, routing_engine=engine_for(ws, backend, **kw), callbacks=callbacks)


def test_chain_uses_the_specialist_for_routine_requests(workspace: Workspace) -> None:
    llm = routed(workspace, Scripted('{"intent": "card_arrival"}'))
    chain = PROMPT | llm | StrOutputParser()
    assert json.loads(chain.invoke({"question": "my card has not arrived"})) == {"intent": "card_arrival"}
    msg = (PROMPT | llm).invoke({"question": "my card has not arrived"})
    route = msg.response_metadata["aad_route"]
    assert route["target"] == "specialist" and route["specialist"] == "cards" and route["cluster_id"] == 0
    assert msg.usage_metadata["output_tokens"] == 5 and msg.usage_metadata["total_tokens"] > 5


def test_teacher_answers_the_rest_and_escalations(workspace: Workspace) -> None:
    llm = routed(workspace, Scripted("{broken json"))
    msg = llm.invoke([HumanMessage("plan my trip to Japan")])
    assert msg.content == "teacher says hi" and msg.response_metadata["aad_route"]["target"] == "teacher"
    assert not msg.response_metadata["aad_route"]["escalated"] and msg.usage_metadata is not None
    escalated = llm.invoke([HumanMessage("my card has not arrived")])
    assert escalated.content == "teacher says hi"  # never the specialist's broken JSON
    assert escalated.response_metadata["aad_route"]["escalated"]
    llm.routing_engine.flush()
    (trace,) = escalations(workspace)
    assert trace.response.content == "teacher says hi"
    assert trace.metadata["aad_escalation"]["specialist_output"] == "{broken json"


def test_a_message_role_openai_does_not_have_still_routes_and_reaches_the_teacher(workspace: Workspace) -> None:
    from langchain_core.messages import ChatMessage

    llm = routed(workspace, Scripted('{"intent": "card_arrival"}'))
    msgs = [ChatMessage(role="critic", content="be terse"), HumanMessage("plan my trip to Japan")]
    msg = llm.invoke(msgs)
    assert msg.content == "teacher says hi" and msg.response_metadata["aad_route"]["target"] == "teacher"
    served = llm.invoke([ChatMessage(role="critic", content="be terse"), HumanMessage("my card has not arrived")])
    assert json.loads(served.content) == {"intent": "card_arrival"}


def test_stream_batch_and_async(workspace: Workspace) -> None:
    llm = routed(workspace, Scripted('{"intent": "card_arrival"}'),
                 teacher=GenericFakeChatModel(messages=iter([AIMessage("streamed teacher answer")] * 3)))
    chunks = list(llm.stream("my card has not arrived"))
    full = chunks[0]
    for c in chunks[1:]:
        full += c
    assert json.loads(full.content) == {"intent": "card_arrival"}
    assert full.response_metadata["aad_route"]["target"] == "specialist"
    teacher_chunks = list(llm.stream("plan my trip"))
    assert len(teacher_chunks) > 1  # the teacher's own stream comes through
    joined = teacher_chunks[0]
    for c in teacher_chunks[1:]:
        joined += c
    assert joined.content == "streamed teacher answer"
    assert joined.response_metadata["aad_route"]["target"] == "teacher" and joined.usage_metadata is not None
    outs = llm.batch(["my card has not arrived", "plan my trip"])
    assert [o.response_metadata["aad_route"]["target"] for o in outs] == ["specialist", "teacher"]


async def test_async_invoke_and_stream(workspace: Workspace) -> None:
    llm = routed(workspace, Scripted('{"intent": "card_arrival"}'))
    msg = await llm.ainvoke("my card has not arrived")
    assert msg.response_metadata["aad_route"]["target"] == "specialist"
    teacher_msg = await llm.ainvoke("plan my trip")
    assert teacher_msg.content == "teacher says hi"
    parts = [c async for c in llm.astream("my card has not arrived")]
    assert json.loads("".join(str(p.content) for p in parts)) == {"intent": "card_arrival"}


def test_bind_tools_reaches_specialist_and_teacher(workspace: Workspace) -> None:
    @tool
    def lookup_card(card_id: int) -> str:
        """Look up the delivery status of a card."""
        return "shipped"

    backend = Scripted('<tool_call>{"name": "lookup_card", "arguments": {"card_id": 7}}</tool_call>')
    teacher = ToolTeacher(messages=iter([AIMessage("teacher fallback")]))
    llm = routed(workspace, backend, teacher=teacher, output_kind="tool_calls")
    msg = llm.bind_tools([lookup_card]).invoke("my card has not arrived")
    assert msg.tool_calls == [{"name": "lookup_card", "args": {"card_id": 7}, "id": msg.tool_calls[0]["id"],
                               "type": "tool_call"}]
    assert msg.response_metadata["aad_route"]["target"] == "specialist"
    out = llm.bind_tools([lookup_card], tool_choice="lookup_card").invoke("plan my trip")
    assert out.content == "teacher fallback"
    assert ToolTeacher.bound[0]["function"]["name"] == "lookup_card"


def _joined(chunks: list[Any]) -> Any:
    full = chunks[0]
    for c in chunks[1:]:
        full += c
    return full


@pytest.mark.parametrize("mode", ["invoke", "ainvoke", "stream", "astream"])
async def test_escalation_trace_records_the_teachers_latency(workspace: Workspace, mode: str) -> None:
    teacher = FakeListChatModel(responses=["ok"], sleep=SLOW_TEACHER_S)  # sleeps per call, or per streamed char
    llm = routed(workspace, Scripted("{broken json", sleep_s=SLOW_SPECIALIST_S), teacher=teacher)
    question = "my card has not arrived"
    if mode == "invoke":
        msg = llm.invoke(question)
    elif mode == "ainvoke":
        msg = await llm.ainvoke(question)
    elif mode == "stream":
        msg = _joined(list(llm.stream(question)))
    else:
        msg = _joined([c async for c in llm.astream(question)])
    assert msg.content == "ok" and msg.response_metadata["aad_route"]["escalated"]
    llm.routing_engine.flush()
    (trace,) = escalations(workspace)
    # The teacher's own time (the whole stream when streaming), not the specialist's attempt before it.
    assert SLOW_TEACHER_S * 1000 <= trace.latency_ms < SLOW_SPECIALIST_S * 1000
    assert trace.model == "fake-list-chat-model"
    assert trace.usage.total_tokens == msg.usage_metadata["total_tokens"] > 0


@pytest.mark.real_model
def test_chain_end_to_end_on_trained_specialists(routed_workspace: tuple[Workspace, dict]) -> None:  # noqa: F811
    from test_router import BOOKING, CITIES, DAYS

    ws, info = routed_workspace
    llm = RoutedChatModel(teacher=FakeListChatModel(responses=["teacher answer"] * 3), workspace=str(ws.root))
    prompt = ChatPromptTemplate.from_messages([SystemMessage(info["json_system"]), ("human", "{q}")])
    questions = [BOOKING[i % 4].format(c=CITIES[i % 10], d=DAYS[i % 7]) for i in range(12)]
    decisions = llm.engine().decide([llm._request(prompt.invoke({"q": q}).to_messages(), None, {}) for q in questions])
    question = next(q for q, d in zip(questions, decisions) if d.target == "specialist")
    msg = (prompt | llm).invoke({"q": question})
    route = msg.response_metadata["aad_route"]
    assert route["cluster_id"] == info["json_cluster"] and route["specialist"] == info["json_specialist"], route
    if route["target"] == "specialist":
        assert isinstance(json.loads(msg.content), dict)  # validated JSON from the trained specialist
    else:  # its JSON failed validation: the chain got the teacher's answer
        assert route["escalated"] and route["reason"].startswith("escalated: validator") and msg.content == "teacher answer"
    assert msg.usage_metadata["total_tokens"] > 0
    other = (prompt | llm | StrOutputParser()).invoke({"q": "Write a sonnet about autumn rain and old trains"})
    assert other == "teacher answer"


def test_a_teacher_answer_aad_cannot_convert_still_reaches_the_user(workspace: Workspace, monkeypatch) -> None:
    import aad_langchain.chat_model as chat_model

    real = chat_model.convert_to_openai_messages

    def fails_on_answers(messages, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if any(isinstance(m, AIMessage) for m in messages):
            raise ValueError("an answer aad cannot read")
        return real(messages, *args, **kwargs)

    monkeypatch.setattr(chat_model, "convert_to_openai_messages", fails_on_answers)
    llm = routed(workspace, Scripted("{broken json"))
    assert llm.invoke([HumanMessage("plan my trip to Japan")]).content == "teacher says hi"
    escalated = llm.invoke([HumanMessage("my card has not arrived")])
    assert escalated.content == "teacher says hi" and escalated.response_metadata["aad_route"]["escalated"]
    llm.routing_engine.flush()
    assert [t.response.content for t in escalations(workspace)] == ["teacher says hi"]


def test_a_callback_handler_never_records_the_routed_models_own_answers(workspace: Workspace) -> None:
    """With AADCallbackHandler and RoutedChatModel in one agent, a specialist's answer never becomes a
    teacher trace: the routed model's runs are skipped; the teacher call it makes is recorded as itself."""
    from aad_langchain import AADCallbackHandler

    handler = AADCallbackHandler(workspace=workspace, redact=False, task="intent")
    llm = routed(workspace, Scripted('{"intent": "card_arrival"}'))
    served = llm.invoke([HumanMessage("my card has not arrived")], config={"callbacks": [handler]})
    assert served.response_metadata["aad_route"]["target"] == "specialist"
    taught = llm.invoke([HumanMessage("plan my trip to Japan")], config={"callbacks": [handler]})
    assert taught.response_metadata["aad_route"]["target"] == "teacher"
    handler.flush()
    handler.close()
    llm.routing_engine.flush()
    with workspace.store() as store:
        captured = [t for t in store.iter_traces() if t.source == "langchain"]
    assert [t.response.content for t in captured] == ["teacher says hi"]  # the teacher's call, once
    assert all(t.model != "aad-routed" for t in captured)


def test_binding_the_tasks_own_tools_keeps_the_route_and_other_tools_reach_the_teacher(workspace: Workspace) -> None:
    """bind_tools / with_structured_output with the tools the task was trained with do not change the route;
    a tool the task never bound sends the request to the teacher with the reason (issue 15)."""
    from pydantic import BaseModel

    class Intent(BaseModel):
        """The customer's intent."""

        intent: str

    @tool
    def lookup_card(card_id: int) -> str:
        """Look up the delivery status of a card."""
        return "shipped"

    @tool
    def block_card(card_id: int) -> str:
        """Block a card."""
        return "blocked"

    backend = Scripted('<tool_call>{"name": "Intent", "arguments": {"intent": "card_arrival"}}</tool_call>')
    llm = routed(workspace, backend, output_kind="tool_calls")
    llm.routing_engine._cluster_info[0]["request_shape"] = {
        "max_user_turns": 1, "max_messages": 1, "tool_messages": False, "tools": ["Intent", "lookup_card"],
        "response_formats": [], "n": 50}
    structured = llm.with_structured_output(Intent).invoke("my card has not arrived")
    assert structured == Intent(intent="card_arrival") and backend.calls == ["cards"]
    bound = llm.bind_tools([Intent, lookup_card]).invoke("my card has not arrived")
    assert bound.response_metadata["aad_route"]["target"] == "specialist"
    other = llm.bind_tools([lookup_card, block_card]).invoke("my card has not arrived")
    route = other.response_metadata["aad_route"]
    assert route["target"] == "teacher" and other.content == "teacher says hi"
    assert route["reason"] == ("the request binds tools its specialist never saw (block_card); it was trained with "
                               "Intent, lookup_card")
    assert backend.calls == ["cards", "cards"]  # the specialist never saw the request with a foreign tool


@pytest.mark.parametrize("attach", ["callbacks", "activate", "stream"])
def test_an_escalated_teacher_call_is_stored_once_with_a_callback_handler(workspace: Workspace, attach: str) -> None:
    """RoutedChatModel escalates to the teacher while AADCallbackHandler records the agent: the teacher call is
    stored exactly once, as the handler's trace of the teacher run, carrying the escalation's reason and the
    specialist's rejected output (issue 15)."""
    from aad_langchain import AADCallbackHandler

    handler = AADCallbackHandler(workspace=workspace, redact=False, task="intent")
    llm = routed(workspace, Scripted("{broken json"))
    if attach == "callbacks":
        out = llm.invoke([HumanMessage("my card has not arrived")], config={"callbacks": [handler]})
    elif attach == "stream":
        out = _joined(list(llm.stream([HumanMessage("my card has not arrived")], config={"callbacks": [handler]})))
    else:
        with handler.activate():
            out = llm.invoke([HumanMessage("my card has not arrived")])
    assert out.content == "teacher says hi" and out.response_metadata["aad_route"]["escalated"]
    handler.close()
    llm.routing_engine.flush()
    with workspace.store() as store:
        stored = list(store.iter_traces())
    assert [t.response.content for t in stored] == ["teacher says hi"]
    (trace,) = stored
    # streamed too: the teacher's run is a child run of the routed run, recorded by the handler
    assert trace.source == "langchain" and trace.model != "aad-routed"
    escalation = trace.metadata["aad_escalation"]
    assert escalation["specialist_output"] == "{broken json" and escalation["specialist"] == "cards"
    assert escalation["reason"].startswith("validator")


def test_without_a_handler_on_the_teacher_run_the_engine_records_the_escalation(workspace: Workspace) -> None:
    """A handler bound to the routed model alone (not inherited by its teacher run) does not record the teacher
    call, so the engine still stores the escalation: once."""
    from aad_langchain import AADCallbackHandler

    handler = AADCallbackHandler(workspace=workspace, redact=False)
    llm = routed(workspace, Scripted("{broken json"), callbacks=[handler])  # the model's own: not inherited
    assert llm.invoke([HumanMessage("my card has not arrived")]).content == "teacher says hi"
    handler.close()
    llm.routing_engine.flush()
    with workspace.store() as store:
        stored = list(store.iter_traces())
    assert len(stored) == 1 and stored[0].response.content == "teacher says hi"
