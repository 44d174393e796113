"""Context-aware routing (issue 15): a request whose shape (turns of history, tool results, bound tools,
response format) exceeds what its task's specialist was trained on goes to the teacher, saying why;
calibration records each task's training shape in router.json."""

from __future__ import annotations

from typing import Any

import pytest
from test_router import Scripted, engine_for

from aad_core.schema import ChatRequest, Message, Trace, ToolCall
from aad_core.serving.request_shape import shape_mismatch, training_shape
from aad_core.workspace import Workspace

SYSTEM = "Classify the customer's banking query."
LOOKUP = {"type": "function", "function": {"name": "lookup_card", "description": "Delivery status of a card.",
                                           "parameters": {"type": "object", "properties": {"card_id": {"type": "integer"}}}}}
SINGLE_TURN = {"max_user_turns": 1, "max_messages": 1, "tool_messages": False, "tools": [], "response_formats": [],
               "n": 40}


def single(text: str = "my card has not arrived", **kw: Any) -> ChatRequest:
    return ChatRequest(messages=[Message(role="system", content=SYSTEM), Message(role="user", content=text)], **kw)


def history(turns: int, last: str = "my card has not arrived") -> ChatRequest:
    """``turns`` earlier user/assistant exchanges, then ``last``."""
    msgs = [Message(role="system", content=SYSTEM)]
    for i in range(turns):
        msgs += [Message(role="user", content=f"I ordered product {i}"), Message(role="assistant", content=f"ok {i}")]
    return ChatRequest(messages=msgs + [Message(role="user", content=last)])


def with_tool_result() -> ChatRequest:
    call = ToolCall.model_validate({"id": "c1", "type": "function",
                                    "function": {"name": "lookup_card", "arguments": '{"card_id": 7}'}})
    return ChatRequest(messages=[Message(role="user", content="my card has not arrived"),
                                 Message(role="assistant", tool_calls=[call]),
                                 Message(role="tool", tool_call_id="c1", content="shipped")], tools=[LOOKUP])


def test_the_training_shape_is_the_envelope_of_the_training_requests() -> None:
    assert training_shape([]) is None
    shape = training_shape([single(), single(tools=[LOOKUP]), history(1),
                            single(params={"response_format": {"type": "json_schema",
                                                               "json_schema": {"name": "Intent", "schema": {}}}})])
    assert shape == {"max_user_turns": 2, "max_messages": 3, "tool_messages": False, "tools": ["lookup_card"],
                     "response_formats": ["json_schema:Intent"], "n": 4}
    assert training_shape([with_tool_result()])["tool_messages"] is True


def test_a_request_outside_the_training_shape_gets_a_reason() -> None:
    assert shape_mismatch(single(), SINGLE_TURN) == ""
    assert shape_mismatch(history(3), None) == ""  # a router.json from before the shape: nothing enforced
    assert shape_mismatch(history(3), SINGLE_TURN) == "3 prior turns; the specialist was trained on single-turn requests"
    assert shape_mismatch(history(1), SINGLE_TURN) == "1 prior turn; the specialist was trained on single-turn requests"
    two = {**SINGLE_TURN, "max_user_turns": 2, "max_messages": 3}
    assert shape_mismatch(history(1), two) == ""
    assert "at most 1 prior turn" in shape_mismatch(history(2), two)
    tool_trained = {**SINGLE_TURN, "tools": ["lookup_card"]}
    assert shape_mismatch(with_tool_result(), tool_trained) == (
        "tool results in the history; the specialist was trained on requests without tool results")
    assert shape_mismatch(single(tools=[LOOKUP]), tool_trained) == ""  # the task's own tools
    assert shape_mismatch(single(), tool_trained) == ""
    assert "trained on requests without tools" in shape_mismatch(single(tools=[LOOKUP]), SINGLE_TURN)
    other = {"type": "function", "function": {"name": "block_card", "parameters": {}}}
    assert "never saw (block_card)" in shape_mismatch(single(tools=[LOOKUP, other]), tool_trained)
    json_mode = single(params={"response_format": {"type": "json_object"}})
    assert "response_format json_object" in shape_mismatch(json_mode, SINGLE_TURN)
    assert shape_mismatch(json_mode, {**SINGLE_TURN, "response_formats": ["json_object"]}) == ""


def test_the_engine_sends_a_multi_turn_request_to_the_teacher_without_trying_the_specialist(
        workspace: Workspace) -> None:
    backend = Scripted('{"intent": "card_arrival"}')
    engine = engine_for(workspace, backend)
    engine._cluster_info[0]["request_shape"] = SINGLE_TURN
    served = engine.answer(single())
    assert served.decision.target == "specialist" and backend.calls == ["cards"]
    answer = engine.answer(history(2))
    assert answer.decision.target == "teacher" and not answer.decision.escalated
    assert answer.decision.reason == "2 prior turns; the specialist was trained on single-turn requests"
    assert answer.decision.specialist == "cards" and answer.decision.cluster_id == 0
    assert backend.calls == ["cards"]  # the specialist never saw the multi-turn request
    assert "by" in str(answer.message.content)  # the teacher's answer
    tool_result = engine.answer(with_tool_result())
    assert tool_result.decision.target == "teacher" and "tool results" in tool_result.decision.reason
    engine.close()


def test_calibration_records_each_tasks_training_shape(workspace: Workspace) -> None:
    from _fake_embedder import register_fake_embedder

    from aad_core.artifacts import RouterState
    from aad_core.pipeline.calibrate import calibrate_router
    from aad_core.pipeline.cluster import load_clusters, run_cluster

    register_fake_embedder()
    workspace.config_path.write_text(workspace.config_path.read_text().replace('embedder = "minilm"',
                                                                               'embedder = "fake"'))
    ws = Workspace(workspace.root)
    traces = []
    for i in range(30):  # a single-turn classifier node
        traces.append(Trace(request=single(f"card pin atm {i}"), response=Message(role="assistant",
                                                                                  content="card_arrival")))
    for i in range(30):  # a chat node with history, tool results and a bound tool
        req = with_tool_result()
        req.messages[:0] = [Message(role="system", content="You chat about weather and forecasts."),
                            Message(role="user", content=f"rain forecast {i}"), Message(role="assistant", content="ok")]
        traces.append(Trace(request=req, response=Message(role="assistant", content=f"sunny tomorrow {i}")))
    with ws.store() as store:
        store.add(traces)
    run_cluster(ws, k=2, show_progress=False)
    state = load_clusters(ws)
    calibrate_router(ws, show_progress=False, confidence=False)
    saved = RouterState.load(ws)
    by_system = {}
    for cluster in state.clusters:
        shape = saved.clusters[cluster.id]["request_shape"]
        members = [t for t, c in state.assignments.items() if c == cluster.id and state.split.get(t) == "train"]
        assert shape["n"] == len(members)  # every training call, not a calibration sample
        by_system[shape["max_user_turns"]] = shape
    assert by_system[1] == {"max_user_turns": 1, "max_messages": 1, "tool_messages": False, "tools": [],
                            "response_formats": [], "n": by_system[1]["n"]}
    assert by_system[2]["tool_messages"] and by_system[2]["tools"] == ["lookup_card"]
    assert by_system[2]["max_messages"] == 5


@pytest.mark.parametrize("turns", [0, 2])
def test_routed_chat_model_multi_turn_history(workspace: Workspace, turns: int) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    from aad_langchain import RoutedChatModel

    engine = engine_for(workspace, Scripted('{"intent": "card_arrival"}'))
    engine._cluster_info[0]["request_shape"] = SINGLE_TURN
    llm = RoutedChatModel(teacher=FakeListChatModel(responses=["teacher says hi"]), routing_engine=engine)
    msgs: list[Any] = [SystemMessage(SYSTEM)]
    for i in range(turns):
        msgs += [HumanMessage(f"I ordered product {i}"), AIMessage(f"ok {i}")]
    out = llm.invoke(msgs + [HumanMessage("my card has not arrived")])
    route = out.response_metadata["aad_route"]
    if turns == 0:
        assert route["target"] == "specialist"
    else:
        assert route["target"] == "teacher" and out.content == "teacher says hi"
        assert route["reason"] == "2 prior turns; the specialist was trained on single-turn requests"


def test_a_task_whose_calls_bind_different_tools_accepts_any_tools() -> None:
    from aad_core.schema import ChatRequest
    from aad_core.serving.request_shape import shape_mismatch, training_shape

    def req(tool: str) -> ChatRequest:
        return ChatRequest.model_validate({
            "messages": [{"role": "system", "content": "Call the right function."}, {"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": tool, "parameters": {"type": "object"}}}]})

    varying = training_shape([req("get_weather"), req("add_to_cart"), req("compress_file")])
    assert varying is not None and varying["tools"] is None
    assert shape_mismatch(req("board_game_moves"), varying) == ""
    fixed = training_shape([req("get_weather"), req("get_weather")])
    assert "never saw (board_game_moves)" in shape_mismatch(req("board_game_moves"), fixed)
