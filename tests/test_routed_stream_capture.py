"""RoutedChatModel.stream()/astream() with AADCallbackHandler (issue 15): a teacher answer that reaches
the user through a stream is recorded exactly once, as a teacher trace, as it is without streaming; a
specialist's streamed answer never is."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

pytest.importorskip("langchain_core")

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from test_router import Scripted, engine_for  # noqa: E402

from aad_core.schema import Trace  # noqa: E402
from aad_core.workspace import Workspace  # noqa: E402
from aad_langchain import AADCallbackHandler, RoutedChatModel  # noqa: E402

TEACHER_ANSWER = "streamed teacher answer"
SPECIALIST_ANSWER = '{"intent": "card_arrival"}'
ROUTINE = "my card has not arrived"  # routed to the specialist "cards"
OTHER = "plan my trip to Japan"      # routed to the teacher


def _model(ws: Workspace, specialist_text: str) -> RoutedChatModel:
    teacher = GenericFakeChatModel(messages=iter([AIMessage(TEACHER_ANSWER)] * 4))
    return RoutedChatModel(teacher=teacher, routing_engine=engine_for(ws, Scripted(specialist_text)))


async def _consume(llm: Any, question: str, handler: AADCallbackHandler, how: str) -> str:
    """Stream ``question`` through ``llm`` as ``how`` says; the joined answer text."""
    config = {"callbacks": [handler]}
    if how == "stream":
        parts = list(llm.stream([HumanMessage(question)], config=config))
    elif how == "astream":
        parts = [p async for p in llm.astream([HumanMessage(question)], config=config)]
    elif how == "chain-stream":  # a chain streams through the model's transform -> stream
        chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | llm
        parts = list(chain.stream({"q": question}, config=config))
    else:  # "activate": no callbacks= anywhere
        with handler.activate():
            parts = list(llm.stream([HumanMessage(question)]))
    return "".join(str(p.content) for p in parts)


def _stored(ws: Workspace, handler: AADCallbackHandler, llm: RoutedChatModel) -> list[Trace]:
    handler.close()
    llm.routing_engine.flush()
    with ws.store() as store:
        return list(store.iter_traces())


@pytest.mark.parametrize("how", ["stream", "astream", "chain-stream", "activate"])
async def test_a_streamed_teacher_answer_is_recorded_once_as_a_teacher_trace(workspace: Workspace, how: str) -> None:
    handler = AADCallbackHandler(workspace=workspace, redact=False, task="trips")
    llm = _model(workspace, SPECIALIST_ANSWER)
    assert await _consume(llm, OTHER, handler, how) == TEACHER_ANSWER
    (trace,) = _stored(workspace, handler, llm)
    assert trace.source == "langchain" and trace.response.content == TEACHER_ANSWER
    assert trace.model == "generic-fake-chat-model" and trace.task == "trips"
    assert trace.request.messages[-1].content == OTHER and "escalation" not in trace.tags
    # the routed model's own run is the teacher run's parent, as without streaming
    assert trace.parent_run_id is not None


@pytest.mark.parametrize("how", ["stream", "astream", "chain-stream", "activate"])
async def test_a_streamed_escalation_is_recorded_once_with_its_reason(workspace: Workspace, how: str) -> None:
    handler = AADCallbackHandler(workspace=workspace, redact=False)
    llm = _model(workspace, "{broken json")
    assert await _consume(llm, ROUTINE, handler, how) == TEACHER_ANSWER
    (trace,) = _stored(workspace, handler, llm)
    assert trace.source == "langchain" and trace.response.content == TEACHER_ANSWER and "escalation" in trace.tags
    escalation = trace.metadata["aad_escalation"]
    assert escalation["specialist_output"] == "{broken json" and escalation["specialist"] == "cards"


@pytest.mark.parametrize("how", ["stream", "astream", "chain-stream", "activate"])
async def test_a_streamed_specialist_answer_is_never_a_teacher_trace(workspace: Workspace, how: str) -> None:
    handler = AADCallbackHandler(workspace=workspace, redact=False)
    llm = _model(workspace, SPECIALIST_ANSWER)
    assert await _consume(llm, ROUTINE, handler, how) == SPECIALIST_ANSWER
    assert _stored(workspace, handler, llm) == []


def test_a_streamed_teacher_answer_without_a_handler_is_not_recorded_twice(workspace: Workspace) -> None:
    """No handler: the engine records the escalation (once), as without streaming; a plain teacher route
    stores nothing (the engine's ``capture_teacher`` is off)."""
    llm = _model(workspace, "{broken json")
    assert "".join(str(p.content) for p in llm.stream(ROUTINE)) == TEACHER_ANSWER
    assert "".join(str(p.content) for p in llm.stream(OTHER)) == TEACHER_ANSWER
    llm.routing_engine.flush()
    with workspace.store() as store:
        stored = list(store.iter_traces())
    assert [(t.source, t.response.content) for t in stored] == [("router", TEACHER_ANSWER)]


def test_interleaved_streams_keep_their_own_parents(workspace: Workspace) -> None:
    """Two routed streams consumed in turns: each teacher run hangs under its own routed run."""
    handler = AADCallbackHandler(workspace=workspace, redact=False)
    llm = _model(workspace, SPECIALIST_ANSWER)
    first = llm.stream(OTHER, config={"callbacks": [handler], "run_id": uuid.UUID(int=1)})
    second = llm.stream(OTHER, config={"callbacks": [handler], "run_id": uuid.UUID(int=2)})
    a, b = next(first), next(second)
    text_a = str(a.content) + "".join(str(p.content) for p in first)
    text_b = str(b.content) + "".join(str(p.content) for p in second)
    assert text_a == text_b == TEACHER_ANSWER
    stored = _stored(workspace, handler, llm)
    assert sorted(t.parent_run_id for t in stored) == [str(uuid.UUID(int=1)), str(uuid.UUID(int=2))]
